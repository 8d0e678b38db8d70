"""tools/test.py evaluates a checkpoint the way its run did (the run's architecture, crop size,
resize ratio; --ema for the averaged weights), and an evaluation skips and counts the files that
do not decode instead of scoring a stand-in twice, on one rank or several."""
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from helpers import make_imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A resnet34 run that evaluated at 48 px with ratio 0.75 (trained at 32), with an EMA: its
    checkpoint and the scores its training log recorded for the same weights."""
    from engine.config import TrainConfig
    from engine.metrics import read_jsonl
    from engine.trainer import train

    d = tmp_path_factory.mktemp("run")
    root = make_imagenet(str(d / "inet"), classes=3, train=2, val=3)  # 9 val images
    result = train(TrainConfig(
        data=root, arch="resnet34", batch_size=4, image_size=32, val_image_size=48,
        val_resize_ratio=0.75, ema_decay=0.9, workers=0, save_dir=str(d / "run"), epochs=1,
        max_steps=1, progress=False, trace=False))
    logged = {r["kind"]: r for r in read_jsonl(str(d / "run" / "metrics.jsonl"))
              if r["kind"].startswith("eval")}
    return root, result.checkpoint, logged


def _test(**kw):
    from engine.evaluate import TestConfig, test

    return test(TestConfig(**dict(dict(workers=0, batch_size=4, progress=False), **kw)))


def test_test_scores_a_checkpoint_as_its_training_log_did(run):
    root, ckpt, logged = run
    assert set(logged) == {"eval", "eval_ema"} and logged["eval"]["images"] == 9
    live = _test(data=root, model=ckpt)  # no --arch, no --image-size
    assert (live.arch, live.image_size, live.crop_ratio, live.ema) == ("resnet34", 48, 0.75, False)
    assert live.images == 9 and live.skipped == 0
    assert live.top1 == pytest.approx(logged["eval"]["top1"])
    assert live.loss == pytest.approx(logged["eval"]["loss"], rel=1e-4)
    ema = _test(data=root, model=ckpt, ema=True)
    assert ema.ema and ema.top1 == pytest.approx(logged["eval_ema"]["top1"])
    assert ema.loss == pytest.approx(logged["eval_ema"]["loss"], rel=1e-4)
    assert abs(ema.loss - live.loss) > 1e-3  # they are other weights
    # each setting is overridable
    other = _test(data=root, model=ckpt, image_size=32, val_resize_ratio=0.875)
    assert (other.image_size, other.crop_ratio) == (32, 0.875)


def test_a_conflicting_arch_and_a_missing_ema_are_refused(run, tmp_path):
    from engine import checkpoint as ckpt_mod
    from engine.errors import UserError
    from engine.models.weights import read_file

    root, ckpt, _ = run
    with pytest.raises(UserError, match="resnet34 checkpoint but --arch is resnet18"):
        _test(data=root, model=ckpt, arch="resnet18")
    assert _test(data=root, model=ckpt, arch="resnet34").arch == "resnet34"
    without = ckpt_mod.dump(dict(read_file(ckpt), ema=None), str(tmp_path / "no_ema.pkl"))
    with pytest.raises(UserError, match="holds no moving average"):
        _test(data=root, model=without, ema=True)
    bare = ckpt_mod.dump(dict(read_file(ckpt)["state_dict"]), str(tmp_path / "bare.pkl"))
    with pytest.raises(UserError, match="not an engine checkpoint"):
        _test(data=root, model=bare, arch="resnet34", ema=True)


def test_inference_takes_the_arch_and_eval_transform_from_the_checkpoint(run):
    import megengine as mge

    from engine.inference import predict, read_image, resize_center_crop
    from engine.models import load_model
    from engine.steps import PredictStep

    root, ckpt, _ = run
    folder = os.path.join(root, "val", sorted(os.listdir(os.path.join(root, "val")))[0])
    image = os.path.join(folder, sorted(os.listdir(folder))[0])
    top = predict(None, ckpt, image, topk=3)  # no arch, no size: the checkpoint's
    loaded = load_model(None, ckpt)
    assert loaded.arch == "resnet34" and len(top) == 3
    # the run's eval transform: 48 px, the shorter side resized to 48 / 0.75 = 64
    probs = PredictStep(loaded.model)(mge.tensor(resize_center_crop(read_image(image), 48,
                                                                    0.75))).numpy()[0]
    assert top[0][0] == int(np.argmax(probs)) and top[0][2] == pytest.approx(probs.max(), rel=1e-5)


# ------------------------------------------------------------- undecodable files: skipped, counted

@pytest.fixture(scope="module")
def damaged(run, tmp_path_factory):
    """(the val set with 3 of its 9 files undecodable, the same set with only the 6 good ones)."""
    root, _, _ = run
    d = tmp_path_factory.mktemp("damaged")
    bad, good = str(d / "bad"), str(d / "good")
    shutil.copytree(root, bad)
    shutil.copytree(root, good)
    val = os.path.join(bad, "val")
    files = sorted(os.path.join(c, f) for c in os.listdir(val)
                   for f in os.listdir(os.path.join(val, c)))
    victims = [files[1], files[4], files[8]]
    for k, rel in enumerate(victims):
        path = os.path.join(val, rel)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write([data[: len(data) // 3], b"not an image", b""][k])
        os.remove(os.path.join(good, "val", rel))
    return bad, good


@pytest.mark.parametrize("workers", [0, 2])
def test_an_eval_loader_skips_bad_files_and_yields_the_good_ones_once(damaged, workers):
    from engine.data import Loader

    bad, good = damaged
    kw = dict(batch_size=4, train=False, image_size=32, workers=workers)
    with Loader(os.path.join(good, "val"), **kw) as ref:
        want = [(x.copy(), y.copy()) for x, y in ref]
    with Loader(os.path.join(bad, "val"), skip_undecodable=True, **kw) as ld:
        with pytest.warns(RuntimeWarning, match="skipped"):
            got = [(x.copy(), y.copy()) for x, y in ld]
        assert (ld.num_skipped, ld.num_replaced) == (3, 0)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in got]),
                                  np.concatenate([x for x, _ in want]))
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]),
                                  np.concatenate([y for _, y in want]))


def test_test_skips_and_counts_bad_files(run, damaged):
    _, ckpt, _ = run
    bad, good = damaged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = _test(data=bad, model=ckpt)
    want = _test(data=good, model=ckpt)
    assert (got.images, got.skipped) == (6, 3) and want.skipped == 0
    assert got.top1 == pytest.approx(want.top1) and got.loss == pytest.approx(want.loss, rel=1e-5)


def test_the_skipped_counts_are_summed_over_the_ranks(run, damaged, monkeypatch):
    """Each rank's share of a damaged val set, with a CPU stand-in for the one all-reduce."""
    import megengine as mge

    from engine import dist
    from engine.data import Loader
    from engine.evaluate import run_eval
    from engine.models import get_model
    from engine.steps import EvalStep

    bad, _ = damaged
    vectors = []

    def fake_all_reduce_sum(values):  # what this rank contributes
        vectors.append(np.asarray(values, np.float64))
        return vectors[-1]

    monkeypatch.setattr(dist, "all_reduce_sum", fake_all_reduce_sum)
    mge.random.seed(0)
    model = get_model("resnet18", num_classes=3)
    model.eval()
    step = EvalStep(model, num_classes=3, trace=False)
    for rank in range(2):
        loader = Loader(os.path.join(bad, "val"), batch_size=2, train=False, image_size=32,
                        workers=0, rank=rank, world_size=2, skip_undecodable=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            run_eval(step, loader)
    assert len(vectors) == 2  # one collective per rank
    total = np.sum(vectors, axis=0)
    assert (total[3], total[4]) == (6, 3)  # images scored, files skipped: each once
    assert all(v[4] > 0 for v in vectors)  # both ranks met bad files


def test_the_trainers_eval_skips_and_its_training_replaces():
    from engine.config import TrainConfig
    from engine.trainer import loader_kwargs

    cfg = TrainConfig(data="x")
    assert loader_kwargs(cfg, False, 0, 1)["skip_undecodable"] is True
    assert "skip_undecodable" not in loader_kwargs(cfg, True, 0, 1)  # replaced, as before


def test_the_test_tool_reports_the_settings_and_the_skipped_files(run, damaged):
    _, ckpt, _ = run
    bad, _ = damaged
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "test.py"), "-d", bad, "-m",
                        ckpt, "--ema", "-b", "4", "-j", "0", "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert re.match(r"Test resnet34 EMA at 48 px \(crop ratio 0\.75\) on 6 images \(3 undecodable "
                    r"files skipped\): top1 [\d.]+ top5 [\d.]+$", last), last
