"""TensorBoardSink: metrics.jsonl records become tagged scalars that read back exactly; the
missing-package error names the install command; disabled sinks write nothing."""
import math
import os
import sys

import pytest

from engine.errors import ConfigError
from engine.tensorboard import INSTALL_HINT, TensorBoardSink, read_scalars

RECORDS = [
    {"kind": "train", "epoch": 0, "step": 20, "loss": 6.5, "lr": 0.0125, "img_s": 812.5,
     "data_wait": 0.03},
    {"kind": "train", "epoch": 0, "step": 40, "loss": 6.25, "lr": 0.025, "img_s": 820.0,
     "data_wait": 0.01},
    {"kind": "eval", "epoch": 0, "step": 40, "top1": 1.5, "top5": 5.25, "loss": 6.0,
     "images": 50000},
    {"kind": "train", "step": 60, "loss": float("nan"), "note": "text", "flag": True, "v": None},
]


def test_records_round_trip_through_event_files(tmp_path):
    pytest.importorskip("tensorboardX")
    log_dir = str(tmp_path / "tb")
    with TensorBoardSink(log_dir) as sink:
        counts = [sink.write(r) for r in RECORDS]
    assert counts == [5, 5, 5, 1]                    # strings, bools and None are skipped
    scalars = read_scalars(log_dir)
    assert scalars["train/loss"][:2] == [(20, 6.5), (40, 6.25)]
    assert math.isnan(scalars["train/loss"][2][1]) and scalars["train/loss"][2][0] == 60
    # stored as float32 (TensorBoard's simple_value)
    assert [s for s, _ in scalars["train/lr"]] == [20, 40]
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([0.0125, 0.025], rel=1e-7)
    assert scalars["eval/top1"] == [(40, 1.5)] and scalars["eval/top5"] == [(40, 5.25)]
    assert scalars["eval/loss"] == [(40, 6.0)] and scalars["eval/images"] == [(40, 50000.0)]
    assert scalars["train/epoch"] == [(20, 0.0), (40, 0.0)]
    assert not any(t.endswith(("/kind", "/step", "/note", "/flag", "/v")) for t in scalars)


def test_record_without_step_is_refused(tmp_path):
    pytest.importorskip("tensorboardX")
    with TensorBoardSink(str(tmp_path)) as sink:
        with pytest.raises(ConfigError, match="step"):
            sink.write({"kind": "train", "loss": 1.0})


def test_disabled_sink_writes_nothing(tmp_path):
    log_dir = tmp_path / "rank1"
    sink = TensorBoardSink(str(log_dir), enabled=False)
    assert sink.write(RECORDS[0]) == 0
    sink.close()
    assert not log_dir.exists()


def test_missing_tensorboardx_is_a_config_error_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)   # makes `import tensorboardX` fail
    with pytest.raises(ConfigError) as err:
        TensorBoardSink(str(tmp_path / "tb"))
    assert str(err.value) == INSTALL_HINT
    assert "pip install tensorboardX" in INSTALL_HINT and ".[tensorboard]" in INSTALL_HINT
    assert not os.path.exists(tmp_path / "tb")


def test_resumed_run_purges_the_steps_it_redoes(tmp_path):
    pytest.importorskip("tensorboardX")
    log_dir = str(tmp_path / "tb")
    with TensorBoardSink(log_dir) as sink:               # the first run got to step 60
        for step in (20, 40, 60):
            sink.write({"kind": "train", "step": step, "loss": 10.0 - step / 10})
    with TensorBoardSink(log_dir, purge_step=40) as sink:  # resumed from a checkpoint at 40
        for step in (40, 60, 80):
            sink.write({"kind": "train", "step": step, "loss": 1.0 - step / 100})
    got = read_scalars(log_dir)["train/loss"]
    assert [s for s, _ in got] == [20, 40, 60, 80]
    assert [v for _, v in got] == pytest.approx([8.0, 0.6, 0.4, 0.2])
