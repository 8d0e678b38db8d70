"""Repairing a damaged pack: a rerun over a finished split with a missing or truncated shard says
which and that --repair fixes it (exit 2); --repair verifies the shards and repacks only those
that fail, from the plan, ending with a pack that verifies and equals the original record for
record. And what the packer prints: no "0 img/s" on a no-op rerun, the changed argument named
in a refusal, a kill hint in the packer's own terms."""
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, make_imagenet
from engine.data import shards
from engine.data.pack import PackError, pack_imagenet
from engine.data.verify import verify

TOOL = os.path.join(ROOT, "tools", "pack_imagenet.py")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("repair") / "raw"), classes=3, train=8,
                         val=2)


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("repair") / "ref")
    pack(raw, out)
    return out


def pack(raw, out, **kw):
    lines = []
    kw.setdefault("workers", 0)
    res = pack_imagenet(raw, out, shard_size=5, progress=False, log=lines.append, **kw)
    return res, lines


def records(split_dir):
    return list(shards.Split(split_dir))


def shard(out, k, split="train"):
    return os.path.join(out, split, shards.shard_name(k))


def flip_a_byte(path, at=4096):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def run_tool(*args):
    p = subprocess.run([sys.executable, TOOL, *map(str, args), "--quiet"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    return p.returncode, p.stdout, p.stderr


def test_a_rerun_over_a_damaged_pack_says_what_and_that_repair_fixes_it(raw, reference,
                                                                        tmp_path):
    out = str(tmp_path / "p")
    shutil.copytree(reference, out)
    os.remove(shard(out, 1))
    with open(shard(out, 2), "r+b") as f:
        f.truncate(4096)
    with pytest.raises(PackError) as err:
        pack(raw, out)
    text = str(err.value)
    assert "2 of its 5 shard(s) are damaged" in text
    assert "shard-00001.lmdb: missing" in text and "shard-00002.lmdb: 4096 bytes" in text
    assert "--repair" in text
    rc, _out, stderr = run_tool("--data", raw, "--out", out, "--shard-size", 5)
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "--repair" in lines[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_repair_repacks_only_the_failing_shards_and_ends_verified(raw, reference, tmp_path,
                                                                  workers):
    out = str(tmp_path / "p")
    shutil.copytree(reference, out)
    os.remove(shard(out, 0))
    flip_a_byte(shard(out, 2))  # same size: only the checksum tells
    flip_a_byte(shard(out, 0, "val"))
    untouched = {k: os.stat(shard(out, k)).st_mtime_ns for k in (1, 3)}
    res, lines = pack(raw, out, repair=True, workers=workers)
    train, val = res.splits
    assert train.repaired == ["shard-00000.lmdb", "shard-00002.lmdb"]
    assert val.repaired == ["shard-00000.lmdb"]
    assert "train: damaged shard-00002.lmdb: checksum differs from meta.json (the file is " \
           "damaged)" in lines
    assert {k: os.stat(shard(out, k)).st_mtime_ns for k in (1, 3)} == untouched
    assert all(not r.mismatches for r in verify(out))
    for split in ("train", "val"):
        assert records(os.path.join(out, split)) == records(os.path.join(reference, split))
        assert ".pack" not in os.listdir(os.path.join(out, split))
    res, lines = pack(raw, out, repair=True)  # nothing left to repair
    assert all(s.done_before for s in res.splits)
    assert any("every shard verified" in line for line in lines)


def test_repair_through_the_tool_then_verify_pack_passes(raw, reference, tmp_path):
    out = str(tmp_path / "p")
    shutil.copytree(reference, out)
    os.remove(shard(out, 3))
    rc, stdout, stderr = run_tool("--data", raw, "--out", out, "--shard-size", 5, "--repair")
    assert rc == 0, stderr
    assert "repaired shard-00003.lmdb" in stdout
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "verify_pack.py"), out],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stdout + p.stderr


def test_an_unreadable_meta_json_is_named_and_repaired(raw, reference, tmp_path):
    out = str(tmp_path / "p")
    shutil.copytree(reference, out)
    with open(os.path.join(out, "train", "meta.json"), "w") as f:
        f.write('{"format": "engine-lmdb-sh')  # torn
    with pytest.raises(PackError, match=r"train/meta.json is not a readable meta.json .*"
                                        r"--repair"):
        pack(raw, out)
    pack(raw, out, repair=True)
    assert all(not r.mismatches for r in verify(out))
    assert records(os.path.join(out, "train")) == records(os.path.join(reference, "train"))


def test_repair_of_an_unfinished_pack_repacks_a_shard_changed_since(raw, reference, tmp_path):
    out = str(tmp_path / "p")
    pack(raw, out, num_nodes=2, node_rank=0)  # node 0's shards only: no meta.json yet
    assert not os.path.exists(os.path.join(out, "train", "meta.json"))
    flip_a_byte(shard(out, 0))
    res, lines = pack(raw, out, repair=True)
    assert "train: damaged shard-00000.lmdb: checksum differs from its marker; packing it " \
           "again" in lines
    assert all(not r.mismatches for r in verify(out))
    assert records(os.path.join(out, "train")) == records(os.path.join(reference, "train"))


def test_repair_runs_on_one_machine(raw, reference, tmp_path):
    with pytest.raises(PackError, match="--repair runs on one machine"):
        pack(raw, str(tmp_path / "p"), repair=True, num_nodes=2, node_rank=1)
    rc, _o, stderr = run_tool("--out", tmp_path / "p", "--merge", "--repair")
    assert rc == 2 and "needs --data" in stderr


# ------------------------------------------------------------------------- what it prints

def test_a_no_op_rerun_reports_no_rate_and_a_changed_argument_is_named(raw, reference,
                                                                       tmp_path):
    out = str(tmp_path / "p")
    shutil.copytree(reference, out)
    rc, stdout, stderr = run_tool("--data", raw, "--out", out, "--shard-size", 5)
    assert rc == 0, stderr
    assert "img/s" not in stdout and "nothing to do" in stdout
    rc, _o, stderr = run_tool("--data", raw, "--out", out, "--shard-size", 4)
    assert rc == 2
    assert "different input or arguments (shard_size 5 then, 4 now)" in stderr
    rc, _o, stderr = run_tool("--data", raw, "--out", out, "--shard-size", 5, "--seed", 3)
    assert rc == 2 and "(seed 0 then, 3 now)" in stderr
    with open(os.path.join(out, "val", "meta.json")) as f:
        assert json.load(f)["seed"] == 0


def _oom(job, records_done):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_packing_worker_killed_by_the_oom_killer_gets_the_packers_advice(tmp_path):
    from engine.data import pool

    with pytest.raises(PackError) as err:
        pool.run(_oom, [{"k": 0, "dst": str(tmp_path)}], 1, mp.get_context("fork").Value("q", 0),
                 lambda: None)
    text = str(err.value)
    assert "killed by signal 9" in text and "out-of-memory killer: pack with fewer --workers" \
        in text
    assert "batch size" not in text
