"""Packing across nodes: the environment resolver, plan.json, a 2-node pack with a killed node,
and the merge. The result must equal a single-node pack of the same input and seed."""
import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, jpeg_bytes, make_imagenet, photo_bgr, write
from engine.data import shards
from engine.data.pack import PackError, pack_imagenet, resolve_nodes
from engine.data.plan import merge_pack

TOOL = os.path.join(ROOT, "tools", "pack_imagenet.py")
DEADLINE = 60


@pytest.mark.parametrize("flags,env,want", [
    ((None, None), {}, (1, 0)),
    ((2, 1), {"SLURM_NNODES": "4", "SLURM_NODEID": "3"}, (2, 1)),  # flags win
    ((None, None), {"SLURM_NNODES": "4", "SLURM_NODEID": "3"}, (4, 3)),
    ((None, None), {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "5",
                    "SLURM_NNODES": "1", "SLURM_NODEID": "0"}, (8, 5)),  # array beats its 1 node
    ((None, None), {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "3",
                    "SLURM_ARRAY_TASK_MIN": "1"}, (4, 2)),  # --array=1-4
    ((None, None), {"NNODES": "3", "NODE_RANK": "2"}, (3, 2)),
    ((None, None), {"GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2"}, (2, 1)),
    ((None, None), {"GROUP_RANK": "1", "NNODES": "5"}, (5, 1)),
    ((None, None), {"SLURM_NNODES": ""}, (1, 0)),
])
def test_resolve_nodes(flags, env, want):
    assert resolve_nodes(flags[0], flags[1], env)[:2] == want


@pytest.mark.parametrize("flags,env,match", [
    ((2, None), {}, "go together"),
    ((2, 2), {}, "outside 0..1"),
    ((0, 0), {}, "at least 1"),
    ((None, None), {"NNODES": "1:4", "NODE_RANK": "0"}, "not an integer"),
    ((None, None), {"GROUP_RANK": "0"}, "GROUP_WORLD_SIZE"),
    ((None, None), {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "6"}, "--array=0-3"),
])
def test_resolve_nodes_refuses_nonsense(flags, env, match):
    with pytest.raises(PackError, match=match):
        resolve_nodes(flags[0], flags[1], env)


@pytest.mark.parametrize("env,want", [
    ({"SLURM_NNODES": "8(x2)", "SLURM_NODEID": "5", "SLURM_JOB_NODELIST": "gpu[01-08]",
      "SLURM_JOB_ID": "77"}, (8, 5)),
    ({"SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[01-04]",
      "SLURM_JOB_ID": "77"}, (4, 2)),
    ({"NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "5"}, (3, 2)),
])
def test_resolve_nodes_reads_the_environment_as_the_trainer_does(env, want):
    """One reader: the packer and the training launch agree on the nodes an environment names,
    Slurm's "8(x2)" count form included."""
    from engine.dist import resolve_cluster

    assert resolve_nodes(None, None, env)[:2] == want
    c = resolve_cluster(env)
    assert (c.num_nodes, c.node_rank) == want


def cmd(data, out, *extra):
    return [sys.executable, TOOL, "--data", str(data), "--out", str(out), "--quiet",
            "--workers", "1", "--shard-size", "5", "--seed", "7", *extra]


def run(args, env=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=DEADLINE * 3,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("d") / "r"), classes=3, train=30, val=4)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "p"
    r = run(cmd(data, out))
    assert r.returncode == 0, r.stderr
    return out


def records(d):
    return list(shards.Split(str(d)))


def shard_entries(meta):
    return [(e["file"], e["num_samples"]) for e in meta["shards"]]


def test_two_nodes_one_killed_and_rerun_then_merge_equal_a_single_node_pack(data, single,
                                                                             tmp_path):
    out = tmp_path / "p"
    # node 1 first, killed mid-way (and possibly at any other point: the rerun must cope)
    node1 = cmd(data, out, "--num-nodes", "2", "--node-rank", "1")
    proc = subprocess.Popen(node1, start_new_session=True, stderr=subprocess.DEVNULL)
    end = time.time() + DEADLINE
    markers = out / "train" / ".pack"
    while time.time() < end and proc.poll() is None and not (
            markers.exists() and any(f.endswith(".lmdb.json") for f in os.listdir(markers))):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # node 0 completes its share; node 1's shards are missing, so nobody may publish meta.json
    r0 = run(cmd(data, out, "--num-nodes", "2", "--node-rank", "0"))
    assert r0.returncode == 0, r0.stderr
    assert "still missing" in r0.stdout
    for split in ("train", "val"):
        with pytest.raises(shards.ShardError, match="incomplete"):
            shards.Split(str(out / split))
    r = run([sys.executable, TOOL, "--out", str(out), "--merge"])
    assert r.returncode == 2 and r.stderr.startswith("error: cannot merge")
    named = [int(n) for n in re.findall(r"shard-(\d{5})\.lmdb", r.stderr)]
    assert named and all(k % 2 == 1 for k in named)  # only node 1's, only the unfinished ones
    assert len(named) < 9 or "..." in r.stderr  # node 1 had finished one before the kill
    # node 1 reruns (its rank from a Slurm array environment) and, finishing last, merges
    r1 = run(cmd(data, out), env={"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "1"})
    assert r1.returncode == 0, r1.stderr
    assert "node 1 of 2 (from SLURM_ARRAY" in r1.stdout and "wrote" in r1.stdout
    for split in ("train", "val"):
        assert records(out / split) == records(single / split)
        got, ref = (shards.read_meta(str(d / split)) for d in (out, single))
        assert shard_entries(got) == shard_entries(ref)
        assert {k: got[k] for k in ("num_samples", "classes", "skipped", "fingerprint")} == \
            {k: ref[k] for k in ("num_samples", "classes", "skipped", "fingerprint")}
        assert json.loads((out / split / "plan.json").read_text()) == \
            json.loads((single / split / "plan.json").read_text())
        assert not (out / split / ".pack").exists()
    before = (out / "train" / "meta.json").read_bytes()
    r = run([sys.executable, TOOL, "--out", str(out), "--merge"])  # idempotent
    assert r.returncode == 0, r.stderr
    assert (out / "train" / "meta.json").read_bytes() == before


def test_each_node_writes_only_its_own_shards(data, tmp_path):
    out = tmp_path / "p"
    pack_imagenet(data, str(out), splits=["train"], workers=0, shard_size=5, seed=7,
                  num_nodes=3, node_rank=2, progress=False, log=lambda *a: None)
    written = sorted(f for f in os.listdir(out / "train") if f.endswith(".lmdb"))
    assert written == ["shard-00002.lmdb", "shard-00005.lmdb", "shard-00008.lmdb",
                       "shard-00011.lmdb", "shard-00014.lmdb", "shard-00017.lmdb"]
    with pytest.raises(PackError, match="12 of 18 shards are missing"):
        merge_pack(str(out), log=lambda *a: None)


def test_a_changed_plan_is_refused(data, tmp_path):
    out = tmp_path / "p"
    quiet = dict(workers=0, shard_size=5, progress=False, log=lambda *a: None, num_nodes=2)
    pack_imagenet(data, str(out), seed=7, node_rank=0, **quiet)
    with pytest.raises(PackError, match=r"plan.json was made for other .*seed 7 then, 8 now"):
        pack_imagenet(data, str(out), seed=8, node_rank=1, **quiet)
    with pytest.raises(PackError, match="shard_size 5 then, 6 now"):
        pack_imagenet(data, str(out), seed=7, node_rank=1, **dict(quiet, shard_size=6))
    extra = os.path.join(data, "val", "n00001000", "extra.JPEG")
    write(extra, jpeg_bytes(photo_bgr("coffee")[:200, :200]))
    try:
        with pytest.raises(PackError, match=r"listing changed: 12 files then, 13 now"):
            pack_imagenet(data, str(out), seed=7, node_rank=1, **quiet)
    finally:
        os.remove(extra)
    pack_imagenet(data, str(out), seed=7, node_rank=1, **quiet)  # the same arguments finish it
    assert len(records(out / "train")) == 90


def test_split_packed_before_plans_and_checksums_still_loads_and_merges(data, single, tmp_path):
    """An older pack (no plan.json, no checksums in meta) keeps working."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(single, out)
    for split in ("train", "val"):
        os.remove(out / split / "plan.json")
        meta = json.loads((out / split / "meta.json").read_text())
        meta["shards"] = [{"file": e["file"], "num_samples": e["num_samples"]}
                          for e in meta["shards"]]
        (out / split / "meta.json").write_text(json.dumps(meta))
    assert records(out / "val") == records(single / "val")
    r = run(cmd(data, out))  # same arguments: recognised as done by its fingerprint
    assert r.returncode == 0 and "already packed" in r.stdout, r.stderr
