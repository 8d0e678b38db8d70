"""Files the engine writes get the mode the umask gives any other file, so teammates can read a
shared pack or run; a file this user may not read is a one-line error that names it."""
import os
import stat
import tempfile

import numpy as np
import pytest

from helpers import make_imagenet


def _modes(folder):
    """{path relative to folder: permission bits} of every regular file below it."""
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_atomic_write_replaces_a_private_file_with_the_umask_mode(tmp_path):
    from engine.atomic import atomic_write

    path = tmp_path / "f.json"
    path.write_text("old")
    os.chmod(path, 0o600)
    old = os.umask(0o027)
    try:
        atomic_write(str(path), lambda f: f.write(b"new"))
    finally:
        os.umask(old)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
def test_pack_and_run_files_follow_the_umask(tmp_path, umask):
    from engine.config import TrainConfig
    from engine.data.pack import pack_imagenet
    from engine.trainer import train

    want = 0o666 & ~umask
    raw = make_imagenet(str(tmp_path / "raw"), classes=2, train=2, val=1)
    out = str(tmp_path / "packed")
    pack_imagenet(raw, out, workers=1, shard_size=2, progress=False, log=lambda *a: None)
    packed = _modes(out)
    assert {"train/meta.json", "train/plan.json", "val/meta.json",
            "train/shard-00000.lmdb"} <= set(packed), sorted(packed)
    assert {k: v for k, v in packed.items() if v != want} == {}, oct(want)

    run = tmp_path / "run"
    train(TrainConfig(data=out, batch_size=2, image_size=32, workers=0, save_dir=str(run),
                      epochs=1, max_steps=1, evaluate=False, trace=False, progress=False))
    written = _modes(str(run))
    assert {"config.json", "checkpoint.pkl", "metrics.jsonl"} <= set(written), sorted(written)
    assert {k: v for k, v in written.items() if v != want} == {}, oct(want)


# ---------------------------------------------------------------- unreadable: one line naming it

def _as_another_user(fn):
    """fn()'s exception as (is a UserError, message), run where the files are not readable: in
    a forked child switched to the nobody user when this runs as root (root reads everything),
    else in this process (the files are then made unreadable to their owner)."""
    from engine.errors import UserError

    if os.geteuid() != 0:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return isinstance(exc, UserError), str(exc)
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                fn()
                result = "none\0"
            except Exception as exc:  # noqa: BLE001
                result = "%s\0%s" % (int(isinstance(exc, UserError)), exc)
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read().decode()
    os.waitpid(pid, 0)
    flag, _, message = data.partition("\0")
    return None if flag == "none" else (flag == "1", message)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A pack and a checkpoint in a folder every user may enter (pytest's own are 0700)."""
    from engine import checkpoint as ckpt
    from engine.data.pack import pack_imagenet
    from engine.models import get_model

    base = tempfile.mkdtemp(prefix="engine-modes-")
    os.chmod(base, 0o755)
    raw = make_imagenet(str(tmp_path_factory.mktemp("m") / "raw"), classes=2, train=2, val=1)
    old = os.umask(0o022)
    try:
        out = os.path.join(base, "packed")
        pack_imagenet(raw, out, workers=1, shard_size=2, progress=False, log=lambda *a: None)
        model = get_model("resnet18", num_classes=2)
        path = ckpt.write(ckpt.Checkpoint(
            step=1, steps_per_epoch=1, model=model.state_dict(), optimizer={},
            config={"arch": "resnet18", "classes": ["a", "b"], "num_classes": 2}),
            os.path.join(base, "run", ckpt.FILE_NAME))
    finally:
        os.umask(old)
    yield out, path
    import shutil

    shutil.rmtree(base, ignore_errors=True)


def _closed(path, mode):
    """Make `path` unreadable to other users (and to its owner when not root)."""
    os.chmod(path, mode if os.geteuid() == 0 else 0)


def _reopen(path, mode):
    os.chmod(path, mode)


@pytest.mark.parametrize("what", ["meta.json", "shard-00000.lmdb", "split folder"])
def test_an_unreadable_pack_file_is_one_line_naming_it(shared, what):
    from engine.data import Loader

    packed, _ = shared
    split = os.path.join(packed, "train")
    target = split if what == "split folder" else os.path.join(split, what)
    mode = stat.S_IMODE(os.stat(target).st_mode)
    _closed(target, 0o700 if what == "split folder" else 0o600)
    try:
        got = _as_another_user(lambda: Loader(split, batch_size=1, train=False, workers=0))
    finally:
        _reopen(target, mode)
    assert got is not None, "the pack was readable"
    is_user_error, message = got
    assert is_user_error and "\n" not in message, message
    assert "cannot read %s: permission denied" % target in message, message
    assert "chmod" in message


def test_an_unreadable_checkpoint_is_one_line_naming_it(shared):
    from engine import checkpoint as ckpt
    from engine.models import load_model

    _, path = shared
    _closed(path, 0o600)
    try:
        for read in (lambda: ckpt.read(path), lambda: load_model("resnet18", path)):
            got = _as_another_user(read)
            assert got is not None, "the checkpoint was readable"
            is_user_error, message = got
            assert is_user_error and "\n" not in message, message
            assert "cannot read %s: permission denied" % path in message, message
            assert "owner uid" in message and "chmod a+r" in message
    finally:
        _reopen(path, 0o644)
    assert np.isfinite(ckpt.read(path).step)
