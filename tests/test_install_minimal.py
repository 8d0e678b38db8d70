"""`pip install .` with only the install requirements, then train (one epoch and its plot),
test and inference run: nothing outside `install_requires` is needed on the default path.

The virtualenv is offline: it gets the distributions that setup.py's install_requires name, and
what they require in turn, linked from the project environment (each distribution's own files,
as its RECORD lists them), and nothing else: no matplotlib, no tensorboardX, no scikit-image.
Only the package itself is built and installed (without build isolation: setuptools and wheel
come in as MegEngine requirements)."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig

import pytest

from helpers import make_imagenet
from test_install import checkout_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("matplotlib", "tensorboardX", "skimage", "PIL", "pytest")


def install_requires():
    """The requirement names of setup.py's install_requires, read from its source."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [re.split(r"[<>=!~;\[ ]", ast.literal_eval(e))[0] for e in node.value.elts]
    raise AssertionError("setup.py has no install_requires")


def closure(names):
    """The installed distributions `names` need, with their own requirements (extras left out),
    by normalised name."""
    found, todo = {}, list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        found[name] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[<>=!~;\[ (]", req.strip())[0])
    return found


def top_level(dist):
    """The entries a distribution puts directly into site-packages (packages, modules, its
    .dist-info, shared-library folders), from its RECORD."""
    names = set()
    for f in dist.files or []:
        parts = f.parts
        if parts and parts[0] != ".." and not parts[0].endswith(".pth") and parts[0] != "__pycache__":
            names.add(parts[0])
    return names


@pytest.fixture(scope="module")
def minimal(tmp_path_factory):
    """(python of a virtualenv with only the install requirements and the package, a folder
    outside the checkout, an environment without PYTHONPATH)."""
    import shutil

    base = tmp_path_factory.mktemp("minimal")
    src = base / "src"
    for f in checkout_files():
        os.makedirs(os.path.dirname(src / f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    dists = closure(install_requires())
    assert "megengine" in dists and not set(dists) & {"matplotlib", "tensorboardx"}, sorted(dists)
    for dist in dists.values():
        for name in top_level(dist):
            if os.path.exists(os.path.join(ours, name)) and not os.path.exists(os.path.join(site, name)):
                os.symlink(os.path.join(ours, name), os.path.join(site, name))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                        "--no-build-isolation", "--no-index", "-q", str(src)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    work = base / "elsewhere"
    work.mkdir()
    return python, str(work), env


def run(minimal, *args, timeout=600):
    python, work, env = minimal
    r = subprocess.run([python, *map(str, args)], cwd=work, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout, r.stderr


@pytest.mark.slow
def test_the_environment_holds_only_the_install_requirements(minimal):
    out, _ = run(minimal, "-c", "import importlib.util as u; print([m for m in %r if u.find_spec(m)])"
                 % (OPTIONAL,))
    assert out.strip() == "[]"


@pytest.mark.slow
def test_train_test_and_inference_with_only_the_install_requirements(minimal, tmp_path):
    root = make_imagenet(str(tmp_path / "inet"), classes=2, train=4, val=1)
    run_dir = str(tmp_path / "run")
    out, err = run(minimal, "-m", "engine.tools.train", "-d", root, "-b", 4, "--image-size", 32,
                   "-j", 0, "--epochs", 1, "--no-progress", "--save", run_dir)
    assert "done: 2 steps" in out
    assert "curves.png is not drawn: it needs matplotlib" in err
    ckpt = os.path.join(run_dir, "checkpoint.pkl")
    out, _ = run(minimal, "-m", "engine.tools.test", "-d", root, "-m", ckpt, "-j", 0,
                 "--no-progress")
    assert "on 2 images: top1" in out.splitlines()[-1]
    val = os.path.join(root, "val", "n00001000")
    out, _ = run(minimal, "-m", "engine.tools.inference", "-m", ckpt, "-i",
                 os.path.join(val, sorted(os.listdir(val))[0]))
    assert out.startswith("0: class = ")
