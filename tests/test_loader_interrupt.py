"""Ctrl-C at random moments while Loaders start their workers and serve batches, and Ctrl-C that
lands inside a finaliser: one line, exit 130, no process left. Programs in subprocesses with a
deadline (a hang is a failure)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import left_in_group, make_imagenet
from engine.data.pack import pack_imagenet

DEADLINE = 60  # seconds; only catches a hang, never measures speed

# Loaders are opened and closed over and over, so that the interrupts also fall into the forks
# of their workers, not only into the steady state.
PROGRAM = """
import sys
from engine.data import Loader
from engine.errors import run_tool

def body():
    print("ready", flush=True)
    while True:
        with Loader(sys.argv[1], batch_size=4, train=True, workers=2, image_size=32) as ld:
            for i, _ in enumerate(ld):
                if i == 2:
                    break

sys.exit(run_tool(body))
"""


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = make_imagenet(str(tmp_path_factory.mktemp("li") / "r"), classes=2, train=12, val=2)
    out = tmp_path_factory.mktemp("li-p") / "p"
    pack_imagenet(root, str(out), workers=0, shard_size=6, progress=False, log=lambda *a: None)
    return str(out / "train")


def ctrl_c(argv, delay):
    """Run a program that prints "ready", send its process group SIGINT `delay` s after that
    line, as a terminal's Ctrl-C does, and return (the process, its stderr) once it ended
    (killed if it outlived DEADLINE)."""
    proc = subprocess.Popen([sys.executable] + argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc, stderr


def test_ctrl_c_while_loaders_start_and_run_is_one_line(split, tmp_path):
    program = tmp_path / "loop.py"
    program.write_text(PROGRAM)
    rng = random.Random(5)
    for trial in range(10):
        delay = rng.uniform(0, 1.5)
        proc, stderr = ctrl_c([str(program), split], delay)
        what = "trial %d: SIGINT %.2f s after the start" % (trial, delay)
        assert (proc.returncode, stderr.strip()) == (130, "interrupted"), (what, stderr)
        end = time.monotonic() + 10
        while left_in_group(proc.pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert not left_in_group(proc.pid), what


# A loop that spends nearly all its time in a __del__: Python drops a KeyboardInterrupt raised
# inside a finaliser ("Exception ignored in ..."), so without run_tool's redelivery the SIGINT
# is lost and the loop runs on. Multiprocessing's Connection.__del__ is where a Loader loop met it.
FINALISER_PROGRAM = """
import sys
from engine.errors import run_tool

class Slow:
    def __del__(self):
        sum(range(20000))

def body():
    print("ready", flush=True)
    while True:
        Slow()

sys.exit(run_tool(body))
"""


def test_ctrl_c_that_lands_in_a_finaliser_still_stops_the_tool(tmp_path):
    program = tmp_path / "finaliser.py"
    program.write_text(FINALISER_PROGRAM)
    for trial in range(3):
        proc, stderr = ctrl_c([str(program)], 0.2)
        assert (proc.returncode, stderr.strip()) == (130, "interrupted"), (trial, stderr)
