"""engine.dist.group without GPUs: the evaluation's one all-reduce, with a CPU stand-in for
the collective, counts every image exactly once across ranks."""
import os

import numpy as np
import pytest


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    from helpers import make_imagenet

    root = make_imagenet(str(tmp_path_factory.mktemp("ev") / "inet"), classes=3, train=1, val=3)
    return os.path.join(root, "val")  # 9 images


def _eval_as_rank(monkeypatch, val_split, rank, world, others=None):
    """run_eval as `rank` of `world`, with a CPU stand-in for the one all-reduce: it records
    this rank's vector and adds `others` (what the other ranks would contribute)."""
    import megengine as mge

    from engine import dist
    from engine.data import Loader
    from engine.evaluate import run_eval
    from engine.models import get_model
    from engine.steps import EvalStep

    calls = []

    def fake_all_reduce_sum(values):
        calls.append(np.asarray(values, np.float64))
        return calls[-1] + (0 if others is None else np.asarray(others, np.float64))

    monkeypatch.setattr(dist, "all_reduce_sum", fake_all_reduce_sum)
    mge.random.seed(0)
    model = get_model("resnet18", num_classes=3)
    model.eval()
    step = EvalStep(model, num_classes=3, trace=False)
    loader = Loader(val_split, batch_size=2, train=False, image_size=32, workers=0, rank=rank,
                    world_size=world)
    try:
        result = run_eval(step, loader)
    finally:
        loader.close()
    return result, calls


@pytest.mark.parametrize("world", [2, 4])
def test_eval_counts_every_image_exactly_once(monkeypatch, val_split, world):
    locals_ = []
    for rank in range(world):
        _, calls = _eval_as_rank(monkeypatch, val_split, rank, world)
        assert len(calls) == 1          # one collective per eval, whatever the batch count
        locals_.append(calls[0])
    total = np.sum(locals_, axis=0)
    assert total[3] == 9                # 9 val images, not 10 or 12 (no wrap-around padding)
    single, _ = _eval_as_rank(monkeypatch, val_split, 0, 1)
    assert single["images"] == 9
    # the summed correct counts equal the single-process ones: the same images, once each
    assert total[1] == pytest.approx(single["top1"] * 9 / 100)
    assert total[2] == pytest.approx(single["top5"] * 9 / 100)


def test_a_rank_without_images_still_joins_the_reduce(monkeypatch, val_split):
    # 9 images on 12 ranks: rank 0 has none, but it must still call the all-reduce once
    result, calls = _eval_as_rank(monkeypatch, val_split, 0, 12, others=[1.0, 1, 1, 9, 0])
    assert len(calls) == 1 and calls[0][3] == 0
    assert result["images"] == 9
