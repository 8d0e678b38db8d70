"""A missing optional package never stops a run: without matplotlib a run trains through its
epochs and says once that curves.png is not drawn; the default path never imports tensorboardX,
and --tensorboard without it is one line before any work. Here the packages are hidden from a
fresh interpreter; test_install_minimal.py installs into a virtualenv that never had them."""
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import make_imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs each tool's main in one interpreter in which matplotlib and tensorboardX do not exist.
SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    class Hidden(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("matplotlib", "tensorboardX"):
                raise ModuleNotFoundError("No module named %r" % name, name=name)
            return None

    sys.meta_path.insert(0, Hidden())
    import importlib, json
    for tool, argv in json.loads(sys.argv[1]):
        status = importlib.import_module("engine.tools." + tool).main(argv)
        print("status %s %d" % (tool, status), flush=True)
    print("imported", sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "tensorboardX")))
""")


def run_hidden(*calls, timeout=600):
    import json

    p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(calls)], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout, p.stderr


def test_train_test_and_inference_without_matplotlib_or_tensorboardx(tmp_path):
    root = make_imagenet(str(tmp_path / "inet"), classes=2, train=4, val=1)
    run = str(tmp_path / "run")
    image = os.path.join(root, "val", "n00001000", sorted(os.listdir(
        os.path.join(root, "val", "n00001000")))[0])
    train = ["-d", root, "-b", "4", "--image-size", "32", "-j", "0", "--epochs", "2",
             "--no-trace", "--no-progress", "--save", run]
    out, err = run_hidden(
        ["train", train],
        ["test", ["-d", root, "-m", os.path.join(run, "checkpoint.pkl"), "-j", "0",
                  "--no-progress"]],
        ["inference", ["-m", os.path.join(run, "checkpoint.pkl"), "-i", image]],
        ["train", train + ["--tensorboard", "--save", str(tmp_path / "tb")]])
    assert "status train 0" in out and "done: 4 steps" in out  # both epochs, past the plots
    assert "status test 0" in out and "on 2 images: top1" in out
    assert "status inference 0" in out and "0: class = " in out
    assert err.count("curves.png is not drawn: it needs matplotlib (pip install matplotlib") == 1
    assert not os.path.exists(os.path.join(run, "curves.png"))
    assert os.path.exists(os.path.join(run, "checkpoint.pkl"))
    # --tensorboard asks for tensorboardX: one line, status 2, before a step is taken
    assert "status train 2" in out
    assert "error: TensorBoard logging needs tensorboardX: pip install tensorboardX" in err
    assert not os.path.exists(str(tmp_path / "tb" / "checkpoint.pkl"))
    assert out.strip().splitlines()[-1] == "imported []"
