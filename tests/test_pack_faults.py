"""Packer faults: a killed worker, two packs into one folder, full and read-only disks, missing
splits, damaged shards, Ctrl-C. Each runs the real tool in a subprocess with a deadline."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from helpers import ROOT, make_imagenet
from engine.data import shards
from engine.data.pack import PackError, pack_imagenet

TOOL = os.path.join(ROOT, "tools", "pack_imagenet.py")
DEADLINE = 60  # seconds; only catches a hang, never measures speed


def pack_cmd(data, out, *extra):
    return [sys.executable, TOOL, "--data", str(data), "--out", str(out), "--quiet", *extra]


def run(cmd, timeout=DEADLINE * 3):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def records(split_dir):
    return list(shards.Split(str(split_dir)))


def wait_for(cond, what, deadline=DEADLINE):
    end = time.time() + deadline
    while time.time() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


def one_error_line(stderr):
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """Enough files for several shards per worker, so a pack runs for a while."""
    return make_imagenet(str(tmp_path_factory.mktemp("big") / "r"), classes=3, train=40, val=4)


@pytest.fixture(scope="module")
def reference(bigger, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "p"
    r = run(pack_cmd(bigger, out, "--workers", "1", "--shard-size", "7"))
    assert r.returncode == 0, r.stderr
    return out


def assert_same_pack(out, ref):
    for split in ("train", "val"):
        assert records(os.path.join(out, split)) == records(os.path.join(ref, split))
        left = os.listdir(os.path.join(out, split))
        assert not [f for f in left if f.endswith((".tmp", ".tmp-lock"))], left
        assert ".pack" not in left


def test_killed_worker_is_an_error_naming_its_shard_and_rerun_completes(bigger, reference,
                                                                        tmp_path):
    out = tmp_path / "p"
    cmd = pack_cmd(bigger, out, "--workers", "2", "--shard-size", "7")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        me = psutil.Process(proc.pid)
        victims = []

        def a_worker():  # forked workers share the packer's command line
            victims[:] = [c for c in me.children() if c.cmdline() == me.cmdline()]
            return bool(victims)

        wait_for(a_worker, "a packing worker to start")
        victims[0].send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, stderr
    line = one_error_line(stderr)
    assert "killed by signal 9" in line and "Rerun" in line
    assert __import__("re").search(r"train/shard-\d{5}\.lmdb", line), line
    assert not psutil.pid_exists(victims[0].pid) or victims[0].status() == psutil.STATUS_ZOMBIE
    r = run(cmd)
    assert r.returncode == 0, r.stderr
    assert_same_pack(out, reference)


def test_second_pack_into_the_same_out_stops_and_names_the_holder(bigger, reference, tmp_path):
    out = tmp_path / "p"
    cmd = pack_cmd(bigger, out, "--workers", "1", "--shard-size", "7")
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lock = out / ".pack.lock"
    try:
        def holds():
            try:
                return json.loads(lock.read_text())["pid"] == first.pid
            except (OSError, ValueError):
                return False

        wait_for(holds, "the first pack to take its lock")
        os.killpg(first.pid, signal.SIGSTOP)  # frozen while holding the lock: no race
        second = run(cmd, timeout=DEADLINE)
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert "pid %d" % first.pid in line and socket.gethostname() in line
        assert "another pack" in line
        os.killpg(first.pid, signal.SIGKILL)  # a killed holder never blocks the rerun
        first.wait(timeout=DEADLINE)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    r = run(cmd)
    assert r.returncode == 0, r.stderr
    assert_same_pack(out, reference)


@pytest.fixture
def tmpfs(tmp_path):
    """A small real file system of its own (needs root and mount rights; else skipped)."""
    made = []

    def mount(size="2m", readonly=False):
        d = tmp_path / ("fs%d" % len(made))
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (%s)" % r.stderr.strip())
        made.append(d)
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        return d

    yield mount
    for d in made:
        subprocess.run(["umount", "-l", str(d)])


def test_full_disk_is_one_line_naming_the_path_and_leaves_no_partial_files(bigger, tmpfs):
    fs = tmpfs("2m")  # the pack needs about 4 MB
    out = fs / "p"
    r = run(pack_cmd(bigger, out, "--workers", "2", "--shard-size", "7"))
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "disk is full" in line and str(out) in line and "MB free" in line
    assert "needed" in line
    for split in ("train", "val"):
        left = os.listdir(out / split) if (out / split).exists() else []
        assert not [f for f in left if ".tmp" in f], left


def test_read_only_out_is_one_line(bigger, tmpfs):
    fs = tmpfs("2m", readonly=True)
    r = run(pack_cmd(bigger, fs / "p", "--workers", "1"))
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "read-only" in line and str(fs / "p") in line


def test_read_only_existing_out_is_one_line(bigger, tmpfs):
    fs = tmpfs("2m")
    (fs / "p").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    r = run(pack_cmd(bigger, fs / "p", "--workers", "1"))
    assert r.returncode == 2
    assert "read-only" in one_error_line(r.stderr)


def test_every_requested_split_is_checked_before_any_work(tmp_path):
    root = make_imagenet(str(tmp_path / "r"), classes=2, train=2, val=0)
    out = tmp_path / "o"
    with pytest.raises(PackError, match="val"):
        pack_imagenet(root, str(out), splits=["train", "val"], workers=0, progress=False,
                      log=lambda *a: None)
    assert not out.exists()  # nothing written, train was not packed first
    with pytest.raises(PackError, match="twice"):
        pack_imagenet(root, str(out), splits=["train", "train"], workers=0, progress=False)


def test_out_or_data_that_is_a_file_is_one_line(tiny_imagenet, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = run(pack_cmd(tiny_imagenet, f))
    assert r.returncode == 2 and "not a folder" in one_error_line(r.stderr)
    r = run(pack_cmd(f, tmp_path / "o"))
    assert r.returncode == 2 and "not a folder" in one_error_line(r.stderr)


def test_ctrl_c_is_one_line_and_rerun_resumes(bigger, reference, tmp_path):
    out = tmp_path / "p"
    cmd = pack_cmd(bigger, out, "--workers", "2", "--shard-size", "7")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: (out / "train" / "plan.json").exists(), "the pack to start")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode == 0:
        pytest.skip("the pack finished before the interrupt arrived")
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted; rerun to resume"
    r = run(cmd)
    assert r.returncode == 0, r.stderr
    assert_same_pack(out, reference)


def test_truncated_or_garbage_shard_is_a_shard_error_naming_the_file(tiny_imagenet, tmp_path):
    out = tmp_path / "p"
    pack_imagenet(tiny_imagenet, str(out), workers=0, shard_size=4, progress=False,
                  log=lambda *a: None)
    split = out / "train"
    victim = split / "shard-00001.lmdb"
    good = victim.read_bytes()
    os.truncate(victim, len(good) // 2)
    with pytest.raises(shards.ShardError, match="shard-00001.lmdb is truncated") as e:
        shards.Split(str(split))
    assert "repack" in str(e.value)
    victim.write_bytes(good[:100])
    with pytest.raises(shards.ShardError, match="shard-00001.lmdb is truncated"):
        shards.Split(str(split))
    victim.write_bytes(os.urandom(len(good)))
    with pytest.raises(shards.ShardError, match="shard-00001.lmdb is not an LMDB shard"):
        shards.Split(str(split))
    victim.write_bytes(good)
    assert len(records(split)) == 18
    # past the header check, LMDB's own refusal is a ShardError naming the file too
    bad = bytearray(good)
    bad[16 + 4:16 + 8] = (999).to_bytes(4, "little")  # an unknown LMDB version in both metas
    bad[4096 + 16 + 4:4096 + 16 + 8] = (999).to_bytes(4, "little")
    victim.write_bytes(bytes(bad))
    shards.close_all_envs()
    with pytest.raises(shards.ShardError, match="shard-00001.lmdb cannot be opened"):
        shards.Split(str(split)).get(4)


def test_truncated_shard_read_does_not_crash_the_process(tiny_imagenet, tmp_path):
    """Without the size check, reading a truncated shard dies of SIGBUS: run it in a child."""
    out = tmp_path / "p"
    pack_imagenet(tiny_imagenet, str(out), workers=0, shard_size=100, progress=False,
                  log=lambda *a: None)
    victim = out / "train" / "shard-00000.lmdb"
    os.truncate(victim, os.path.getsize(victim) // 3)
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from engine.data import shards\n"
            "try:\n    s = shards.Split(%r); [s.get(i) for i in range(len(s))]\n"
            "except shards.ShardError as e:\n    print('refused', e); sys.exit(3)\n"
            % (ROOT, str(out / "train")))
    r = run([sys.executable, "-c", code], timeout=DEADLINE)
    assert r.returncode == 3 and "truncated" in r.stdout, (r.returncode, r.stderr)
