"""`pip install .` (not editable) into a fresh virtualenv, then, from a folder outside the
checkout: a recipe by name, every tool as `python -m engine.tools.<name>` (--help, then make a
sample set, pack, verify, stage, train with a shipped recipe, test, classify), and the demo.

The virtualenv reuses the project environment's installed dependencies through a .pth line (no
network, no build isolation), so only the package itself is built and installed."""
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ["train", "test", "inference", "pack_imagenet", "verify_pack", "stage_shards",
         "make_sample_imagenet", "demo", "gpu_check"]


def checkout_files():
    """The files a clone of this checkout would hold (tracked or new, not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout (its file list is what `pip install .` gets)")
    return [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the package installed from a copy of the checkout, a folder
    outside both, an environment without PYTHONPATH)."""
    import shutil

    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    for f in checkout_files():  # a copy: the build writes build/ and *.egg-info into its tree
        os.makedirs(os.path.dirname(src / f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # MegEngine, numpy, setuptools, ... from this environment; not its engine (an editable
    # install is a .pth hook, and .pth files of a directory named in a .pth are not run)
    with open(os.path.join(site, "project-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                        "--no-build-isolation", "--no-index", "-q", str(src)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    work = base / "elsewhere"
    work.mkdir()
    return python, str(work), env


def run(installed, *args, timeout=600):
    python, work, env = installed
    r = subprocess.run([python, *map(str, args)], cwd=work, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


@pytest.mark.slow
def test_the_installed_package_is_not_the_checkout(installed):
    where = run(installed, "-c", "import engine, engine.data._jpegroi; print(engine.__file__)")
    assert "site-packages" in where and not where.startswith(ROOT)


@pytest.mark.slow
def test_a_shipped_recipe_by_name_from_another_folder(installed):
    out = run(installed, "-c", "from engine.config import load_recipe; "
                               "print(load_recipe('fast_resnet50_16ep')['arch'])")
    assert out.strip() == "resnet50"
    # the recipe's values are the defaults the help shows
    out = run(installed, "-m", "engine.tools.train", "--config", "fast_resnet50_16ep", "--help")
    assert "(default: resnet50)" in " ".join(out.split())


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_runs_as_a_module(installed, tool):
    out = run(installed, "-m", "engine.tools." + tool, "--help", timeout=120)
    assert out.startswith("usage: ")


@pytest.mark.slow
def test_sample_pack_verify_stage_train_test_classify(installed):
    tool = lambda name, *args: run(installed, "-m", "engine.tools." + name, *args)  # noqa: E731
    tool("make_sample_imagenet", "--out", "raw", "--classes", 2, "--train-per-class", 4,
         "--val-per-class", 2)
    tool("pack_imagenet", "--data", "raw", "--out", "packed", "--workers", 0, "--shard-size", 3,
         "--quiet")
    assert "0 mismatch(es)" in tool("verify_pack", "packed")
    tool("stage_shards", "packed", "local")
    out = tool("train", "--config", "fast_resnet18_16ep", "-d", "local", "--no-amp", "-b", 4,
               "--epochs", 1, "--warmup-epochs", 0, "--min-res", 32, "--max-res", 32,
               "--start-ramp", 0, "--end-ramp", 0, "--image-size", 32, "--val-image-size", 32,
               "-j", 0, "--no-progress", "--max-steps", 2, "--save", "run")
    assert "done: 2 steps" in out
    out = tool("test", "-d", "local", "-m", "run/checkpoint.pkl", "-j", 0, "-b", 4,
               "--no-progress")
    assert "on 4 images: top1" in out.splitlines()[-1]
    _python, work, _env = installed
    val = os.path.join(work, "raw", "val")
    cls = sorted(os.listdir(val))[0]
    image = os.path.join(val, cls, sorted(os.listdir(os.path.join(val, cls)))[0])
    out = tool("inference", "-m", "run/checkpoint.pkl", "-i", image)
    assert len(out.strip().splitlines()) == 2 and out.startswith("0: class = ")


@pytest.mark.slow
def test_the_demo_from_the_installed_package(installed):
    """The demo's every stage, at a tenth of its size (2 classes, 2 steps)."""
    out = run(installed, "-c", "from engine.tools.demo import DemoConfig, run_demo; "
                               "r = run_demo(DemoConfig(out='demo', epochs=1, workers=0, "
                               "classes=2, train_per_class=4, val_per_class=2, batch_size=4)); "
                               "print('top1', r.top1)")
    assert "== 5/5 classify" in out and out.strip().splitlines()[-1].startswith("top1 ")
