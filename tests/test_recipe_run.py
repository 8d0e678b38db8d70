"""The modern recipe end to end on CPU: fast_resnet18_16ep shrunk to a tiny set (3 epochs, 32 ->
64 px): the resolution changes under trace, Mixup/CutMix, EMA (evaluated and logged), LARS and
no decay on norms all run, and a resume mid-run ends with the same weights as a straight run."""
import os

import numpy as np
import pytest

from helpers import make_imagenet
from engine.config import TrainConfig, load_recipe
from engine.metrics import read_jsonl
from engine.models.weights import read_file
from engine.trainer import train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # 3 classes x 6 train images, batch 4 -> 4 steps per epoch
    return make_imagenet(str(tmp_path_factory.mktemp("d") / "inet"), classes=3, train=6, val=2)


def shrunk(data_root, save_dir, **kw):
    recipe = load_recipe("fast_resnet18_16ep")
    recipe.update(data=data_root, save_dir=str(save_dir), epochs=3, batch_size=4,
                  learning_rate=0.02, warmup_epochs=1.0, min_res=32, max_res=64, start_ramp=0,
                  end_ramp=1, image_size=32, val_image_size=48, amp=False, workers=0,
                  progress=False, print_freq=2, ema_decay=0.9, mixup_alpha=0.2,
                  cutmix_alpha=1.0, optimizer="lars")
    recipe.update(kw)
    return TrainConfig(**recipe)


@pytest.mark.slow
def test_shrunk_fast_recipe_runs_and_resumes_exactly(data_root, tmp_path):
    straight = train(shrunk(data_root, tmp_path / "a"))
    assert straight.steps == 12 and np.isfinite(straight.loss)
    records = read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    kinds = [r["kind"] for r in records]
    assert kinds.count("eval") == kinds.count("eval_ema") == 3  # EMA scored every epoch
    ck = read_file(straight.checkpoint)
    assert ck["ema"] and ck["ema"]["updates"] == 12 and ck["config"]["optimizer"] == "lars"

    d = tmp_path / "b"
    train(shrunk(data_root, d, max_steps=6))  # stops mid epoch 1, after the 32 -> 64 change
    resumed = train(shrunk(data_root, d, resume=str(d)))
    assert resumed.steps == 12
    a, b = read_file(straight.checkpoint), read_file(resumed.checkpoint)
    for k in a["state_dict"]:
        np.testing.assert_allclose(b["state_dict"][k], a["state_dict"][k], rtol=1e-4, atol=1e-5,
                                   err_msg=k)
    for k in a["ema"]["state_dict"]:
        np.testing.assert_allclose(b["ema"]["state_dict"][k], a["ema"]["state_dict"][k],
                                   rtol=1e-4, atol=1e-5, err_msg="ema " + k)
    losses = lambda p: [r["loss"] for r in read_jsonl(str(p / "metrics.jsonl"))
                        if r["kind"] == "train"]
    np.testing.assert_allclose(losses(d), losses(tmp_path / "a"), rtol=1e-4)


def test_the_traced_step_follows_a_change_of_input_shape():
    """Progressive resizing feeds 160 then 192 px: each size gets its own compiled graph, and
    both keep training the same weights (here 32 -> 48 -> 32 px on CPU)."""
    import megengine as mge
    import megengine.optimizer as optim
    from megengine.autodiff import GradManager

    from engine.models import resnet18
    from engine.steps import TrainStep

    mge.random.seed(0)
    model = resnet18(num_classes=3)
    gm = GradManager().attach(model.parameters())
    step = TrainStep(model, gm, optim.SGD(model.parameters(), lr=0.01), trace=True)
    rng = np.random.default_rng(0)
    before = model.fc.weight.numpy().copy()
    for size in (32, 48, 32, 48):
        images = mge.tensor(rng.integers(0, 256, (2, 3, size, size), dtype=np.uint8))
        loss = step(images, mge.tensor(np.array([0, 2], np.int32)))
        assert np.isfinite(float(loss.item()))
    assert len(step._graphs) == 2  # one graph per shape, reused when the shape comes back
    assert not np.allclose(model.fc.weight.numpy(), before)
