"""Packer: round trip, every ImageNet quirk, kill -9 and rerun, reader refusals."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from helpers import ROOT, jpeg_bytes, make_imagenet, photo_bgr, write
from engine.data import shards
from engine.data.decode import decode_bgr, jpeg_info
from engine.data.pack import PackError, pack_imagenet


def pack(data, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda *a: None)
    return pack_imagenet(str(data), str(out), **kw)


def records(split_dir):
    return list(shards.Split(str(split_dir)))


def test_round_trip_keeps_bytes_labels_and_order(tiny_imagenet, tmp_path):
    out = tmp_path / "packed"
    res = pack(tiny_imagenet, out, shard_size=4)
    train = shards.Split(str(out / "train"))
    assert len(train) == 18 and len(train.meta["shards"]) == 5
    assert train.classes == ["n00001000", "n00001001", "n00001002"]
    seen = set()
    for rec in train:
        with open(os.path.join(tiny_imagenet, "train", rec["path"]), "rb") as f:
            assert f.read() == rec["image"]  # plain JPEGs are stored byte for byte
        assert rec["label"] == train.classes.index(rec["path"].split("/")[0])
        h, w = decode_bgr(rec["image"]).shape[:2]
        assert (rec["height"], rec["width"]) == (h, w)
        seen.add(rec["path"])
    assert len(seen) == 18
    # train is shuffled (shards mix classes), val keeps sorted order
    labels = [r["label"] for r in train]
    assert labels != sorted(labels)
    val = records(out / "val")
    assert [r["path"] for r in val] == sorted(r["path"] for r in val)
    assert res.splits[0].kept == 18 and res.splits[1].kept == 6


def test_same_input_and_seed_give_same_records(tiny_imagenet, tmp_path):
    pack(tiny_imagenet, tmp_path / "a", seed=3, workers=0)
    pack(tiny_imagenet, tmp_path / "b", seed=3, workers=2)
    pack(tiny_imagenet, tmp_path / "c", seed=4, workers=1)
    a, b, c = (records(tmp_path / x / "train") for x in "abc")
    assert a == b
    assert [r["path"] for r in a] != [r["path"] for r in c]


def test_raw_record_layout_is_the_contract(tiny_imagenet, tmp_path):
    """Read a shard with plain lmdb + msgpack, as another program would."""
    import lmdb
    import msgpack
    import struct

    pack(tiny_imagenet, tmp_path / "p", shard_size=100)
    meta = json.load(open(tmp_path / "p" / "val" / "meta.json"))
    assert meta["format"] == "engine-lmdb-shards" and meta["version"] == 1
    assert meta["split"] == "val" and meta["num_samples"] == 6 and meta["skipped"] == []
    env = lmdb.open(str(tmp_path / "p" / "val" / meta["shards"][0]["file"]), subdir=False,
                    readonly=True, lock=False)
    with env.begin() as txn:
        keys = [k for k, _ in txn.cursor()]
        assert keys == [struct.pack(">Q", i) for i in range(6)]
        rec = msgpack.unpackb(txn.get(struct.pack(">Q", 0)), raw=False)
    env.close()
    assert {"image", "label", "height", "width", "path"} <= set(rec)
    assert isinstance(rec["image"], bytes) and rec["path"].endswith(".JPEG")


@pytest.fixture
def quirky(tmp_path):
    """A tiny ImageNet holding every quirk real ImageNet has, and worse."""
    root = make_imagenet(str(tmp_path / "quirky"), classes=2, train=2, val=1)
    d = os.path.join(root, "train", "n00001000")
    cat = photo_bgr("chelsea")
    coffee = photo_bgr("coffee")

    ok, png = cv2.imencode(".png", coffee)
    write(os.path.join(d, "n02105855_2933.JPEG"), png.tobytes())  # PNG named .JPEG
    rgba = np.dstack([cat[..., ::-1], np.full(cat.shape[:2], 200, np.uint8)])
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    write(os.path.join(d, "rgba.JPEG"), buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(cat[..., ::-1]).convert("CMYK").save(buf, "JPEG", quality=95)
    write(os.path.join(d, "n01739381_1309.JPEG"), buf.getvalue())  # CMYK
    gray = cv2.cvtColor(cat, cv2.COLOR_BGR2GRAY)
    ok, g = cv2.imencode(".jpg", gray)
    write(os.path.join(d, "gray.jpeg"), g.tobytes())
    write(os.path.join(d, "progressive.jpg"), jpeg_bytes(coffee, progressive=True))
    write(os.path.join(d, "full444"), jpeg_bytes(cat, sampling="444"))  # no extension at all
    write(os.path.join(d, "tiny.JPEG"), jpeg_bytes(cat[100:101, 100:101]))
    big = cv2.resize(coffee, (2400, 1600), interpolation=cv2.INTER_CUBIC)
    write(os.path.join(d, "large.JPEG"), jpeg_bytes(big, quality=80))
    good = jpeg_bytes(cat)
    write(os.path.join(d, "truncated.JPEG"), good[: len(good) * 2 // 3])
    write(os.path.join(d, "empty.JPEG"), b"")
    write(os.path.join(d, "garbage.JPEG"), os.urandom(3000))
    write(os.path.join(d, "header_only.JPEG"), good[:400])
    write(os.path.join(d, ".DS_Store"), b"\x00\x00\x00\x01Bud1")
    return root


def test_every_quirk(quirky, tmp_path):
    res = pack(quirky, tmp_path / "p", workers=2)
    split = shards.Split(str(tmp_path / "p" / "train"))
    by_path = {r["path"].split("/")[-1]: r for r in split}
    meta = split.meta
    skipped = {s["path"].split("/")[-1]: s["reason"] for s in meta["skipped"]}
    assert set(skipped) == {"truncated.JPEG", "empty.JPEG", "garbage.JPEG", "header_only.JPEG"}
    assert "empty" in skipped["empty.JPEG"]
    assert "not an image" in skipped["garbage.JPEG"]
    assert "JPEG" in skipped["truncated.JPEG"]
    assert ".DS_Store" not in by_path and ".DS_Store" not in skipped
    for name, rec in by_path.items():  # every kept record decodes to 3 channels, dims right
        img = decode_bgr(rec["image"])
        assert img.shape == (rec["height"], rec["width"], 3), name
        assert not jpeg_info(rec["image"]).needs_conversion
    # converted ones are re-encoded JPEGs; the others keep their original bytes
    assert by_path["n02105855_2933.JPEG"]["image"][:2] == b"\xff\xd8"
    with open(os.path.join(quirky, "train", "n00001000", "progressive.jpg"), "rb") as f:
        assert by_path["progressive.jpg"]["image"] == f.read()
    with open(os.path.join(quirky, "train", "n00001000", "gray.jpeg"), "rb") as f:
        assert by_path["gray.jpeg"]["image"] == f.read()
    assert by_path["tiny.JPEG"]["height"] == 1 and by_path["large.JPEG"]["width"] == 2400
    kinds = meta["kinds"]
    assert kinds["converted:png"] == 2 and kinds["converted:cmyk"] == 1 and kinds["gray"] == 1
    s = res.splits[0]
    assert s.seen == 4 + 12 and s.kept == 12 and s.skipped == 4


def test_cmyk_and_png_colours_are_right(quirky, tmp_path):
    pack(quirky, tmp_path / "p", splits=["train"])
    by_path = {r["path"].split("/")[-1]: r for r in shards.Split(str(tmp_path / "p" / "train"))}
    cat, coffee = photo_bgr("chelsea").astype(float), photo_bgr("coffee").astype(float)
    cmyk = decode_bgr(by_path["n01739381_1309.JPEG"]["image"]).astype(float)
    # inverted-CMYK handling wrong would give a photo negative (mean error ~100)
    assert np.abs(cmyk - cat).mean() < 6
    assert np.abs(cmyk.mean((0, 1)) - cat.mean((0, 1))).max() < 4  # per-channel: B/R not swapped
    png = decode_bgr(by_path["n02105855_2933.JPEG"]["image"]).astype(float)
    assert np.abs(png - coffee).mean() < 3
    rgba = decode_bgr(by_path["rgba.JPEG"]["image"]).astype(float)
    assert np.abs(rgba - cat).mean() < 3


def test_max_side_resizes_large_images(quirky, tmp_path):
    pack(quirky, tmp_path / "p", splits=["train"], max_side=500)
    by_path = {r["path"].split("/")[-1]: r for r in shards.Split(str(tmp_path / "p" / "train"))}
    big = by_path["large.JPEG"]
    assert (big["width"], big["height"]) == (500, 333)
    assert decode_bgr(big["image"]).shape == (333, 500, 3)
    assert shards.Split(str(tmp_path / "p" / "train")).meta["kinds"]["converted:resized"] >= 1


def test_strict_fails_on_skips_and_records_them(quirky, tmp_path):
    with pytest.raises(PackError, match="4 file"):
        pack(quirky, tmp_path / "p", strict=True)
    assert len(shards.read_meta(str(tmp_path / "p" / "train"))["skipped"]) == 4


def test_reader_refuses_incomplete_or_unknown_splits(tiny_imagenet, tmp_path):
    with pytest.raises(shards.ShardError, match="does not exist"):
        shards.Split(str(tmp_path / "nothing"))
    pack(tiny_imagenet, tmp_path / "p")
    val = tmp_path / "p" / "val"
    meta = json.load(open(val / "meta.json"))
    os.rename(val / "meta.json", val / "meta.moved")
    with pytest.raises(shards.ShardError, match="incomplete"):
        shards.Split(str(val))
    meta["version"] = 2
    json.dump(meta, open(val / "meta.json", "w"))
    with pytest.raises(shards.ShardError, match="version 2"):
        shards.Split(str(val))
    meta["version"], meta["format"] = 1, "something-else"
    json.dump(meta, open(val / "meta.json", "w"))
    with pytest.raises(shards.ShardError, match="format"):
        shards.Split(str(val))


def test_bad_layouts_are_explained(tmp_path):
    root = make_imagenet(str(tmp_path / "r"), classes=2, train=1, val=1)
    with pytest.raises(PackError, match="does not exist"):
        pack(str(tmp_path / "missing"), tmp_path / "o")
    os.makedirs(os.path.join(root, "val", "n09999999"))
    write(os.path.join(root, "val", "n09999999", "x.JPEG"), b"x")
    with pytest.raises(PackError, match="n09999999"):
        pack(root, tmp_path / "o")
    flat = make_imagenet(str(tmp_path / "flat"), classes=1, train=1, val=0)
    write(os.path.join(flat, "val", "ILSVRC2012_val_00000001.JPEG"), b"x")
    with pytest.raises(PackError, match="class folders"):
        pack(flat, tmp_path / "o2")


def test_rerun_is_a_no_op_and_different_input_is_refused(tiny_imagenet, tmp_path):
    pack(tiny_imagenet, tmp_path / "p")
    before = os.stat(tmp_path / "p" / "train" / "shard-00000.lmdb").st_mtime_ns
    res = pack(tiny_imagenet, tmp_path / "p")
    assert all(s.done_before for s in res.splits)
    assert os.stat(tmp_path / "p" / "train" / "shard-00000.lmdb").st_mtime_ns == before
    with pytest.raises(PackError, match="different input"):
        pack(tiny_imagenet, tmp_path / "p", seed=9)


def finished_shards(markers):
    """Shards a pack has finished so far: their markers (the merge removes the folder)."""
    try:
        return sum(f.endswith(".lmdb.json") for f in os.listdir(markers))
    except FileNotFoundError:
        return 0


def wait_until(cond, what, deadline):
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out after %d s waiting for %s" % (deadline, what))
        time.sleep(0.01)


def test_kill_9_then_rerun_packs_every_file_exactly_once(tmp_path):
    root = make_imagenet(str(tmp_path / "r"), classes=3, train=40, val=4)
    out = str(tmp_path / "p")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "pack_imagenet.py"), "--data", root,
           "--out", out, "--workers", "1", "--shard-size", "7", "--quiet"]
    markers = os.path.join(out, "train", ".pack")
    for _ in range(2):  # kill mid-run (twice, at different points), then finish
        done_before = finished_shards(markers)
        proc = subprocess.Popen(cmd, start_new_session=True)
        # a real sign of progress, however loaded the machine: this run finished a shard
        wait_until(lambda: proc.poll() is not None or finished_shards(markers) > done_before,
                   "the pack to finish a shard", deadline=120)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if not os.path.exists(os.path.join(out, "train", "meta.json")):
            with pytest.raises(shards.ShardError, match="incomplete"):
                shards.Split(os.path.join(out, "train"))
    subprocess.run(cmd, check=True)
    ref = str(tmp_path / "ref")
    subprocess.run(cmd[:4] + ["--out", ref] + cmd[6:], check=True)
    for split in ("train", "val"):
        got = records(os.path.join(out, split))
        assert sorted(r["path"] for r in got) == sorted(set(r["path"] for r in got))
        assert got == records(os.path.join(ref, split))
        assert not os.path.exists(os.path.join(out, split, ".pack"))
        assert not [f for f in os.listdir(os.path.join(out, split)) if f.endswith(".tmp")]


def test_pack_tool_help_and_errors(tmp_path):
    tool = os.path.join(ROOT, "tools", "pack_imagenet.py")
    r = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--max-side" in r.stdout and "--strict" in r.stdout
    r = subprocess.run([sys.executable, tool, "--data", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
