"""A run's config.json is a recipe of that run (--config run/config.json replays it) and records
the recipe, the command line, the versions and the start time; --no-eval needs no val/, and
--train-data / --val-data take the splits from different places."""
import dataclasses
import datetime
import json
import os
import shutil

import pytest

from helpers import make_imagenet

FLAGS = ["-b", "4", "--image-size", "32", "-j", "0", "--epochs", "1", "--max-steps", "1",
         "--no-trace", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rec")
    root = make_imagenet(str(d / "inet"), classes=2, train=4, val=1)
    train_only = str(d / "train_only")
    shutil.copytree(os.path.join(root, "train"), os.path.join(train_only, "train"))
    return {"root": root, "train_only": train_only, "dir": d}


def _options(config, drop=()):
    """A TrainConfig's options as a dict, without `drop`."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in drop}


def test_config_json_records_the_run_and_replays_as_a_recipe(data, capsys):
    import megengine as mge

    from engine.config import LAUNCH_KEYS, RUN_RECORD_KEYS, config_from_argv
    from engine.trainer import train

    recipe = data["dir"] / "recipe.json"
    recipe.write_text(json.dumps({"_source": "a note", "lr_schedule": "cosine",
                                  "label_smoothing": 0.1, "warmup_epochs": 0.5}))
    first = data["dir"] / "first"
    original = config_from_argv(["--config", str(recipe), "-d", data["train_only"], "--no-eval",
                                 "--save-dir", str(first)] + FLAGS)
    before = datetime.datetime.now().astimezone().replace(microsecond=0)
    result = train(original)  # --no-eval: the data has no val/
    assert result.steps == 1 and result.top1 is None
    saved = json.loads((first / "config.json").read_text())
    assert saved["recipe"] == str(recipe) and saved["label_smoothing"] == 0.1
    assert set(RUN_RECORD_KEYS) <= set(saved)
    assert saved["world_size"] == 1 and saved["classes"] == ["n00001000", "n00001001"]
    assert isinstance(saved["command"], str) and saved["command"]
    assert saved["versions"]["megengine"] == mge.__version__
    assert set(saved["versions"]) == {"engine", "megengine", "python", "cuda"}
    assert (saved["versions"]["cuda"] is None) == (not mge.is_cuda_available())
    started = datetime.datetime.fromisoformat(saved["started"])
    assert before <= started <= datetime.datetime.now().astimezone()

    capsys.readouterr()
    second = data["dir"] / "second"
    replay = config_from_argv(["--config", str(first / "config.json"), "--save-dir", str(second)])
    note = capsys.readouterr().err
    assert "is a run's record: replaying its options" in note and "--save-dir" in note
    # the same options, but for this launch's own (the save dir given here, no resume, this
    # machine's nodes) and the recipe it came from, which is this config.json
    drop = set(LAUNCH_KEYS) | {"recipe"}
    assert _options(replay, drop) == _options(original.finalized(), drop)
    assert replay.recipe == str(first / "config.json") and replay.save_dir == str(second)
    assert train(replay).steps == 1
    again = json.loads((second / "config.json").read_text())
    assert {k: again[k] for k in saved if k not in drop | set(RUN_RECORD_KEYS)} == \
        {k: saved[k] for k in saved if k not in drop | set(RUN_RECORD_KEYS)}


def test_the_train_tool_replays_a_config_json(data, capsys):
    from engine.tools.train import main

    run = data["dir"] / "tool"
    assert main(["-d", data["train_only"], "--no-eval", "--save-dir", str(run)] + FLAGS) == 0
    assert main(["--config", str(run / "config.json"), "--save-dir", str(run / "again")]) == 0
    assert "done: 1 steps" in capsys.readouterr().out


def test_train_and_val_from_different_places(data):
    from engine.data.pack import pack_imagenet
    from engine.errors import UserError
    from engine.metrics import read_jsonl
    from engine.trainer import train

    from engine.config import config_from_argv

    packed = str(data["dir"] / "packed")  # train packed here, val raw elsewhere
    pack_imagenet(data["root"], packed, splits=("train",), workers=1, shard_size=4,
                  progress=False, log=lambda *a: None)
    out = data["dir"] / "split"
    cfg = config_from_argv(["--train-data", os.path.join(packed, "train"), "--val-data",
                            os.path.join(data["root"], "val"), "--save-dir", str(out)] + FLAGS)
    result = train(cfg)
    assert result.top1 is not None
    evals = [r for r in read_jsonl(str(out / "metrics.jsonl")) if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["images"] == 2
    with pytest.raises(UserError, match="--val-data"):
        train(config_from_argv(["--train-data", os.path.join(packed, "train")] + FLAGS))
    with pytest.raises(UserError, match="--val-data: no such folder"):
        train(config_from_argv(["--train-data", os.path.join(packed, "train"), "--val-data",
                                str(data["dir"] / "nope")] + FLAGS))
    with pytest.raises(UserError, match=r"must hold train/ and val/.*--no-eval"):
        train(config_from_argv(["-d", data["train_only"]] + FLAGS))
