"""Fine-tuning: --pretrained and --weights start a new run from published weights, an engine
checkpoint or an official MegEngine file, with a new classifier head when the data's classes are
not the weights' (said in one line), and are refused beside --resume."""
import os

import numpy as np
import pytest

from helpers import make_imagenet


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 3-class and a 2-class data set, the checkpoint of a 3-class run, an official file."""
    from engine.checkpoint import dump
    from engine.config import TrainConfig
    from engine.models import get_model
    from engine.trainer import train

    d = tmp_path_factory.mktemp("ft")
    three = make_imagenet(str(d / "three"), classes=3, train=2, val=1)
    two = make_imagenet(str(d / "two"), classes=2, train=2, val=1, seed=7)
    run = train(TrainConfig(data=three, batch_size=4, image_size=32, workers=0,
                            save_dir=str(d / "run"), epochs=1, max_steps=1, evaluate=False,
                            trace=False, progress=False))
    official = dump(get_model("resnet18").state_dict(), str(d / "resnet18_official.pkl"))
    return {"three": three, "two": two, "ckpt": run.checkpoint, "official": official, "dir": d}


def _cfg(data, **kw):
    from engine.config import TrainConfig

    return TrainConfig(data=data, batch_size=4, image_size=32, workers=0, epochs=1,
                       progress=False, trace=False, **kw)


def _fresh(num_classes, arch="resnet18"):
    import megengine as mge

    from engine.models import get_model

    mge.random.seed(1)
    model = get_model(arch, num_classes=num_classes)
    return model, {k: v.copy() for k, v in model.state_dict().items()}


def _classes(root):
    return sorted(os.listdir(os.path.join(root, "train")))


def _state(path):
    from engine.models.weights import read_file, unwrap

    return dict(unwrap(read_file(path)).state)


def test_weights_of_an_engine_checkpoint_with_other_classes_get_a_new_head(files, capsys):
    from engine.finetune import start_from

    model, fresh = _fresh(2)
    assert start_from(model, _cfg(files["two"], weights=files["ckpt"]), _classes(files["two"])) \
        == files["ckpt"]
    saved, now = _state(files["ckpt"]), model.state_dict()
    for k in now:
        want = fresh[k] if k.startswith("fc.") else saved[k]
        np.testing.assert_array_equal(now[k], want, err_msg=k)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and files["ckpt"] in lines[0], lines
    assert "they score 3 classes, the data has 2" in lines[0]
    assert "classifier head (fc) starts fresh" in lines[0]


def test_weights_of_the_same_classes_keep_their_head(files, capsys):
    from engine.finetune import start_from

    model, _ = _fresh(3)
    start_from(model, _cfg(files["three"], weights=files["ckpt"]), _classes(files["three"]))
    saved = _state(files["ckpt"])
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, saved[k], err_msg=k)
    assert "the classifier head too" in capsys.readouterr().err
    # the same count of other classes: the head would score the wrong ones
    model, fresh = _fresh(3)
    start_from(model, _cfg(files["three"], weights=files["ckpt"]), ["x", "y", "z"])
    np.testing.assert_array_equal(model.state_dict()["fc.weight"], fresh["fc.weight"])
    assert "3 other classes than the data's" in capsys.readouterr().err


def test_an_official_file_and_the_published_weights(files, tmp_path, monkeypatch, capsys):
    import shutil

    from engine.finetune import start_from
    from engine.models import pretrained_cache_path

    official = _state(files["official"])
    for cfg in (_cfg(files["three"], weights=files["official"]),
                _cfg(files["three"], pretrained=True)):
        if cfg.pretrained:  # published weights, from megengine.hub's cache (this machine is
            monkeypatch.setenv("MGE_HOME", str(tmp_path / "mge"))  # offline): pre-placed here
            monkeypatch.setenv("ENGINE_SKIP_WEIGHTS_HASH", "1")  # a stand-in, not the real file
            os.makedirs(os.path.dirname(pretrained_cache_path("resnet18")))
            shutil.copy(files["official"], pretrained_cache_path("resnet18"))
        model, fresh = _fresh(3)
        start_from(model, cfg, _classes(files["three"]))
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v, fresh[k] if k.startswith("fc.") else official[k],
                                          err_msg=k)
        err = capsys.readouterr().err
        assert "they score 1000 classes, the data has 3" in err, err
    assert "the published resnet18 weights" in err


def test_weights_that_do_not_fit_are_refused_naming_both(files, tmp_path):
    from engine.checkpoint import FORMAT, VERSION, dump
    from engine.errors import UserError
    from engine.finetune import start_from

    r34, _ = _fresh(3, "resnet34")  # resnet18 weights into a resnet34
    with pytest.raises(UserError, match="do not fit the model.*another architecture"):
        start_from(r34, _cfg(files["three"], arch="resnet34", weights=files["official"]),
                   _classes(files["three"]))
    model, _ = _fresh(3)
    other = dump({"format": FORMAT, "version": VERSION, "state_dict": _state(files["ckpt"]),
                  "config": {"arch": "resnet50"}}, str(tmp_path / "r50.pkl"))
    with pytest.raises(UserError, match="is a resnet50 checkpoint but --arch is resnet18"):
        start_from(model, _cfg(files["three"], weights=other), _classes(files["three"]))


def test_fine_tuning_is_refused_beside_a_resume(files):
    from engine.errors import UserError

    for kw, needle in [(dict(weights=files["ckpt"], resume=files["ckpt"]), "--weights starts"),
                       (dict(pretrained=True, resume=files["ckpt"]), "--pretrained starts"),
                       (dict(pretrained=True, weights=files["ckpt"]), "pass one"),
                       (dict(weights=str(files["dir"] / "nope.pkl")), "no such file")]:
        with pytest.raises(UserError, match=needle):
            _cfg(files["two"], **kw).finalized()


def test_a_fine_tuning_run_trains_and_records_its_weights(files, capsys):
    from engine.models.weights import read_file
    from engine.trainer import train

    out = files["dir"] / "tuned"
    result = train(_cfg(files["two"], weights=files["ckpt"], max_steps=1, save_dir=str(out)))
    assert result.steps == 1 and result.top1 is not None and result.num_classes == 2
    assert "fine-tuning from %s" % files["ckpt"] in capsys.readouterr().err
    config = read_file(result.checkpoint)["config"]
    assert config["weights"] == files["ckpt"] and config["pretrained"] is False
    assert read_file(result.checkpoint)["step"] == 1  # a new run: its own step count
