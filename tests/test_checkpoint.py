"""Checkpoints: atomic saves survive kill -9, partial files are ignored, weight sources load
(official bare state dict, {"state_dict": ...}, engine checkpoints) with clear mismatch errors."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from engine import checkpoint as ckpt
from engine.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_roundtrip_converts_tensors_to_numpy(tmp_path):
    import megengine as mge
    from collections import OrderedDict

    obj = {"epoch": 3, "state_dict": OrderedDict(w=mge.tensor(np.arange(4.0, dtype=np.float32))),
           "nested": [mge.tensor([1, 2])]}
    path = ckpt.save_checkpoint(obj, str(tmp_path / "c.pkl"))
    # Plain pickle reads it: no MegEngine objects inside.
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert isinstance(raw["state_dict"], OrderedDict)
    assert isinstance(raw["state_dict"]["w"], np.ndarray)
    np.testing.assert_array_equal(ckpt.load_checkpoint(path)["nested"][0], [1, 2])
    assert os.listdir(tmp_path) == ["c.pkl"]  # no temp file left behind


SAVER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, %r)
    from engine.checkpoint import save_checkpoint
    i = 0
    while True:
        i += 1
        # every element equals the counter: a torn write would show as a mix or a short array
        save_checkpoint({"i": i, "w": np.full(4_000_000, i, np.int64)}, sys.argv[1])
        print(i, flush=True)
""")


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    path = str(tmp_path / "checkpoint.pkl")
    script = tmp_path / "saver.py"
    script.write_text(SAVER % ROOT)
    for delay in (0.05, 0.13, 0.29):
        proc = subprocess.Popen([sys.executable, str(script), path], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        try:
            assert proc.stdout.readline()  # at least one save completed
            time.sleep(delay)               # ... and now kill somewhere inside a later one
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        latest = ckpt.find_latest(str(tmp_path))
        assert latest == path
        obj = ckpt.load_checkpoint(latest)
        assert obj["w"].shape == (4_000_000,) and (obj["w"] == obj["i"]).all()
    ckpt.clean_temp_files(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pkl", "saver.py"]


def test_partial_temp_file_is_ignored(tmp_path):
    ckpt.save_checkpoint({"epoch": 1}, str(tmp_path / ckpt.LATEST))
    # What a save killed mid-write leaves: a truncated temp file next to the good one.
    (tmp_path / (ckpt.TMP_PREFIX + ckpt.LATEST + ".abc")).write_bytes(b"\x80\x04\x95trunc")
    assert ckpt.find_latest(str(tmp_path)) == str(tmp_path / ckpt.LATEST)
    assert ckpt.load_checkpoint(ckpt.resolve_resume(str(tmp_path)))["epoch"] == 1
    ckpt.clean_temp_files(str(tmp_path))
    assert os.listdir(tmp_path) == [ckpt.LATEST]


def test_unreadable_and_missing_checkpoints_are_user_errors(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"a": 1})[:-3])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(str(bad))
    with pytest.raises(UserError, match="not found"):
        ckpt.load_checkpoint(str(tmp_path / "none.pkl"))
    with pytest.raises(UserError, match="nothing to resume"):
        ckpt.resolve_resume(str(tmp_path))
    with pytest.raises(UserError, match="no such file"):
        ckpt.resolve_resume(str(tmp_path / "none.pkl"))
    lst = tmp_path / "list.pkl"
    lst.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError, match="not a state dict"):
        ckpt.load_checkpoint(str(lst))


# ------------------------------------------------------------------- weight sources -> model

@pytest.fixture(scope="module")
def resnet18_3cls():
    import megengine as mge
    from engine.models import get_model

    mge.random.seed(0)
    return get_model("resnet18", num_classes=3)


def _engine_ckpt(model, arch="resnet18", classes=("n01", "n02", "n03")):
    return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "epoch": 1,
            "state_dict": model.state_dict(),
            "config": {"arch": arch, "num_classes": len(classes), "classes": list(classes),
                       "image_size": 32}}


@pytest.mark.parametrize("wrap", ["bare", "official_train", "engine"])
def test_load_model_accepts_every_format(tmp_path, resnet18_3cls, wrap):
    from engine.evaluate import load_model

    sd = resnet18_3cls.state_dict()
    obj = {"bare": sd, "official_train": {"epoch": 5, "state_dict": sd},
           "engine": _engine_ckpt(resnet18_3cls)}[wrap]
    path = ckpt.save_checkpoint(obj, str(tmp_path / "w.pkl"))
    loaded = load_model("resnet18", path)
    assert loaded.num_classes == 3
    assert loaded.classes == (["n01", "n02", "n03"] if wrap == "engine" else None)
    for k, v in loaded.model.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


def test_load_model_names_arch_mismatch(tmp_path, resnet18_3cls):
    from engine.evaluate import load_model

    eng = ckpt.save_checkpoint(_engine_ckpt(resnet18_3cls), str(tmp_path / "e.pkl"))
    with pytest.raises(UserError, match="resnet18 checkpoint but --arch is resnet34"):
        load_model("resnet34", eng)
    bare = ckpt.save_checkpoint(resnet18_3cls.state_dict(), str(tmp_path / "b.pkl"))
    with pytest.raises(UserError, match="another architecture") as info:
        load_model("resnet34", bare)
    assert "\n" not in str(info.value)  # one line for the tools' error output


def test_label_map_for_class_mismatch():
    from engine.evaluate import label_map_for

    assert label_map_for(["a", "b", "c"], 3, ["a", "b", "c"]) is None
    # a subset of the model's classes (e.g. 10 ImageNet classes scored by a 1000-class model)
    np.testing.assert_array_equal(label_map_for(["a", "b", "c"], 3, ["a", "c"]), [0, 2])
    with pytest.raises(UserError, match="class mismatch.*e.g. z"):
        label_map_for(["a", "b", "c"], 3, ["a", "z"])
    with pytest.raises(UserError, match="model has 5 outputs but the data has 3"):
        label_map_for(None, 5, ["a", "b", "c"])
