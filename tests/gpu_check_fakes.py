"""Stand-in stages for engine.tools.gpu_check_runner's tests: each runs in the child process
the runner starts, exactly as a real stage does, and behaves in one way a GPU stage can
(passes, fails, hangs with a child of its own, raises, dies of a signal)."""
import os
import signal
import subprocess
import sys
import time

from engine.errors import UserError
from engine.tools.gpu_check_report import Check


def passing():
    return [Check("a", True, "fine, 12 img/s", figures={"img_s": 12.0}),
            Check("b", True, "also fine")]


def failing():
    return [Check("c", False, "wrong sum on rank 1")]


def hanging(pid_file, seconds=600):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pid_file, "w") as f:
        f.write("%d %d" % (os.getpid(), child.pid))
    time.sleep(seconds)
    return [Check("h", True, "woke up")]


def raising():
    raise RuntimeError("CUDA error: an illegal memory access\n  was encountered")


def user_error():
    raise UserError("--data /x: no such folder")


def segfault():
    sys.stdout.write("about to crash\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGSEGV)


def silent_exit():
    os._exit(3)


def build_cpu():
    return [Check("build", True, "MegEngine 9.9, CUDA none",
                  figures={"nothing_to_check": True, "described": "MegEngine 9.9, CUDA none"})]


def build_gpu(usable=True):
    return [Check("build", True, "MegEngine 9.9, CUDA 11.8",
                  figures={"described": "MegEngine 9.9, CUDA 11.8", "megengine_gpus": 2}),
            Check("GPUs visible", True, "MegEngine sees 2 GPU(s)"),
            Check("CUDA driver vs build", usable, "the driver supports CUDA 12.2")]
