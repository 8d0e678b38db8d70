"""Restart markers: the packer's lossless rewrite (add_restarts, --restart-markers) and the
decoder's seeking to a window's own MCUs in such files.

Contracts under test: a rewritten JPEG decodes to exactly the source's pixels at every DCT
scale; a window of a JPEG with restart markers decodes to exactly the full decode's pixels
there, while the data outside the pieces that cover it is never read; a pack made with
--restart-markers yields the same batches as one without, for every worker count and rank.
"""
import json
import os
from fractions import Fraction

import cv2
import numpy as np
import pytest
from helpers import encode_jpeg, make_imagenet, photo_bgr, window_grid

from engine.data import shards
from engine.data.decode import DecodeError, add_restarts, decode_bgr, decode_crop, roi_available
from engine.data.loader import Loader
from engine.data.pack import PackError, pack_imagenet
from engine.data.verify import verify_split

pytestmark = pytest.mark.skipif(not roi_available(),
                                reason="engine.data._jpegroi is not built")

if roi_available():
    from engine.data import _jpegroi as R

enc = encode_jpeg


def photo(name, h, w):
    return np.ascontiguousarray(cv2.resize(photo_bgr(name), (w, h), interpolation=cv2.INTER_AREA))


def full(src, num):
    f = Fraction(num, 8)
    return decode_bgr(src, None if num == 8 else (f.numerator, f.denominator))


def window(src, num, x0, y0, w, h, seek=True):
    out = np.empty((h, w, 3), np.uint8)
    R.decode_crop(src, num, x0, y0, w, h, out, seek=seek)
    return out


def windows(rng, W, H, n):
    wins = [(0, 0, W, H), (W - 1, H - 1, 1, 1), (0, 0, 1, 1), (W // 3, H // 3, W // 3 + 1, 1)]
    for _ in range(n):
        w, h = int(rng.integers(1, W + 1)), int(rng.integers(1, H + 1))
        wins.append((int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1)), w, h))
    return wins


def _mcus(src):
    w, h = R.header(src)
    sof = src.index(b"\xff\xc0")
    nf = src[sof + 9]
    hv = [src[sof + 11 + 3 * i] for i in range(nf)]
    mw = 8 * max(x >> 4 for x in hv) if nf > 1 else 8
    mh = 8 * max(x & 15 for x in hv) if nf > 1 else 8
    return -(-w // mw) * -(-h // mh)


@pytest.fixture(scope="module")
def sources():
    """Baseline JPEGs in every layout the decoder handles, odd sizes included."""
    astro, coffee = photo("astronaut", 375, 500), photo("coffee", 333, 501)
    rocket, chelsea = photo("rocket", 257, 389), photo("chelsea", 300, 451)
    return {"420": enc(astro), "420_odd": enc(coffee, quality=95), "422": enc(chelsea, "422"),
            "444": enc(rocket, "444", quality=85), "411": enc(coffee, "411"),
            "440": enc(rocket, "440"), "gray": enc(chelsea, "gray"),
            "420_rst3": enc(rocket, restart=3)}


@pytest.fixture(scope="module")
def marked(sources):
    return {name: add_restarts(src) for name, src in sources.items()}


# ----------------------------------------------------------------------------------------------
# the rewrite


def test_rewrite_keeps_every_pixel_at_every_scale(sources, marked):
    for name, src in sources.items():
        out = marked[name]
        assert out is not None and out != src and out[:2] == b"\xff\xd8"
        assert R.header(out) == R.header(src)
        assert b"\xff\xdd\x00\x04\x00\x01" in out  # DRI: one MCU
        for num in range(1, 9):
            assert np.array_equal(full(out, num), full(src, num)), (name, num)
        # the price in bytes: a marker, padding and a DC value coded afresh per MCU, about 3-5
        # bytes; most, relatively, for small 4:4:4 files (8x8-pixel MCUs)
        assert len(out) < len(src) * 1.4 and len(out) - len(src) < 5 * _mcus(src), name


def test_rewrite_of_an_rgb_jpeg_stays_rgb():
    """An Adobe RGB JPEG (no YCbCr transform) must still decode as RGB after the rewrite."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(photo("chelsea", 120, 161)[..., ::-1]).save(buf, "JPEG", quality=90,
                                                               subsampling=0, keep_rgb=True)
    src = buf.getvalue()
    out = add_restarts(src)
    assert np.array_equal(decode_bgr(out), decode_bgr(src))


def test_rewrite_leaves_what_it_cannot_rewrite_alone():
    img = photo("astronaut", 96, 128)
    assert add_restarts(enc(img, progressive=True)) is None
    with pytest.raises(DecodeError):
        add_restarts(b"\xff\xd8\xff\xe0 not a jpeg")
    src = enc(img)
    with pytest.raises(DecodeError, match="Premature end|Corrupt"):
        add_restarts(src[:len(src) * 2 // 3])


def test_tiny_images_rewrite_and_seek_exactly():
    base = photo_bgr("astronaut")
    for (h, w) in [(1, 1), (8, 8), (9, 1), (1, 9), (7, 13), (17, 33), (31, 47)]:
        img = np.ascontiguousarray(base[200:200 + 4 * h:4, 180:180 + 4 * w:4])
        for s in ("420", "422", "444", "gray"):
            src = enc(img, s)
            out = add_restarts(src)
            for num in (1, 2, 4, 8):
                ref = full(src, num)
                H, W = ref.shape[:2]
                for y0 in range(H):
                    for x0 in range(W):
                        got = window(out, num, x0, y0, W - x0, H - y0)
                        assert np.array_equal(got, ref[y0:, x0:]), ((w, h), s, num, x0, y0)


# ----------------------------------------------------------------------------------------------
# seeking


@pytest.mark.parametrize("num", [1, 2, 3, 4, 8])
def test_windows_of_a_marked_file_equal_the_full_decode(sources, marked, num):
    rng = np.random.default_rng(num)
    for name, src in sources.items():
        ref = full(src, num)
        H, W = ref.shape[:2]
        for (x0, y0, w, h) in windows(rng, W, H, 30):
            got = window(marked[name], num, x0, y0, w, h)
            assert np.array_equal(got, ref[y0:y0 + h, x0:x0 + w]), (name, num, (x0, y0, w, h))


def test_fast_idct_windows_equal_the_source_s(sources, marked):
    """The training path decodes with the fast integer IDCT: a marked file's windows then equal
    the source's windows decoded the same way."""
    rng = np.random.default_rng(17)
    for name, src in sources.items():
        for num in (2, 4, 8):
            W, H = (-(-d * num // 8) for d in R.header(src))
            for (x0, y0, w, h) in windows(rng, W, H, 8):
                a, b = (np.empty((h, w, 3), np.uint8) for _ in range(2))
                R.decode_crop(src, num, x0, y0, w, h, a, True)
                R.decode_crop(marked[name], num, x0, y0, w, h, b, True)
                assert np.array_equal(a, b), (name, num, (x0, y0, w, h))


@pytest.mark.parametrize("layout", ["420", "422", "440", "411", "444", "gray"])
def test_every_window_position_of_a_small_marked_photo(layout):
    """Every (x0, y0) of a small photo at 1/1 and 1/2: each edge of the cut-out sub-image (and
    its margin) falls at every offset from an MCU boundary."""
    src = enc(photo_bgr("chelsea")[100:164, 150:206], layout)  # 64 rows x 56 columns
    out = add_restarts(src)
    for num in (8, 4):
        ref = full(src, num)
        H, W = ref.shape[:2]
        for (x0, y0, w, h) in window_grid(W, H):
            got = window(out, num, x0, y0, w, h)
            assert np.array_equal(got, ref[y0:y0 + h, x0:x0 + w]), (layout, num, x0, y0)


def _damage_first_piece(src):
    """src with the entropy-coded bytes of its first restart interval overwritten."""
    data = bytearray(src)
    sos = data.index(b"\xff\xda")
    start = sos + 2 + ((data[sos + 2] << 8) | data[sos + 3])
    rst0 = data.index(b"\xff\xd0", start)
    assert rst0 - start >= 4
    data[start:rst0] = b"\x00" * (rst0 - start)
    return bytes(data)


@pytest.mark.parametrize("num", [1, 2, 4, 8])
def test_every_layout_seeks(marked, sources, num):
    """The seek is taken, not just its fallback, for every layout and scale: with the image's
    first MCU destroyed, windows in the lower right still decode to the full decode's pixels
    (a sub-image the decoder refused would send them to the whole-image path, which reads the
    damage)."""
    rng = np.random.default_rng(num)
    for name, src in sources.items():
        if name == "420_rst3":
            continue  # a file with markers of its own; test_files_with_other_restart_intervals
        out, ref = _damage_first_piece(marked[name]), full(src, num)
        H, W = ref.shape[:2]
        for _ in range(6):
            x0, y0 = int(rng.integers(W // 2, W)), int(rng.integers(H // 2, H))
            w, h = int(rng.integers(1, W - x0 + 1)), int(rng.integers(1, H - y0 + 1))
            assert np.array_equal(window(out, num, x0, y0, w, h), ref[y0:y0 + h, x0:x0 + w]), \
                (name, num, (x0, y0, w, h))


def test_seeking_reads_only_the_pieces_a_window_needs(marked, sources):
    """Proof that the seek happens: with the image's first MCU destroyed, a window away from
    it still decodes to the real pixels, while the whole-image path (which must entropy-decode
    that MCU to reach the window) fails."""
    src, out = sources["420"], _damage_first_piece(marked["420"])
    ref = full(src, 8)
    x0, y0, w, h = 200, 150, 120, 100
    assert np.array_equal(window(out, 8, x0, y0, w, h), ref[y0:y0 + h, x0:x0 + w])
    for x, y in ((x0, y0), (0, 0)):  # the whole image's path; a window over the damage
        try:
            got = window(out, 8, x, y, w, h, seek=x == 0)
        except ValueError:
            continue  # libjpeg noticed
        assert not np.array_equal(got, ref[y:y + h, x:x + w])  # or decoded the damage
    # through the engine's own decode_crop too (what the loader calls)
    assert np.array_equal(decode_crop(out, 8, x0, y0, w, h), ref[y0:y0 + h, x0:x0 + w])


def test_files_with_other_restart_intervals(sources):
    """An interval dividing the MCU row seeks; any other (here 3 MCUs of a 25-MCU row, and 7)
    takes the whole-image path; both give the full decode's pixels."""
    rng = np.random.default_rng(5)
    img = photo("rocket", 256, 400)  # 25 MCUs per row at 4:2:0
    for k in (1, 5, 25, 3, 7):
        src = enc(img, restart=k)
        ref = full(src, 8)
        for (x0, y0, w, h) in windows(rng, 400, 256, 10):
            assert np.array_equal(window(src, 8, x0, y0, w, h), ref[y0:y0 + h, x0:x0 + w]), k


def test_markers_out_of_sequence_fall_back_to_the_whole_image(marked, sources):
    """A renumbered marker (RST5 where RST2 belongs) makes the seek refuse the file; the whole
    image path then decides, as libjpeg does for any damaged file (here: an error)."""
    data = bytearray(marked["420"])
    sos = data.index(b"\xff\xda")
    pos = data.index(b"\xff\xd2", sos)
    data[pos + 1] = 0xD5
    with pytest.raises(ValueError):
        window(bytes(data), 8, 300, 200, 50, 50)


def test_truncated_marked_file_never_gives_gray_rows(marked, sources):
    out, ref = marked["422"], full(sources["422"], 8)
    H, W = ref.shape[:2]
    cut = out[:len(out) * 6 // 10]
    rng = np.random.default_rng(9)
    decoded = 0
    for (x0, y0, w, h) in windows(rng, W, H, 60):
        try:
            got = window(cut, 8, x0, y0, w, h)
        except ValueError:
            continue
        assert np.array_equal(got, ref[y0:y0 + h, x0:x0 + w])
        decoded += 1
    assert decoded > 0  # windows in the first 60 % of the image still decode


# ----------------------------------------------------------------------------------------------
# the pack option


def quiet(*_a):
    pass


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    src = make_imagenet(str(tmp_path_factory.mktemp("src") / "r"), classes=3, train=8, val=3)
    base = tmp_path_factory.mktemp("packs")
    plain = str(base / "plain")
    marked_ = str(base / "marked")
    pack_imagenet(src, plain, workers=0, progress=False, log=quiet, shard_size=5)
    pack_imagenet(src, marked_, workers=2, progress=False, log=quiet, shard_size=5,
                  restart_markers=True)
    return src, plain, marked_


def test_pack_records_are_rewritten_and_recorded(packs):
    _, plain, marked_ = packs
    for split in ("train", "val"):
        meta = shards.read_meta(os.path.join(marked_, split))
        assert meta["restart_interval"] == 1 and meta["version"] == 1
        assert "restart_interval" not in shards.read_meta(os.path.join(plain, split))
        a = {r["path"]: r for r in shards.Split(os.path.join(plain, split))}
        b = {r["path"]: r for r in shards.Split(os.path.join(marked_, split))}
        assert a.keys() == b.keys()
        for path, rec in b.items():
            assert rec["image"] != a[path]["image"]
            assert np.array_equal(decode_bgr(rec["image"]), decode_bgr(a[path]["image"]))
        assert verify_split(os.path.join(marked_, split)).mismatches == []


@pytest.mark.parametrize("train", [True, False])
def test_loader_batches_equal_an_unmarked_pack(packs, train):
    """The same batches, bit for bit, for 0 and 2 workers and for each of 2 ranks."""
    _, plain, marked_ = packs
    split = "train" if train else "val"
    for workers, rank, world in ((0, 0, 1), (2, 0, 2), (2, 1, 2)):
        got = []
        for root in (plain, marked_):
            with Loader(os.path.join(root, split), batch_size=4, train=train, image_size=64,
                        workers=workers, seed=11, rank=rank, world_size=world) as ld:
                got.append([(x.copy(), y.copy()) for x, y in ld])
        assert len(got[0]) == len(got[1]) > 0
        for (xa, ya), (xb, yb) in zip(*got):
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb), (workers, rank)


def test_rerun_with_the_other_choice_is_refused_naming_it(packs):
    src, _, marked_ = packs
    with pytest.raises(PackError, match=r"restart_interval 1 then, 0 now \(--restart-markers\)"):
        pack_imagenet(src, marked_, workers=0, progress=False, log=quiet, shard_size=5)
    # the same choice again: a finished pack, left alone
    res = pack_imagenet(src, marked_, workers=0, progress=False, log=quiet, shard_size=5,
                        restart_markers=True)
    assert all(s.done_before for s in res.splits)


def test_cli_flag(packs, tmp_path):
    from engine.tools.pack_imagenet import main

    src = packs[0]
    assert main(["--data", src, "--out", str(tmp_path / "p"), "--splits", "val", "--quiet",
                 "--restart-markers", "--workers", "0"]) == 0
    meta = json.load(open(tmp_path / "p" / "val" / "meta.json"))
    assert meta["restart_interval"] == 1
