"""A recipe made for one GPU count, run on another: the run says in one line what the global batch
and LR become, and --keep-global-batch keeps the recipe's global batch and LR instead."""
import json
import os
import subprocess
import sys

import pytest

from helpers import make_imagenet
from engine.config import TrainConfig, config_from_argv
from engine.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_ffcv_one_gpu_recipe_on_eight_gpus_says_what_it_becomes():
    cfg = config_from_argv(["-d", "D", "--config", "fast_resnet18_16ep"])
    same, note = cfg.for_world_size(8)
    assert same == cfg
    assert note == ("note: --batch-size 1024 and --lr 0.5 were set for 1 GPU (global batch 1024 "
                    "at LR 0.5); on 8 GPUs the global batch becomes 8192 at LR 4 (per-GPU values "
                    "kept, LR x 8 GPUs); --keep-global-batch keeps 1024 at LR 0.5 instead")
    assert cfg.for_world_size(1) == (cfg, None)  # the count it was made for: nothing to say


def test_keep_global_batch_rescales_the_per_gpu_values():
    cfg = config_from_argv(["-d", "D", "--config", "fast_resnet18_16ep", "--keep-global-batch"])
    kept, note = cfg.for_world_size(8)
    assert (kept.batch_size, kept.learning_rate, kept.recipe_world_size) == (128, 0.0625, 8)
    assert kept.batch_size * 8 == 1024 and kept.learning_rate * 8 == pytest.approx(0.5)
    assert "--keep-global-batch: on 8 GPUs that is 128 per GPU, the same global batch 1024 " \
           "at LR 0.5" in note
    r50 = config_from_argv(["-d", "D", "--config", "fast_resnet50_16ep", "--keep-global-batch"])
    one, _ = r50.for_world_size(1)  # FFCV's 8-GPU recipe on one GPU
    assert (one.batch_size, one.learning_rate) == (4096, pytest.approx(1.7))
    with pytest.raises(UserError, match="global batch 1024 .* does not divide over 3 GPUs"):
        cfg.for_world_size(3)


def test_without_a_recorded_world_size_nothing_changes():
    cfg = TrainConfig(data="D")
    assert cfg.recipe_world_size is None
    assert cfg.for_world_size(16) == (cfg, None)
    with pytest.raises(UserError, match="--recipe-world-size must be >= 1"):
        TrainConfig(data="D", recipe_world_size=0).finalized()


def test_a_run_says_it_and_keeps_the_global_batch(tmp_path):
    """The trainer on this machine's world size (one CPU process) with a recipe made for 2."""
    root = make_imagenet(str(tmp_path / "inet"), classes=2, train=8, val=1)
    recipe = tmp_path / "two_gpus.json"
    recipe.write_text(json.dumps({"_source": "a recipe for 2 GPUs", "recipe_world_size": 2,
                                  "batch_size": 4, "learning_rate": 0.05, "arch": "resnet18",
                                  "image_size": 32, "epochs": 1, "workers": 0}))
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train.py"), "--config", str(recipe),
         "--data", root, "--save-dir", str(run), "--max-steps", "1", "--no-progress",
         "--keep-global-batch"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr
    notes = [line for line in p.stderr.splitlines() if line.startswith("note: --batch-size")]
    assert notes == ["note: --batch-size 4 and --lr 0.05 were set for 2 GPUs (global batch 8 at "
                     "LR 0.1); --keep-global-batch: on 1 GPU that is 8 per GPU, the same global "
                     "batch 8 at LR 0.1"], p.stderr
    with open(run / "config.json") as f:
        saved = json.load(f)
    assert (saved["batch_size"], saved["learning_rate"], saved["world_size"]) == (8, 0.1, 1)
    assert saved["recipe_world_size"] == 1
