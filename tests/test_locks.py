"""engine.locks: two real processes contend for one lock file; the refusal names the holder, a
waiter's deadline runs only while the holder makes no progress, a killed holder never blocks,
and a file system without locks is one line, not a traceback."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT
from engine.data.pack import PackError, pack_imagenet
from engine.errors import UserError
from engine.locks import Holder, LockError, acquire, flock_error_message

# The holder: takes the lock, says so, then either sleeps (no progress) or publishes progress
# every 50 ms for `hold` seconds, then exits (which releases the lock).
HOLDER = textwrap.dedent("""
    import sys, time
    from engine.locks import acquire
    path, mode, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lock = acquire(path)
    print("held", flush=True)
    end = time.monotonic() + hold
    n = 0
    while time.monotonic() < end:
        if mode == "progress":
            n += 1
            lock.note(done=n)
        time.sleep(0.05)
""")


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(mode="idle", hold=60.0):
        path = str(tmp_path / "x.lock")
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, path, mode, str(hold)],
                                stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT))
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return path, proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_second_process_is_refused_and_told_who_holds_it(holder):
    path, proc = holder()
    with pytest.raises(LockError) as info:
        acquire(path)
    msg = str(info.value)
    assert "pid %d on host %s" % (proc.pid, socket.gethostname()) in msg and path in msg
    assert isinstance(info.value, UserError) and "\n" not in msg

    class Busy(Exception):
        pass

    def refused(h: Holder) -> str:
        return "busy: %s" % h

    with pytest.raises(Busy, match="busy: pid %d" % proc.pid):  # the caller's own error class
        acquire(path, error=Busy, refused=refused)


def test_a_killed_holder_never_blocks_the_next_process(holder):
    path, proc = holder()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with acquire(path) as lock:
        assert not lock.waited
        assert os.path.exists(path)  # the file stays; only the flock went with its process
    assert lock.fd == -1


def test_a_waiter_refuses_once_the_holder_made_no_progress_for_the_deadline(holder):
    path, proc = holder("idle")
    seen = []
    t0 = time.monotonic()
    with pytest.raises(LockError, match="pid %d .*made no progress for 1 s" % proc.pid):
        acquire(path, timeout=1.0, poll=0.05, on_wait=seen.append)
    assert time.monotonic() - t0 >= 1.0
    assert [h.pid for h in seen] == [proc.pid]  # told once, when it started waiting
    assert proc.poll() is None  # the holder is untouched


def test_a_waiter_keeps_waiting_while_the_holder_progresses(holder):
    path, proc = holder("progress", hold=3.0)
    t0 = time.monotonic()
    with acquire(path, timeout=1.0, poll=0.05) as lock:
        waited = time.monotonic() - t0
        assert lock.waited and waited > 1.0  # past the deadline, because the note kept changing
        assert proc.wait(timeout=30) == 0


def test_waiting_without_a_deadline_takes_the_lock_when_the_holder_is_done(holder):
    path, proc = holder("idle", hold=1.0)
    with acquire(path, timeout=None) as lock:
        assert lock.waited
        assert proc.wait(timeout=30) == 0


def test_the_note_names_the_holder_and_carries_its_progress(tmp_path):
    path = str(tmp_path / "n.lock")
    with acquire(path) as lock:
        lock.note(bytes_done=123456789012)
        lock.note(bytes_done=1)  # shorter than before: no tail of the longer note shows
        with open(path) as f:
            note = json.loads(f.read().strip())
    assert note["pid"] == os.getpid() and note["host"] == socket.gethostname()
    assert note["started"] and note["bytes_done"] == 1
    assert str(Holder()) == "holder unknown"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP])
def test_a_file_system_without_locks_is_one_line_saying_what_to_do(code):
    # No file system here refuses flock, so the mapping is checked on the OSError flock raises
    # on one (Lustre without -o flock: EOPNOTSUPP/ENOTSUP; NFS without lockd: ENOLCK).
    msg = flock_error_message(OSError(code, os.strerror(code)), "/shared/out/.pack.lock")
    assert msg.startswith("cannot lock /shared/out/.pack.lock: its file system does not "
                          "support file locks")
    assert "local disk" in msg and "\n" not in msg


def test_other_flock_errors_read_like_any_disk_error():
    msg = flock_error_message(OSError(errno.EACCES, os.strerror(errno.EACCES)), "/x/.lock")
    assert msg == "cannot write /x/.lock: permission denied; choose a writable folder"


@pytest.fixture
def no_flock(monkeypatch):
    """flock answering as on Lustre mounted without -o flock."""
    import fcntl

    def flock(fd, op):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(fcntl, "flock", flock)


def test_acquire_on_such_a_file_system_raises_the_callers_error_and_closes_the_file(
        tmp_path, no_flock):
    before = set(os.listdir("/proc/self/fd"))
    for timeout in (0.0, 1.0, None):
        with pytest.raises(LockError, match="does not support file locks"):
            acquire(str(tmp_path / "l.lock"), timeout=timeout)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_a_pack_onto_such_a_file_system_is_a_pack_error(tiny_imagenet, tmp_path, no_flock):
    out = tmp_path / "p"
    with pytest.raises(PackError, match=r"cannot lock .*\.pack\.lock: its file system does not"):
        pack_imagenet(tiny_imagenet, str(out), workers=0, progress=False, log=lambda *a: None)


def test_a_lock_file_that_cannot_be_created_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(str(folder), os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(LockError, match="permission denied"):
            acquire(str(folder / "x.lock"))
    finally:
        folder.chmod(0o700)
