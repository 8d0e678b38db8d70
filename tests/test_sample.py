"""Tests for engine.data.sample / tools/make_sample_imagenet.py (the real-photo sample data set)."""
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

pytest.importorskip("skimage")

from engine.data.sample import LONG_SIDE, MARKER, make_sample_imagenet, max_classes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "make_sample_imagenet.py")
SMALL = dict(classes=3, train_per_class=4, val_per_class=2)


def _files(root):
    """{relative path: bytes} of every JPEG under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith(".JPEG"):
                p = os.path.join(d, n)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = f.read()
    return out


def _run_tool(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sample") / "imagenet")
    summary = make_sample_imagenet(out, seed=0, **SMALL)
    return out, summary


def test_layout_and_counts(sample):
    out, summary = sample
    wnids = summary["classes"]
    assert len(wnids) == 3 and wnids == sorted(wnids) and len(set(wnids)) == 3
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert sorted(os.listdir(os.path.join(out, "train"))) == wnids
    assert sorted(os.listdir(os.path.join(out, "val"))) == wnids
    for w in wnids:
        assert sorted(os.listdir(os.path.join(out, "train", w))) == sorted(
            f"{w}_{k}.JPEG" for k in range(1, 5))
        assert sorted(os.listdir(os.path.join(out, "val", w))) == sorted(
            f"{w}_val_{k}.JPEG" for k in range(1, 3))
    assert summary["counts"] == {"train": 12, "val": 6}
    assert summary["bytes"] == sum(len(b) for b in _files(out).values())
    assert set(summary["sources"]) == set(wnids)
    with open(os.path.join(out, MARKER)) as f:
        meta = json.load(f)
    assert meta["complete"] is True and meta["classes"] == wnids and meta["seed"] == 0


def test_images_decode_to_imagenet_like_sizes(sample):
    out, _ = sample
    for rel, data in _files(out).items():
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert img is not None and img.dtype == np.uint8, rel
        assert img.ndim == 3 and img.shape[2] == 3, (rel, img.shape)
        h, w = img.shape[:2]
        assert LONG_SIDE[0] <= max(h, w) <= LONG_SIDE[1], (rel, img.shape)
        assert 0.5 - 0.01 <= w / h <= 2.0 + 0.01, (rel, img.shape)


def test_same_seed_same_bytes_other_seed_differs(sample, tmp_path):
    out, _ = sample
    first = _files(out)
    again = str(tmp_path / "again")
    make_sample_imagenet(again, seed=0, **SMALL)
    assert _files(again) == first
    other = str(tmp_path / "other")
    make_sample_imagenet(other, seed=1, **SMALL)
    differ = _files(other)
    assert differ.keys() == first.keys()
    assert all(differ[k] != first[k] for k in first)


def test_more_samples_keep_the_first_ones(sample, tmp_path):
    out, _ = sample
    small = _files(out)
    more = str(tmp_path / "more")
    make_sample_imagenet(more, seed=0, classes=3, train_per_class=5, val_per_class=2)
    big = _files(more)
    assert len(big) == len(small) + 3
    assert all(big[k] == v for k, v in small.items())


def test_samples_within_a_class_vary(sample):
    out, summary = sample
    files = _files(out)
    for w in summary["classes"]:
        shapes = set()
        for k in range(1, 5):
            img = cv2.imdecode(np.frombuffer(files[os.path.join("train", w, f"{w}_{k}.JPEG")],
                                             np.uint8), cv2.IMREAD_COLOR)
            shapes.add(img.shape)
        assert len(shapes) > 1


def _feature(img):
    """Colour histogram of the centre square plus a coarse thumbnail: crude but enough."""
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    hist = cv2.calcHist([img], [0, 1, 2], None, [4, 4, 4], [0, 256] * 3).ravel()
    thumb = cv2.resize(img, (4, 4), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    return np.concatenate([np.sqrt(hist / hist.sum()), thumb / 255.0])


def test_classes_are_distinguishable(sample):
    out, summary = sample
    files = _files(out)
    feats = {}
    for w in summary["classes"]:
        for split in ("train", "val"):
            feats[(w, split)] = np.stack([
                _feature(cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_COLOR))
                for k, v in sorted(files.items()) if k.startswith(os.path.join(split, w, ""))
            ])
    wnids = summary["classes"]
    centroids = {w: feats[(w, "train")].mean(0) for w in wnids}
    within = np.mean([np.linalg.norm(feats[(w, "train")] - centroids[w], axis=1).mean()
                      for w in wnids])
    between = np.mean([np.linalg.norm(centroids[a] - centroids[b])
                       for a in wnids for b in wnids if a < b])
    assert between > 1.2 * within, (between, within)
    # Val images are nearest to their own class's train centroid.
    for w in wnids:
        for f in feats[(w, "val")]:
            nearest = min(wnids, key=lambda c: np.linalg.norm(f - centroids[c]))
            assert nearest == w


def test_too_many_classes_is_a_clear_error(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(ValueError, match=f"maximum is {max_classes()}"):
        make_sample_imagenet(str(out), classes=max_classes() + 1)
    assert not out.exists()
    with pytest.raises(ValueError):
        make_sample_imagenet(str(out), classes=0)
    with pytest.raises(ValueError):
        make_sample_imagenet(str(out), classes=2, train_per_class=0)


def test_refuses_foreign_nonempty_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a sample set"):
        make_sample_imagenet(str(out), classes=1, train_per_class=1, val_per_class=0)
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_overwrites_previous_sample_set_cleanly(tmp_path):
    out = str(tmp_path / "s")
    make_sample_imagenet(out, classes=3, train_per_class=2, val_per_class=1, seed=0)
    extra = os.path.join(out, "packed")
    os.makedirs(extra)  # not the generator's: must survive
    s = make_sample_imagenet(out, classes=2, train_per_class=1, val_per_class=0, seed=0)
    assert sorted(os.listdir(out)) == sorted([MARKER, "train", "packed"])
    assert sorted(os.listdir(os.path.join(out, "train"))) == s["classes"]
    assert len(_files(out)) == 2
    assert not [n for _, _, ns in os.walk(out) for n in ns if n.endswith(".tmp")]


def test_import_needs_neither_megengine_nor_skimage():
    code = ("import sys, engine.data.sample; "
            "assert 'megengine' not in sys.modules and 'skimage' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)


def test_tool_help():
    r = _run_tool("--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--out", "--classes", "--train-per-class", "--val-per-class", "--seed"):
        assert opt in r.stdout
    assert "non-empty" in r.stdout


def test_tool_makes_a_set_and_reports_it(tmp_path):
    out = str(tmp_path / "cli")
    r = _run_tool("--out", out, "--classes", "2", "--train-per-class", "2",
                  "--val-per-class", "1", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "2 classes (4 train, 2 val images)" in r.stdout
    assert out in r.stdout
    assert len(_files(out)) == 6


def test_tool_too_many_classes(tmp_path):
    r = _run_tool("--out", str(tmp_path / "x"), "--classes", str(max_classes() + 1))
    assert r.returncode == 2
    assert f"maximum is {max_classes()}" in r.stderr
    assert "Traceback" not in r.stderr


def test_imagenet_like_mode_matches_imagenet_file_statistics(sample, tmp_path):
    """~100-110 KB at a 450-500 px long side (ImageNet's averages), same layout and labels;
    the default mode is untouched by the option's existence."""
    out, _ = sample
    like = str(tmp_path / "like")
    make_sample_imagenet(like, seed=0, classes=6, train_per_class=6, val_per_class=1,
                         imagenet_like=True)
    files = _files(like)
    sizes = [len(b) for b in files.values()]
    assert 90_000 <= np.mean(sizes) <= 125_000, np.mean(sizes)
    for data in list(files.values())[:10]:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert 450 <= max(img.shape[:2]) <= 500
    assert np.mean([len(b) for b in _files(out).values()]) < 60_000  # the smooth default
    with open(os.path.join(like, MARKER)) as f:
        assert json.load(f)["imagenet_like"] is True
