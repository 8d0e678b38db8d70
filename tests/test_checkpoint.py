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
from engine.models.weights import read_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_roundtrip_converts_tensors_to_numpy(tmp_path):
    import megengine as mge
    from collections import OrderedDict

    obj = {"epoch": 3, "state_dict": OrderedDict(w=mge.tensor(np.arange(4.0, dtype=np.float32))),
           "nested": [mge.tensor([1, 2])]}
    path = ckpt.dump(obj, str(tmp_path / "c.pkl"))
    # Plain pickle reads it: no MegEngine objects inside.
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert isinstance(raw["state_dict"], OrderedDict)
    assert isinstance(raw["state_dict"]["w"], np.ndarray)
    np.testing.assert_array_equal(read_file(path)["nested"][0], [1, 2])
    assert os.listdir(tmp_path) == ["c.pkl"]  # no temp file left behind


SAVER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, %r)
    from engine.checkpoint import dump
    i = 0
    while True:
        i += 1
        # every element equals the counter: a torn write would show as a mix or a short array
        dump({"i": i, "w": np.full(4_000_000, i, np.int64)}, sys.argv[1])
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
        latest = ckpt.file_in(str(tmp_path))
        assert latest == path
        obj = read_file(latest)
        assert obj["w"].shape == (4_000_000,) and (obj["w"] == obj["i"]).all()
    ckpt.clean_temp_files(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pkl", "saver.py"]


def test_partial_temp_file_is_ignored(tmp_path):
    ckpt.dump({"epoch": 1}, str(tmp_path / ckpt.FILE_NAME))
    # What a save killed mid-write leaves: a truncated temp file next to the good one.
    (tmp_path / (ckpt.TMP_PREFIX + ckpt.FILE_NAME + ".abc")).write_bytes(b"\x80\x04\x95trunc")
    assert ckpt.file_in(str(tmp_path)) == str(tmp_path / ckpt.FILE_NAME)
    assert read_file(ckpt.resolve_resume(str(tmp_path)))["epoch"] == 1
    ckpt.clean_temp_files(str(tmp_path))
    assert os.listdir(tmp_path) == [ckpt.FILE_NAME]


def test_unreadable_and_missing_checkpoints_are_user_errors(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"a": 1})[:-3])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        read_file(str(bad))
    with pytest.raises(UserError, match="not found"):
        read_file(str(tmp_path / "none.pkl"))
    with pytest.raises(UserError, match="nothing to resume"):
        ckpt.resolve_resume(str(tmp_path))
    with pytest.raises(UserError, match="no such file"):
        ckpt.resolve_resume(str(tmp_path / "none.pkl"))
    lst = tmp_path / "list.pkl"
    lst.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError, match="not a state dict"):
        read_file(str(lst))


def test_write_is_the_documented_layout_and_read_returns_it(tmp_path):
    """The bytes of write(Checkpoint) are the pickle of the documented dict, key order included
    (files of earlier engines and of this one are the same format), and read() gives it back."""
    from collections import OrderedDict

    sd = OrderedDict(w=np.arange(4.0, dtype=np.float32))
    config = {"arch": "resnet18", "classes": ["a", "b"], "batch_size": 4, "world_size": 1}
    written = ckpt.write(ckpt.Checkpoint(step=7, steps_per_epoch=3, model=sd, optimizer={"s": 1},
                                         config=config, scaler={"scale": 2.0}, ema=None,
                                         metrics={"best_top1": 50.0}), str(tmp_path / "a.pkl"))
    layout = {"format": "engine-checkpoint", "version": 2, "step": 7, "steps_per_epoch": 3,
              "state_dict": sd, "optimizer": {"s": 1}, "scaler": {"scale": 2.0}, "ema": None,
              "config": config, "metrics": {"best_top1": 50.0}}
    assert open(written, "rb").read() == open(ckpt.dump(layout, str(tmp_path / "b.pkl")), "rb").read()
    back = ckpt.read(written)
    assert (back.step, back.steps_per_epoch, back.config, back.metrics) == (7, 3, config, {"best_top1": 50.0})
    assert back.scaler == {"scale": 2.0} and back.ema is None and back.source == written
    np.testing.assert_array_equal(back.model["w"], sd["w"])


def test_read_refuses_foreign_newer_and_damaged_files(tmp_path):
    path = str(tmp_path / "c.pkl")
    ckpt.dump({"epoch": 90, "state_dict": {}}, path)  # an official train.py checkpoint
    with pytest.raises(UserError, match="not a checkpoint written by tools/train.py"):
        ckpt.read(path)
    base = {"format": ckpt.FORMAT, "state_dict": {}, "optimizer": {}, "config": {}}
    ckpt.dump(dict(base, version=3, step=1, steps_per_epoch=2), path)
    with pytest.raises(UserError, match="version 3 was written by a newer engine"):
        ckpt.read(path)
    ckpt.dump(dict(base, version=2, step=1), path)
    with pytest.raises(UserError, match="damaged: its 'steps_per_epoch' entry is None"):
        ckpt.read(path)
    ckpt.dump(dict(base, version=2, step=1, steps_per_epoch=2, optimizer=None), path)
    with pytest.raises(UserError, match="damaged: its 'optimizer' entry is a NoneType"):
        ckpt.read(path)


def test_version_1_is_read_as_its_step_and_epoch_length(tmp_path):
    path = str(tmp_path / "c.pkl")
    v1 = {"format": ckpt.FORMAT, "version": 1, "state_dict": {}, "optimizer": {}, "config": {}}
    ckpt.dump(dict(v1, epoch=2, step=23, loader={"epoch": 2, "position": 3}), path)
    assert (ckpt.read(path).step, ckpt.read(path).steps_per_epoch) == (23, 10)
    # the first epoch does not say how long it was: the same place, in the shortest epoch
    ckpt.dump(dict(v1, epoch=0, step=2, loader={"epoch": 0, "position": 2}), path)
    assert (ckpt.read(path).step, ckpt.read(path).steps_per_epoch) == (2, 3)


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
    from engine.models import load_model

    sd = resnet18_3cls.state_dict()
    obj = {"bare": sd, "official_train": {"epoch": 5, "state_dict": sd},
           "engine": _engine_ckpt(resnet18_3cls)}[wrap]
    path = ckpt.dump(obj, str(tmp_path / "w.pkl"))
    loaded = load_model("resnet18", path)
    assert loaded.num_classes == 3
    assert loaded.classes == (["n01", "n02", "n03"] if wrap == "engine" else None)
    for k, v in loaded.model.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


def test_load_model_names_arch_mismatch(tmp_path, resnet18_3cls):
    from engine.models import load_model

    eng = ckpt.dump(_engine_ckpt(resnet18_3cls), str(tmp_path / "e.pkl"))
    with pytest.raises(UserError, match="resnet18 checkpoint but --arch is resnet34"):
        load_model("resnet34", eng)
    bare = ckpt.dump(resnet18_3cls.state_dict(), str(tmp_path / "b.pkl"))
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
