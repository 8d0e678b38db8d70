"""The stager's own leftovers, a source that loses a shard, a destination it cannot write: a
disk sized for the data takes the rerun of a killed stage, a vanished source shard is one line
naming it, and a complete copy on a read-only mount is recognised as complete. The tool runs in
a subprocess with a deadline; the small file systems are real tmpfs mounts."""
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, make_imagenet
from engine.atomic import TMP_PREFIX
from engine.data import shards
from engine.data.pack import pack_imagenet
from engine.data.stage import StageError, _Progress, stage
from engine.data.stage import _copy
from engine.data.verify import verify_split
from engine.locks import acquire

STAGE = os.path.join(ROOT, "tools", "stage_shards.py")
DEADLINE = 120


def run(*args):
    return subprocess.run([sys.executable, STAGE, *map(str, args)], capture_output=True,
                          text=True, timeout=DEADLINE)


def one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = make_imagenet(str(tmp_path_factory.mktemp("sf") / "r"), classes=3, train=10, val=2)
    out = tmp_path_factory.mktemp("sf-p") / "p"
    pack_imagenet(root, str(out), workers=0, shard_size=4, progress=False, log=lambda *a: None)
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """A real file system of a given size (needs root and mount rights; else skipped)."""
    made = []

    def mount(size_bytes):
        d = tmp_path / ("fs%d" % len(made))
        d.mkdir()
        size = "%dk" % -(-size_bytes // 4096 * 4)  # whole pages
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (%s)" % r.stderr.strip())
        made.append(d)
        return d

    yield mount
    for d in made:
        subprocess.run(["umount", "-l", str(d)])


def remount_read_only(d):
    subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)


def split_bytes(split):
    return sum(os.path.getsize(os.path.join(split, f)) for f in os.listdir(split))


def blocks(path):
    return -(-os.path.getsize(path) // 4096) * 4096


def test_a_rerun_after_a_killed_stage_fits_on_a_disk_sized_for_the_data(packed, tmpfs):
    src = packed / "train"
    entries = shards.read_meta(str(src))["shards"]
    need = sum(blocks(src / e["file"]) for e in entries) + 3 * 4096  # + meta.json, stamp, lock
    fs = tmpfs(need + 8192)
    dst = fs / "train"
    dst.mkdir()
    # What a stage killed mid-copy leaves: two shards in place, a whole shard under its temp
    # name (killed before the rename), and a temp meta.json. Without them the data fits; with
    # them counted as used, it would not.
    for e in entries[:2]:
        shutil.copy(src / e["file"], dst / e["file"])
    big = max(entries[2:], key=lambda e: e["size"])
    shutil.copy(src / big["file"], dst / (TMP_PREFIX + big["file"]))
    (dst / (TMP_PREFIX + "meta.json.abc123")).write_text("{")
    assert shutil.disk_usage(fs).free < sum(e["size"] for e in entries[2:])
    r = run(src, dst)
    assert r.returncode == 0, r.stderr
    assert "%d shard(s) copied" % (len(entries) - 2) in r.stdout
    assert not [f for f in os.listdir(dst) if f.startswith(TMP_PREFIX)]
    assert verify_split(str(dst)).mismatches == []


def test_a_damaged_local_copy_does_not_count_against_the_space(packed, tmpfs):
    src = packed / "train"
    entries = shards.read_meta(str(src))["shards"]
    fs = tmpfs(sum(blocks(src / e["file"]) for e in entries) + 3 * 4096 + 8192)
    dst = fs / "train"
    assert run(src, dst).returncode == 0
    victim = dst / entries[1]["file"]
    with open(victim, "r+b") as f:  # the same size, other bytes
        f.seek(4096)
        f.write(b"\xff" * 64)
    r = run(src, dst)
    assert r.returncode == 0, r.stderr
    assert "local copy is damaged" in r.stdout and "1 shard(s) copied" in r.stdout
    assert verify_split(str(dst)).mismatches == []


def test_a_source_shard_deleted_before_or_under_the_stager_is_one_line(packed, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(packed / "train", src)
    os.remove(src / "shard-00003.lmdb")
    line = one_error_line(run(src, tmp_path / "dst"))
    assert str(src / "shard-00003.lmdb") in line and "is missing" in line
    assert "meta.json" in line and "cannot write" not in line
    assert not (tmp_path / "dst" / "meta.json").exists()
    # under it: the file goes between the stager's listing and its copy
    (tmp_path / "dst").mkdir(exist_ok=True)
    with pytest.raises(StageError) as err:
        with acquire(str(tmp_path / "lock")) as lock:
            _copy(str(src / "shard-00003.lmdb"), str(tmp_path / "dst" / "shard-00003.lmdb"),
                  None, _Progress(lock), 0)
    assert "shard-00003.lmdb is missing" in str(err.value)
    assert not [f for f in os.listdir(tmp_path / "dst") if f.startswith(TMP_PREFIX)]


def test_a_source_shard_of_the_wrong_size_is_refused_before_copying(packed, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(packed / "val", src)
    with open(src / "shard-00000.lmdb", "ab") as f:
        f.write(b"\0" * 4096)
    line = one_error_line(run(src, tmp_path / "val"))
    assert "shard-00000.lmdb" in line and "bytes" in line and "meta" in line


def test_a_complete_copy_on_a_read_only_mount_is_recognised(packed, tmpfs):
    fs = tmpfs(8 << 20)
    assert run(packed, fs).returncode == 0  # both splits, into fs/train and fs/val
    os.remove(fs / "val" / ".staged.json")  # one split without the stamp: checked by checksum
    remount_read_only(fs)
    r = run(packed, fs)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("read-only; it already holds a complete copy") == 2
    for split in ("train", "val"):
        assert verify_split(str(fs / split)).mismatches == []
    res = stage(str(packed / "train"), str(fs / "train"), log=lambda *a: None)
    assert (res[0]["copied"], res[0]["kept"]) == (0, 8)


def test_an_incomplete_copy_on_a_read_only_mount_says_what_is_wrong(packed, tmpfs):
    fs = tmpfs(8 << 20)
    assert run(packed / "train", fs / "train").returncode == 0
    os.remove(fs / "train" / "shard-00005.lmdb")
    remount_read_only(fs)
    line = one_error_line(run(packed / "train", fs / "train"))
    assert "read-only" in line and "shard-00005.lmdb is missing" in line
    assert "stage into a writable folder" in line


def test_staging_a_split_onto_itself_is_refused(packed, tmp_path):
    src = tmp_path / "train"
    shutil.copytree(packed / "train", src)
    before = sorted(os.listdir(src))
    line = one_error_line(run(src, src))
    assert "is the source itself" in line
    assert sorted(os.listdir(src)) == before
