"""The demo's last step: the classified photo's true class beside the prediction, a word when the
prediction is wrong, the model's val accuracy for context, and a grid of val photos (chosen by
file order, not by outcome) with their predictions and true classes saved as a PNG."""
import os

import cv2
import pytest

from helpers import make_imagenet
from engine.tools.demo import (DemoConfig, Prediction, classify, grid_photos, run_demo, val_grid,
                               verdict)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A 3-class val set and an (untrained) engine checkpoint of its classes."""
    import megengine as mge
    from engine.checkpoint import FORMAT, VERSION, dump
    from engine.models import get_model

    d = tmp_path_factory.mktemp("demo")
    root = make_imagenet(str(d / "inet"), classes=3, train=1, val=3)
    classes = sorted(os.listdir(os.path.join(root, "val")))
    mge.random.seed(0)
    ckpt = dump({"format": FORMAT, "version": VERSION, "epoch": 1,
                 "state_dict": get_model("resnet18", num_classes=3).state_dict(),
                 "config": {"arch": "resnet18", "num_classes": 3, "classes": classes,
                            "image_size": 32}}, str(d / "engine.pkl"))
    return os.path.join(root, "val"), classes, ckpt


def test_the_grid_photos_are_chosen_by_file_order_only(model):
    val, classes, _ = model
    photos = grid_photos(val, 2)
    assert photos == [os.path.join(val, c, f) for c in classes
                      for f in sorted(os.listdir(os.path.join(val, c)))[:2]]


def test_each_prediction_stands_beside_the_photos_true_class(model):
    from engine.inference import predict

    val, classes, ckpt = model
    photos = grid_photos(val, 3)
    preds = classify(ckpt, photos)
    assert [p.true_class for p in preds] == [c for c in classes for _ in range(3)]
    for p in preds:
        assert sorted(p.top) == sorted(classes) and p.top[0] == p.predicted
        assert p.correct == (p.predicted == p.true_class)
        assert p.top[p.true_rank - 1] == p.true_class
    # the same answer as tools/inference.py gives for the photo
    (i, name, prob), = predict("resnet18", ckpt, photos[0], topk=1)
    assert (name, round(prob, 5)) == (preds[0].predicted, round(preds[0].probability, 5))


def test_the_verdict_says_wrong_and_gives_the_val_accuracy():
    wrong = Prediction("x.jpg", "tabby", "moped", 0.505, ["moped", "tabby", "espresso"],
                       [0.505, 0.3, 0.195])
    assert verdict(wrong, 90.5, 200) == (
        "wrong: the photo's true class is tabby, ranked 2 of 3 by the model, whose top-1 is "
        "moped. The model is right on 90.5 % of val (200 photos).")
    right = Prediction("x.jpg", "tabby", "tabby", 0.9, ["tabby", "moped"], [0.9, 0.1])
    assert verdict(right, 90.5, 200).startswith("right: the top-1 is the photo's true class, "
                                                "tabby. The model is right on 90.5 %")


def test_the_grid_png_shows_every_photo(model, tmp_path):
    val, _classes, ckpt = model
    preds = classify(ckpt, grid_photos(val, 3))
    png = val_grid(preds, str(tmp_path / "grid.png"), 42.0, tile=96, columns=3)
    img = cv2.imread(png)
    assert img.shape == (36 + 3 * (96 + 30), 3 * 96, 3)
    # a red (wrong) or green (right) top-1 line under every tile
    for i, p in enumerate(preds):
        y, x = 36 + (i // 3) * (96 + 30) + 96, (i % 3) * 96
        strip = img[y:y + 15, x:x + 96].reshape(-1, 3).astype(int)
        colour = (0, 140, 0) if p.correct else (0, 0, 200)
        assert (abs(strip - colour).sum(1) < 60).sum() > 5, (i, p.correct)


@pytest.mark.slow
def test_the_demo_end_to_end_at_a_small_size(tmp_path):
    lines = []
    r = run_demo(DemoConfig(out=str(tmp_path / "demo"), epochs=1, workers=0, classes=3,
                            train_per_class=4, val_per_class=2, batch_size=4), log=lines.append)
    text = "\n".join(lines)
    assert "== 5/5 classify" in text and "(the first val photo)" in text
    assert ("right: the top-1 is the photo's true class" in text) or (
        "wrong: the photo's true class is %s" % r.photo.true_class in text)
    assert "The model is right on %.1f %% of val (6 photos)." % r.top1 in text
    assert os.path.exists(r.grid) and r.grid_total == 6
    assert "%d of 6 right" % r.grid_right in text
