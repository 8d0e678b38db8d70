"""A pack whose shards are all there but whose meta.json (and so the markers it was made from)
is gone: --merge rebuilds meta.json from the shard files, checked as verify_pack checks them, or
says precisely what it cannot rebuild. A finished shard whose marker was lost (a kill between
the two) is taken the same way. The tools run in subprocesses with a deadline."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, make_imagenet, write
from engine.data import shards
from engine.data.pack import pack_imagenet
from engine.data.verify import verify

TOOL = os.path.join(ROOT, "tools", "pack_imagenet.py")
DEADLINE = 120


def tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True,
                          text=True, timeout=DEADLINE)


def pack_args(data, out):
    return ["--data", data, "--out", out, "--quiet", "--workers", "0", "--shard-size", "5"]


def one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("rp") / "r"), classes=3, train=8, val=2)


@pytest.fixture(scope="module")
def with_skips(tmp_path_factory):
    """Input of which the pack skips three train files (empty, not an image, truncated)."""
    root = make_imagenet(str(tmp_path_factory.mktemp("rs") / "r"), classes=3, train=8, val=2)
    write(os.path.join(root, "train", "n00001000", "empty.JPEG"), b"")
    write(os.path.join(root, "train", "n00001001", "notes.JPEG"), b"not an image at all")
    with open(os.path.join(root, "train", "n00001000", "n00001000_0.JPEG"), "rb") as f:
        head = f.read(600)
    write(os.path.join(root, "train", "n00001002", "cut.JPEG"), head)
    return root


def packed(data, tmp_path):
    out = tmp_path / "p"
    r = tool(*pack_args(data, out))
    assert r.returncode == 0, r.stderr
    return out


def shard_files(split_dir):
    """Each shard file's identity: a repack would give new inodes and times."""
    return {f: (os.stat(os.path.join(split_dir, f)).st_ino,
                os.stat(os.path.join(split_dir, f)).st_mtime_ns)
            for f in os.listdir(split_dir) if f.endswith(".lmdb")}


def meta(split_dir):
    with open(os.path.join(split_dir, shards.META_FILE)) as f:
        return json.load(f)


def same_meta_but_kinds(got, want):
    assert {k: v for k, v in got.items() if k != "kinds"} == \
        {k: v for k, v in want.items() if k != "kinds"}
    assert got["kinds"] == {"unrecorded": want["num_samples"]}  # not in a shard


def test_merge_rebuilds_a_lost_meta_json_from_the_shards(clean, tmp_path):
    out = packed(clean, tmp_path)
    train = out / "train"
    before, files = meta(train), shard_files(train)
    records = list(shards.Split(str(train)))
    os.remove(train / "meta.json")
    r = tool("--out", out, "--merge")
    assert r.returncode == 0, r.stderr
    assert "rebuilt the markers of 5 shard(s) from the shard files" in r.stdout
    assert "train: merged" in r.stdout
    same_meta_but_kinds(meta(train), before)
    assert list(shards.Split(str(train))) == records
    assert shard_files(train) == files and not (train / ".pack").exists()
    assert [rep.mismatches for rep in verify(str(out))] == [[], []]
    r = tool(*pack_args(clean, out))  # and the pack knows it is done
    assert r.returncode == 0 and "already packed" in r.stdout, r.stderr


def test_lost_names_of_skipped_files_are_named_and_the_pack_rerun_repacks(with_skips, tmp_path):
    out = packed(with_skips, tmp_path)
    train = out / "train"
    before = meta(train)
    records = list(shards.Split(str(train)))
    assert len(before["skipped"]) == 3
    os.remove(train / "meta.json")
    line = one_error_line(tool("--out", out, "--merge"))
    assert "cannot merge %s" % train in line and "are missing" not in line
    assert "skipped file(s) and why were recorded only in its marker and meta.json" in line
    assert "rerun the pack with --data" in line
    assert not (train / "meta.json").exists()
    r = tool(*pack_args(with_skips, out))  # as it says
    assert r.returncode == 0, r.stderr
    got = meta(train)  # the shards the merge could check kept their rebuilt markers
    same = ("num_samples", "classes", "skipped", "seen", "fingerprint", "split", "bytes")
    assert {k: got[k] for k in same} == {k: before[k] for k in same}
    assert [(e["file"], e["num_samples"]) for e in got["shards"]] == \
        [(e["file"], e["num_samples"]) for e in before["shards"]]
    assert sum(got["kinds"].values()) == got["num_samples"]
    assert list(shards.Split(str(train))) == records
    assert [rep.mismatches for rep in verify(str(out))] == [[], []]


def test_a_shard_that_is_not_the_plans_is_named_and_the_pack_rewrites_it(clean, tmp_path):
    out = packed(clean, tmp_path)
    train = out / "train"
    records = list(shards.Split(str(train)))
    os.remove(train / "meta.json")
    shutil.copy(train / "shard-00001.lmdb", train / "shard-00000.lmdb")
    line = one_error_line(tool("--out", out, "--merge"))
    assert "shard-00000.lmdb does not hold the files plan.json assigns to it" in line
    assert "rerun the pack" in line
    r = tool(*pack_args(clean, out))
    assert r.returncode == 0, r.stderr
    assert list(shards.Split(str(train))) == records


def test_a_finished_shard_that_lost_its_marker_is_taken_not_repacked(clean, tmp_path):
    """The state a node killed between writing a shard and its marker leaves."""
    out = tmp_path / "p"
    quiet = dict(workers=0, shard_size=5, progress=False, log=lambda *a: None, num_nodes=2)
    pack_imagenet(clean, str(out), node_rank=0, **quiet)
    train = out / "train"
    os.remove(train / ".pack" / "shard-00002.lmdb.json")
    pack_imagenet(clean, str(out), node_rank=1, **quiet)
    assert not (train / "meta.json").exists()  # shard 2 has no marker: not merged yet
    files = shard_files(train)
    r = tool("--out", out, "--merge")
    assert r.returncode == 0, r.stderr
    assert "rebuilt the markers of 1 shard(s)" in r.stdout
    assert shard_files(train) == files and not (train / ".pack").exists()
    assert [rep.mismatches for rep in verify(str(out))] == [[], []]


def test_a_damaged_shard_without_its_marker_is_not_taken(clean, tmp_path):
    out = packed(clean, tmp_path)
    train = out / "train"
    os.remove(train / "meta.json")
    path = train / "shard-00001.lmdb"
    data = bytearray(path.read_bytes())
    at = data.find(b"\xff\xd8\xff") + 2000  # inside the first JPEG's entropy-coded data
    data[at:at + 600] = b"\x00" * 600
    path.write_bytes(bytes(data))
    line = one_error_line(tool("--out", out, "--merge"))
    assert "shard-00001.lmdb record" in line and "the shard is damaged" in line
    assert not (train / "meta.json").exists()
