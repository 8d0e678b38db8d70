"""Ctrl-C at random moments of a real pack: one line, exit 130, no process left, and the rerun
resumes to the same pack. Each run is a subprocess with a deadline (a hang is a failure)."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, left_in_group, make_imagenet
from engine.data import shards
from engine.data.verify import verify

TOOL = os.path.join(ROOT, "tools", "pack_imagenet.py")
DEADLINE = 120  # seconds; only catches a hang, never measures speed
INTERRUPTED = "interrupted; rerun to resume"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("irq") / "r"), classes=3, train=24, val=4)


def pack_cmd(data, out):
    return [sys.executable, TOOL, "--data", str(data), "--out", str(out), "--quiet",
            "--workers", "2", "--shard-size", "6"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """A pack never interrupted, and how long one takes from start to exit (the span in which
    the interrupts fall)."""
    out = tmp_path_factory.mktemp("irq-ref") / "p"
    t0 = time.monotonic()
    r = subprocess.run(pack_cmd(data, out), capture_output=True, text=True, timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    return out, time.monotonic() - t0


def records(split_dir):
    return list(shards.Split(str(split_dir)))


# The modules a tool program runs before it defers Ctrl-C (engine.tools, first thing).
STARTUP = ("tools/pack_imagenet.py", "engine/__init__.py", "engine/tools/__init__.py",
           "engine/errors.py")


def before_the_tool(code, stderr):
    """Whether the interrupt came before the tool could answer it, while CPython started: killed
    by SIGINT before Python installs its handler (the shell reports 130, nothing is printed),
    Python's fatal error for an interrupted import of its site module, or a KeyboardInterrupt
    raised before the first engine module had finished loading."""
    if code == -signal.SIGINT and stderr == "":
        return True
    if code == 1 and "Fatal Python error: init_import_site" in stderr:
        return True
    if code == -signal.SIGINT and stderr.rstrip().endswith("KeyboardInterrupt"):
        files = re.findall(r'File "([^"]+)"', stderr)
        return all(f.startswith("<frozen") or f.endswith(STARTUP)
                   or re.search(r"__editable__.*_finder\.py$", f) for f in files)
    return False


def interpreter_start():
    """Seconds this interpreter takes to start and exit doing nothing (the fastest of 3)."""
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=DEADLINE)
        times.append(time.monotonic() - t0)
    return min(times)


def interrupt_once(cmd, delay, whole_group):
    """Start the pack, send SIGINT after `delay` s (to its process group, as a terminal's Ctrl-C
    does, or to the packer alone), and check how it ended. Returns its exit status."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        time.sleep(delay)
        try:
            (os.killpg if whole_group else os.kill)(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass  # it had finished
        _, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    what = "SIGINT to the %s after %.2f s" % ("group" if whole_group else "packer", delay)
    if proc.returncode == 0:  # the pack was over before the interrupt
        assert stderr.strip() == "", (what, stderr)
    elif before_the_tool(proc.returncode, stderr):
        pass
    else:
        assert proc.returncode == 130, (what, proc.returncode, stderr)
        assert stderr.strip() == INTERRUPTED, (what, stderr)
    end = time.monotonic() + 10  # children killed as the packer exits are reaped by init
    while left_in_group(proc.pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert not left_in_group(proc.pid), (what, "processes left", left_in_group(proc.pid))
    return proc.returncode


def interrupted_chain(data, reference, out, seed, trials):
    """`trials` interrupted runs into one --out, each a rerun of the previous, then a run to the
    end: the result is the uninterrupted pack, and it verifies."""
    ref, span = reference
    rng = random.Random(seed)
    cmd = pack_cmd(data, out)
    start = interpreter_start()  # moments before that fall into CPython, not into the tool
    codes = [interrupt_once(cmd, rng.uniform(start, span * 1.1),
                            whole_group=rng.random() < 0.7) for _ in range(trials)]
    assert 130 in codes  # the moments did fall inside packs
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    for split in ("train", "val"):
        assert records(os.path.join(out, split)) == records(os.path.join(ref, split))
        left = os.listdir(os.path.join(out, split))
        assert not [f for f in left if ".tmp" in f or f == ".pack"], left
    assert [rep.mismatches for rep in verify(str(out))] == [[], []]


@pytest.mark.parametrize("seed", [1, 2])
def test_ctrl_c_at_random_moments_is_one_line_and_the_rerun_resumes(data, reference, tmp_path,
                                                                    seed):
    interrupted_chain(data, reference, tmp_path / "p", seed, trials=10)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 16))
def test_ctrl_c_at_many_more_random_moments(data, reference, tmp_path, seed):
    interrupted_chain(data, reference, tmp_path / "p", seed, trials=15)
