"""Raw-pixel records (shard format version 2): which records the packer stores as pixels, the
round trip, crops equal to the JPEG's, version checks, verify/stage, and the loader over a
mixed pack."""
import json
import os
import shutil

import numpy as np
import pytest
from helpers import make_imagenet

from engine.data import shards
from engine.data.decode import decode_bgr
from engine.data.loader import Loader
from engine.data.pack import pack_imagenet, stores_raw
from engine.data.stage import stage
from engine.data.transforms import TrainTransform, ValTransform, random_resized_crop, sample_rng
from engine.data.verify import verify_split


def quiet(*_a):
    pass


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("src") / "r"), classes=3, train=10, val=3)


def _pack(src, out, **kw):
    kw.setdefault("shard_size", 4)
    pack_imagenet(src, str(out), workers=0, progress=False, log=quiet, **kw)
    return out


@pytest.fixture(scope="module")
def jpeg_pack(src, tmp_path_factory):
    return _pack(src, tmp_path_factory.mktemp("jpeg") / "p")


@pytest.fixture(scope="module")
def mixed(src, tmp_path_factory):
    return _pack(src, tmp_path_factory.mktemp("mixed") / "p", raw_fraction=0.5, seed=3)


@pytest.fixture(scope="module")
def all_raw(src, tmp_path_factory):
    return _pack(src, tmp_path_factory.mktemp("raw") / "p", raw_fraction=1.0)


def by_path(split_dir):
    return {r["path"]: r for r in shards.Split(str(split_dir))}


def test_choice_is_a_function_of_seed_and_index():
    picks = [stores_raw(7, i, 0.5) for i in range(2000)]
    assert picks == [stores_raw(7, i, 0.5) for i in range(2000)]
    assert 900 < sum(picks) < 1100
    assert picks != [stores_raw(8, i, 0.5) for i in range(2000)]
    assert not any(stores_raw(7, i, 0.0) for i in range(100))
    assert all(stores_raw(7, i, 1.0) for i in range(100))
    # a larger fraction keeps every record a smaller one picked
    assert all(stores_raw(7, i, 0.7) for i in range(2000) if picks[i])


def test_rerun_picks_the_same_records(src, mixed, tmp_path):
    again = _pack(src, tmp_path / "again", raw_fraction=0.5, seed=3)
    for split in ("train", "val"):
        a, b = by_path(mixed / split), by_path(again / split)
        assert {p for p, r in a.items() if shards.is_raw(r)} == \
            {p for p, r in b.items() if shards.is_raw(r)}
        assert a == b  # every record the same


def test_no_raw_fraction_is_version_1_as_before(jpeg_pack):
    meta = shards.read_meta(str(jpeg_pack / "train"))
    assert meta["version"] == 1
    assert not {"raw_records", "raw_fraction", "jpeg_quality"} & set(meta)
    plan_keys = set(json.load(open(jpeg_pack / "train" / "plan.json"))) if \
        os.path.exists(jpeg_pack / "train" / "plan.json") else set()
    assert "raw_fraction" not in plan_keys
    assert not any(shards.is_raw(r) for r in shards.Split(str(jpeg_pack / "train")))


def test_mixed_pack_is_version_2_and_counts_raw_records(mixed):
    for split in ("train", "val"):
        meta = shards.read_meta(str(mixed / split))
        recs = list(shards.Split(str(mixed / split)))
        n_raw = sum(shards.is_raw(r) for r in recs)
        assert meta["raw_records"] == n_raw and meta["raw_fraction"] == 0.5
        assert meta["version"] == (2 if n_raw else 1)
    assert 0 < shards.read_meta(str(mixed / "train"))["raw_records"] < 30


def test_round_trip_raw_pixels_are_the_full_decode(src, all_raw):
    for split in ("train", "val"):
        for rel, rec in by_path(all_raw / split).items():
            img = shards.record_image(rec)
            assert isinstance(img, np.ndarray) and img.dtype == np.uint8
            assert img.shape == (rec["height"], rec["width"], 3)
            with open(os.path.join(src, split, rel), "rb") as f:
                assert np.array_equal(img, decode_bgr(f.read()))


def test_round_trip_of_pack_raw_record():
    px = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rec = shards.unpack_record(shards.pack_raw_record(px, 4, "a/b.JPEG"))
    assert (rec["height"], rec["width"], rec["label"], rec["path"]) == (5, 7, 4, "a/b.JPEG")
    assert "image" not in rec and np.array_equal(shards.record_image(rec), px)
    rec["raw"] = rec["raw"][:-1]
    with pytest.raises(shards.ShardError, match="5x7x3 needs 105"):
        shards.record_image(rec)


def test_max_side_caps_raw_records(src, tmp_path):
    out = _pack(src, tmp_path / "capped", raw_fraction=1.0, max_side=64, splits=["val"])
    for rec in shards.Split(str(out / "val")):
        assert max(shards.record_image(rec).shape[:2]) <= 64


def test_train_crop_from_raw_equals_the_jpegs_geometry_and_full_decode(jpeg_pack, all_raw):
    t = TrainTransform(seed=5)
    jpegs, raws = by_path(jpeg_pack / "train"), by_path(all_raw / "train")
    checked = 0
    for i, (rel, jrec) in enumerate(sorted(jpegs.items())):
        full = decode_bgr(jrec["image"])
        pixels = shards.record_image(raws[rel])
        for epoch in range(3):
            crop, flip = t.crop_full(pixels, i, epoch)
            # the JPEG path's geometry: the same draws, at full scale where it picks 8/8
            rng = sample_rng(5, epoch, i)
            x, y, w, h = random_resized_crop(full.shape[0], full.shape[1], rng)
            assert np.array_equal(crop, full[y:y + h, x:x + w])
            num, x0, y0, w0, h0, jflip = t.window(jrec["width"], jrec["height"], i, epoch, 64)
            assert flip == jflip
            if num == 8:
                assert (x0, y0, w0, h0) == (x, y, w, h)
                checked += 1
            out = np.empty((3, 64, 64), np.uint8)
            t(pixels, i, epoch, out, (raws[rel]["width"], raws[rel]["height"]))
            ref = np.empty_like(out)
            t(full, i, epoch, ref)  # a decoded array takes the same path
            assert np.array_equal(out, ref)
    assert checked > 0


def test_val_output_from_raw_equals_the_jpegs(jpeg_pack, all_raw):
    v = ValTransform()
    jpegs, raws = by_path(jpeg_pack / "val"), by_path(all_raw / "val")
    for rel, jrec in jpegs.items():
        a, b = np.empty((3, 96, 96), np.uint8), np.empty((3, 96, 96), np.uint8)
        v(jrec["image"], 0, 0, a, (jrec["width"], jrec["height"]))
        v(shards.record_image(raws[rel]), 0, 0, b)
        assert np.array_equal(a, b), rel


def test_version_1_reader_refuses_version_2(mixed):
    path = str(mixed / "train" / shards.META_FILE)
    meta = shards.read_meta(str(mixed / "train"))
    assert meta["version"] == 2
    shards.check_version(meta, path)  # this engine reads it
    with pytest.raises(shards.ShardError) as e:  # an engine that reads version 1 only
        shards.check_version(meta, path, readable=(1,))
    assert "format version 2, made by a newer engine; this engine reads version 1" in str(e.value)
    assert "Upgrade the engine" in str(e.value)


def test_newer_version_is_refused_with_upgrade_advice(mixed, tmp_path):
    d = tmp_path / "train"
    shutil.copytree(mixed / "train", d)
    meta = json.load(open(d / shards.META_FILE))
    meta["version"] = 3
    json.dump(meta, open(d / shards.META_FILE, "w"))
    with pytest.raises(shards.ShardError, match="version 3, made by a newer engine; this engine "
                                                "reads versions 1, 2. Upgrade"):
        shards.read_meta(str(d))


def test_verify_and_stage_a_version_2_pack(mixed, tmp_path):
    for fast in (False, True):
        rep = verify_split(str(mixed / "train"), fast=fast)
        assert rep.mismatches == [] and rep.checksums == "present"
    staged = tmp_path / "staged"
    stage(str(mixed), str(staged), log=quiet)
    assert shards.read_meta(str(staged / "train")) == shards.read_meta(str(mixed / "train"))
    assert verify_split(str(staged / "train")).mismatches == []
    # a raw record cut short is named by its shape; a wrong raw count in meta.json is caught
    d = tmp_path / "bad"
    shutil.copytree(mixed / "train", d)
    meta = json.load(open(d / shards.META_FILE))
    meta["raw_records"] += 1
    json.dump(meta, open(d / shards.META_FILE, "w"))
    rep = verify_split(str(d))
    assert any("raw records, meta.json says" in m for m in rep.mismatches)


def test_verify_names_a_raw_record_of_the_wrong_size():
    from engine.data.verify import check_record

    px = np.zeros((4, 6, 3), np.uint8)
    good = shards.pack_raw_record(px, 0, "a.JPEG")
    assert check_record(good, 1) is None
    bad = shards.unpack_record(good)
    bad["raw"] = bad["raw"][:10]
    import msgpack
    problem = check_record(msgpack.packb(bad, use_bin_type=True), 1)
    assert problem and "4x6x3 needs 72" in problem


def collect(loader):
    with loader:
        return [(im.copy(), lb.copy()) for im, lb in loader]


@pytest.mark.parametrize("train", [True, False])
def test_loader_over_a_mixed_pack_is_the_same_for_any_worker_count(mixed, train):
    split = str(mixed / ("train" if train else "val"))
    a = collect(Loader(split, batch_size=4, train=train, image_size=64, workers=0, seed=2))
    b = collect(Loader(split, batch_size=4, train=train, image_size=64, workers=2, seed=2))
    assert len(a) == len(b) > 0
    for (ia, la), (ib, lb) in zip(a, b):
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)


def test_val_loader_gives_the_same_batches_from_raw_and_jpeg_packs(jpeg_pack, all_raw):
    a = collect(Loader(str(jpeg_pack / "val"), batch_size=3, train=False, image_size=64,
                       workers=0))
    b = collect(Loader(str(all_raw / "val"), batch_size=3, train=False, image_size=64,
                       workers=2))
    for (ia, la), (ib, lb) in zip(a, b):
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)


def test_raw_fraction_is_checked_and_a_rerun_with_another_is_refused(src, mixed):
    from engine.data.plan import PackError

    with pytest.raises(PackError, match="--raw-fraction must be between 0 and 1"):
        _pack(src, mixed, raw_fraction=1.5)
    with pytest.raises(PackError, match="raw_fraction 0.5 then, 0.25 now"):
        _pack(src, mixed, raw_fraction=0.25, seed=3)


def test_version_must_match_the_raw_record_count(mixed, tmp_path):
    d = tmp_path / "train"
    shutil.copytree(mixed / "train", d)
    meta = json.load(open(d / shards.META_FILE))
    meta["version"] = 1  # raw records under the JPEG-only version: an edited meta.json
    json.dump(meta, open(d / shards.META_FILE, "w"))
    with pytest.raises(shards.ShardError, match="version 1 with raw_records"):
        shards.read_meta(str(d))
