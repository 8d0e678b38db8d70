"""verify_pack catches damage; stage_shards copies, resumes, repairs and serialises ranks."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, make_imagenet
from engine.atomic import TMP_PREFIX
from engine.data import shards
from engine.data.pack import pack_imagenet
from engine.data.stage import stage
from engine.data.verify import verify_split

VERIFY = os.path.join(ROOT, "tools", "verify_pack.py")
STAGE = os.path.join(ROOT, "tools", "stage_shards.py")
DEADLINE = 60


def run(*cmd, timeout=DEADLINE * 2):
    return subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = make_imagenet(str(tmp_path_factory.mktemp("src") / "r"), classes=3, train=10, val=2)
    out = tmp_path_factory.mktemp("packed") / "p"
    pack_imagenet(root, str(out), workers=0, shard_size=4, progress=False, log=lambda *a: None)
    return out


@pytest.fixture
def copy(packed, tmp_path):
    """A private copy of the pack to damage."""
    dst = tmp_path / "p"
    shutil.copytree(packed, dst)
    return dst


def records(d):
    return list(shards.Split(str(d)))


def test_meta_records_size_and_checksum_of_each_shard(packed):
    meta = shards.read_meta(str(packed / "train"))
    for e in meta["shards"]:
        path = packed / "train" / e["file"]
        assert e["size"] == os.path.getsize(path)
        assert e["checksum"] == shards.file_checksum(str(path))
        assert e["checksum"].startswith("blake2b:")


def test_intact_pack_verifies_at_every_level(packed):
    for args in ([], ["--fast"], ["--sample", "3"]):
        r = run(VERIFY, packed, *args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 mismatch" in r.stdout and "checksums checked" in r.stdout
    rep = verify_split(str(packed / "train"))
    assert rep.mismatches == [] and rep.decoded == 30 and rep.checksums == "present"
    assert verify_split(str(packed / "train"), sample=5).decoded == 5
    assert verify_split(str(packed / "train"), fast=True).decoded == 0


def flip_byte(path, at=None):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fast", [True, False])
def test_verify_catches_a_flipped_byte(copy, fast):
    flip_byte(copy / "train" / "shard-00002.lmdb")
    r = run(VERIFY, copy, *(["--fast"] if fast else []))
    assert r.returncode == 2
    assert "MISMATCH shard-00002.lmdb: checksum differs" in r.stdout
    assert r.stderr.startswith("error: 1 mismatch") and "Traceback" not in r.stderr


def test_verify_catches_truncated_and_missing_shards(copy):
    victim = copy / "train" / "shard-00001.lmdb"
    os.truncate(victim, os.path.getsize(victim) // 2)
    os.remove(copy / "train" / "shard-00003.lmdb")
    r = run(VERIFY, copy / "train", "--fast")
    assert r.returncode == 2
    assert "shard-00001.lmdb: %d bytes, meta.json says" % os.path.getsize(victim) in r.stdout
    assert "shard-00003.lmdb: missing" in r.stdout
    assert "2 mismatch" in r.stdout


def test_verify_catches_a_record_count_mismatch(copy):
    meta_path = copy / "val" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["shards"][0]["num_samples"] += 1  # checksums still match: only the count is wrong
    meta["num_samples"] += 1
    meta_path.write_text(json.dumps(meta))
    assert run(VERIFY, copy / "val", "--fast").returncode == 0  # --fast checks bytes only
    r = run(VERIFY, copy / "val")
    assert r.returncode == 2
    assert "shard-00000.lmdb: holds 4 records, meta.json says 5" in r.stdout


def test_verify_catches_a_record_that_does_not_decode_without_checksums(copy):
    """A pack from before checksums: verify says so, still checks and decodes everything."""
    meta_path = copy / "train" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for e in meta["shards"]:
        del e["size"], e["checksum"]
    meta_path.write_text(json.dumps(meta))
    r = run(VERIFY, copy / "train")
    assert r.returncode == 0 and "checksums absent" in r.stdout and "30 decoded" in r.stdout
    assert len(records(copy / "train")) == 30  # still loads
    # damage one JPEG inside a record: its entropy-coded data, not LMDB's structure
    path = copy / "train" / "shard-00000.lmdb"
    data = bytearray(path.read_bytes())
    rec = records(copy / "train")[0]
    at = bytes(data).find(rec["image"][-400:])
    assert at > 0
    data[at:at + 300] = b"\x00" * 300
    path.write_bytes(bytes(data))
    r = run(VERIFY, copy / "train")
    assert r.returncode == 2 and "shard-00000.lmdb record 0: image does not decode" in r.stdout


def test_verify_of_something_unpacked_is_one_line(tmp_path):
    r = run(VERIFY, tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_stage_copies_verifies_and_skips_what_is_correct(packed, tmp_path):
    dst = tmp_path / "local"
    r = run(STAGE, packed, dst)
    assert r.returncode == 0, r.stderr
    assert "8 shard(s) copied" in r.stdout and "2 shard(s) copied" in r.stdout  # 30/4, 6/4
    for split in ("train", "val"):
        assert records(dst / split) == records(packed / split)
        assert verify_split(str(dst / split)).mismatches == []
    mtimes = {f: os.stat(dst / "train" / f).st_mtime_ns for f in os.listdir(dst / "train")
              if f.endswith(".lmdb")}
    r = run(STAGE, packed / "train", dst / "train")
    assert r.returncode == 0 and "0 shard(s) copied" in r.stdout and "8 already correct" in r.stdout
    assert mtimes == {f: os.stat(dst / "train" / f).st_mtime_ns for f in mtimes}


def test_a_corrupted_local_copy_is_copied_again(packed, tmp_path):
    dst = tmp_path / "local"
    stage(str(packed / "train"), str(dst), log=lambda *a: None)
    flip_byte(dst / "shard-00004.lmdb")
    r = run(STAGE, packed / "train", dst)
    assert r.returncode == 0, r.stderr
    assert "shard-00004.lmdb: local copy is damaged" in r.stdout
    assert "1 shard(s) copied" in r.stdout
    assert verify_split(str(dst)).mismatches == []


def test_an_interrupted_copy_resumes(packed, tmp_path):
    """The state a kill leaves: some shards in place, a partial temp file, no meta.json."""
    dst = tmp_path / "local"
    dst.mkdir()
    for f in ("shard-00000.lmdb", "shard-00001.lmdb"):
        shutil.copy(packed / "train" / f, dst / f)
    part = (packed / "train" / "shard-00002.lmdb").read_bytes()
    (dst / (TMP_PREFIX + "shard-00002.lmdb")).write_bytes(part[:len(part) // 3])
    with pytest.raises(shards.ShardError, match="incomplete"):
        shards.Split(str(dst))
    res = stage(str(packed / "train"), str(dst), log=lambda *a: None)
    assert (res[0]["copied"], res[0]["kept"]) == (6, 2)
    assert records(dst) == records(packed / "train")
    assert not [f for f in os.listdir(dst) if f.startswith(TMP_PREFIX)]


def test_a_killed_stage_reruns_to_a_correct_copy(packed, tmp_path):
    dst = tmp_path / "local"
    proc = subprocess.Popen([sys.executable, STAGE, str(packed), str(dst)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + DEADLINE
    while not (dst / "train").exists() and time.time() < end and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # wherever it is: the rerun must end correct either way
    proc.wait()
    r = run(STAGE, packed, dst)
    assert r.returncode == 0, r.stderr
    for split in ("train", "val"):
        assert records(dst / split) == records(packed / split)


def test_several_ranks_at_once_copy_each_shard_once(packed, tmp_path):
    dst = tmp_path / "local"
    procs = [subprocess.Popen([sys.executable, STAGE, str(packed / "train"), str(dst)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=DEADLINE * 2) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    copied = 0
    for out, _ in outs:
        for line in out.splitlines():
            if "shard(s) copied" in line:
                copied += int(line.split(": ")[1].split(" shard")[0])
    assert copied == 8  # one rank copied; the others waited, or found everything correct
    assert records(dst) == records(packed / "train")


def test_a_stalled_holder_makes_waiters_fail_with_its_pid(packed, tmp_path):
    dst = tmp_path / "local"
    dst.mkdir()
    fd = os.open(dst / ".stage.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a holder that never progresses
    os.pwrite(fd, json.dumps({"pid": 4242, "host": "nodeX", "bytes_done": 0}).encode(), 0)
    try:
        r = run(STAGE, packed / "train", dst, "--stall-timeout", "1", timeout=DEADLINE)
    finally:
        os.close(fd)
    assert r.returncode == 2
    assert "pid 4242 on host nodeX made no progress for 1 s" in r.stderr
    assert not (dst / "meta.json").exists()


def test_a_damaged_source_is_never_published(copy, tmp_path):
    flip_byte(copy / "val" / "shard-00001.lmdb")
    dst = tmp_path / "local"
    r = run(STAGE, copy / "val", dst)
    assert r.returncode == 2 and "shard-00001.lmdb: checksum differs" in r.stderr
    assert not (dst / "meta.json").exists() and not (dst / "shard-00001.lmdb").exists()
