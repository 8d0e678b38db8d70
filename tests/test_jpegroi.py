"""engine.data._jpegroi: window (ROI) + DCT-scaled JPEG decoding with libjpeg-turbo.

Contract under test: decode_crop(src, num, x0, y0, w, h, dst) writes exactly
TurboJPEG().decode(src, TJPF_BGR, scaling_factor=num/8)[y0:y0+h, x0:x0+w] into dst, bit for
bit, at every scale; anything wrong with the input is a ValueError, never a crash.
"""
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import cv2
import numpy as np
import pytest
from helpers import encode_jpeg, photo_bgr, window_grid

try:
    from engine.data import _jpegroi as R
except ImportError:  # not built: every test but the next one skips
    R = None
try:
    import turbojpeg
    from PIL import Image as PIL_Image
except ImportError:
    turbojpeg = PIL_Image = None

HEADERS = os.path.exists("/usr/include/jpeglib.h")


def test_extension_is_built_when_headers_exist():
    """A broken build must not hide behind a skip: libjpeg headers present => module built."""
    if not HEADERS:
        pytest.skip("libjpeg headers not installed; the loader falls back to PyTurboJPEG")
    from engine.data import _jpegroi  # ImportError here = the extension failed to build

    assert callable(_jpegroi.decode_crop) and callable(_jpegroi.header)
    assert callable(_jpegroi.validate)


@pytest.fixture(autouse=True)
def _needs_extension(request):
    if request.node.name == "test_extension_is_built_when_headers_exist":
        return
    if R is None:
        pytest.skip("engine.data._jpegroi is not built (python setup.py build_ext --inplace)")
    if turbojpeg is None or PIL_Image is None:
        pytest.skip("needs PyTurboJPEG and Pillow")


_TJ = []


def tj():
    if not _TJ:
        _TJ.append(turbojpeg.TurboJPEG())
    return _TJ[0]

enc = encode_jpeg


def enc_pil(bgr, subsampling=2, progressive=False, quality=90, mode="RGB", **kw):
    out = io.BytesIO()
    im = PIL_Image.fromarray(np.ascontiguousarray(bgr[..., ::-1])).convert(mode)
    im.save(out, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive, **kw)
    return out.getvalue()


def photo(name, h=None, w=None):
    img = photo_bgr(name)
    if h is not None:
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def full_decode(src, num):
    f = Fraction(num, 8)
    return tj().decode(src, pixel_format=turbojpeg.TJPF_BGR,
                     scaling_factor=(f.numerator, f.denominator))


def crop(src, num, x0, y0, w, h):
    out = np.empty((h, w, 3), np.uint8)
    assert R.decode_crop(src, num, x0, y0, w, h, out) is None
    return out


def random_windows(rng, W, H, n):
    for _ in range(n):
        w, h = int(rng.integers(1, W + 1)), int(rng.integers(1, H + 1))
        yield int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1)), w, h


def edge_windows(W, H):
    """Full image, corners, single pixels, first/last rows and columns."""
    wins = {(0, 0, W, H), (0, 0, 1, 1), (W - 1, H - 1, 1, 1), (W - 1, 0, 1, H), (0, H - 1, W, 1),
            (0, 0, W, 1), (0, 0, 1, H), (W // 2, H // 2, W - W // 2, H - H // 2)}
    for a in (1, 7, 8, 9, 15, 16, 17, 31, 32, 33):
        if a < W:
            wins.add((a, 0, W - a, H))
            wins.add((a, min(a, H - 1), min(W - a, 5), H - min(a, H - 1)))
        if a < H:
            wins.add((0, a, W, H - a))
            wins.add((0, 0, W, a))
    return sorted(wins)


@pytest.fixture(scope="module")
def jpegs():
    """Real photographs in every layout the decoder must handle."""
    chelsea = photo("chelsea")                 # 300 x 451
    coffee = photo("coffee", 333, 501)         # odd size
    astro = photo("astronaut", 375, 500)       # ImageNet-like
    rocket = photo("rocket", 257, 389)
    return {
        "gray": enc(chelsea, "gray"),
        "gray_prog": enc(rocket, "gray", progressive=True),
        "420": enc(astro, "420"),
        "420_odd": enc(coffee, "420", quality=95),
        "420_prog_odd": enc(coffee, "420", progressive=True),
        "420_rst": enc(rocket, "420", restart=3),
        "422": enc(chelsea, "422"),
        "422_prog": enc(astro, "422", progressive=True),
        "444": enc(rocket, "444", quality=85),
        "444_prog": enc(chelsea, "444", progressive=True),
        "411": enc(coffee, "411"),
        "440": enc(rocket, "440"),
        "pil_420_prog": enc_pil(astro, 2, progressive=True),
        "pil_422": enc_pil(coffee, 1),
        "pil_444_prog": enc_pil(rocket, 0, progressive=True),
        "pil_rgb": enc_pil(chelsea, 0, keep_rgb=True),  # Adobe RGB JPEG (no YCbCr transform)
    }


@pytest.fixture(scope="module")
def tiny_jpegs():
    """1x1, 8x8 and other tiny sizes cut from a photo."""
    src = photo("astronaut")
    out = {}
    for (h, w) in [(1, 1), (8, 8), (1, 9), (9, 1), (7, 13), (16, 16), (17, 33)]:
        img = np.ascontiguousarray(src[200:200 + 4 * h:4, 180:180 + 4 * w:4])
        for s in ("420", "422", "444", "gray"):
            out["%dx%d_%s" % (w, h, s)] = enc(img, s)
        out["%dx%d_420_prog" % (w, h)] = enc(img, "420", progressive=True)
    return out


# ----------------------------------------------------------------------------------------------
# bit-exactness


def test_header(jpegs):
    assert R.header(jpegs["420"]) == (500, 375)
    assert R.header(jpegs["420_odd"]) == (501, 333)
    assert R.header(memoryview(jpegs["gray"])) == (451, 300)


def test_scale1_crop_equals_full_decode_window(jpegs):
    """Mandatory: the crop decoded at 1/1 equals the same window of a full decode."""
    rng = np.random.default_rng(1)
    n = 0
    for name, src in jpegs.items():
        full = full_decode(src, 8)
        H, W = full.shape[:2]
        assert R.header(src) == (W, H)
        for (x0, y0, w, h) in edge_windows(W, H) + list(random_windows(rng, W, H, 40)):
            got = crop(src, 8, x0, y0, w, h)
            ref = full[y0:y0 + h, x0:x0 + w]
            assert np.array_equal(got, ref), (name, (x0, y0, w, h),
                                              int(np.abs(got.astype(int) - ref).max()))
            n += 1
    assert n > 800


@pytest.mark.parametrize("num", [1, 2, 3, 4, 5, 6, 7])
def test_scaled_crop_equals_scaled_full_decode(jpegs, num):
    """Also exact at every DCT scale (the margins make the crop's edges a full decode's)."""
    rng = np.random.default_rng(num)
    for name, src in jpegs.items():
        full = full_decode(src, num)
        H, W = full.shape[:2]
        w0, h0 = R.header(src)
        assert (W, H) == (-(-w0 * num // 8), -(-h0 * num // 8))
        for (x0, y0, w, h) in edge_windows(W, H)[::2] + list(random_windows(rng, W, H, 12)):
            got = crop(src, num, x0, y0, w, h)
            ref = full[y0:y0 + h, x0:x0 + w]
            assert np.array_equal(got, ref), (name, num, (x0, y0, w, h),
                                              int(np.abs(got.astype(int) - ref).max()))


def test_tiny_images_all_windows_all_scales(tiny_jpegs):
    for name, src in tiny_jpegs.items():
        for num in range(1, 9):
            full = full_decode(src, num)
            H, W = full.shape[:2]
            for y0 in range(H):
                for x0 in range(W):
                    for (w, h) in {(1, 1), (W - x0, H - y0), (max(1, (W - x0) // 2), 1)}:
                        got = crop(src, num, x0, y0, w, h)
                        assert np.array_equal(got, full[y0:y0 + h, x0:x0 + w]), \
                            (name, num, (x0, y0, w, h))


@pytest.mark.parametrize("layout", ["420", "422", "440", "411", "444_prog", "gray"])
def test_every_window_position_small_photo(layout):
    """Every (x0, y0) of a small photo, at 1/1 and 1/2: catches any iMCU-alignment edge case."""
    img = photo("chelsea")[100:148, 150:190]  # 48 rows x 40 columns of fur
    sampling, _, prog = layout.partition("_")
    src = enc(img, sampling, progressive=bool(prog))
    for num in (8, 4):
        full = full_decode(src, num)
        H, W = full.shape[:2]
        for (x0, y0, w, h) in window_grid(W, H):
            got = crop(src, num, x0, y0, w, h)
            assert np.array_equal(got, full[y0:y0 + h, x0:x0 + w]), (layout, num, x0, y0)


def test_accepts_any_bytes_like_source_without_copy(jpegs):
    src = jpegs["420"]
    ref = crop(src, 8, 100, 50, 64, 32)
    padded = b"xxxx" + src + b"yyyy"
    for s in (bytearray(src), memoryview(padded)[4:-4], np.frombuffer(src, np.uint8)):
        assert np.array_equal(crop(s, 8, 100, 50, 64, 32), ref)
    out = np.empty((32, 64, 3), np.uint8)
    R.decode_crop(src=src, scale_num=8, x0=100, y0=50, w=64, h=32, dst=out)
    assert np.array_equal(out, ref)
    buf = bytearray(32 * 64 * 3)  # any writable buffer works as dst
    R.decode_crop(src, 8, 100, 50, 64, 32, buf)
    assert bytes(buf) == ref.tobytes()


def test_threads_release_gil_and_stay_correct(jpegs):
    src = jpegs["422_prog"]
    full = full_decode(src, 8)
    H, W = full.shape[:2]
    wins = list(random_windows(np.random.default_rng(7), W, H, 64))
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda win: crop(src, 8, *win), wins))
    for (x0, y0, w, h), got in zip(wins, outs):
        assert np.array_equal(got, full[y0:y0 + h, x0:x0 + w])
    # The GIL is released: a Python thread keeps running *during* one long decode.  (With the
    # GIL held it could not run at all between the call's start and end.)
    big = enc(cv2.resize(photo("astronaut"), (2000, 2000)), "444", progressive=True)
    inside = 0
    for _ in range(3):
        stamps, stop = [], threading.Event()

        def ticker():
            while not stop.is_set():
                stamps.append(time.perf_counter())

        t = threading.Thread(target=ticker)
        t.start()
        try:
            time.sleep(0.01)
            t0 = time.perf_counter()
            crop(big, 8, 0, 0, 2000, 2000)
            t1 = time.perf_counter()
        finally:
            stop.set()
            t.join()
        margin = (t1 - t0) * 0.2
        inside = sum(t0 + margin < s < t1 - margin for s in stamps)
        if inside:
            break
    assert inside > 0


# ----------------------------------------------------------------------------------------------
# errors


def test_bad_window_raises(jpegs):
    src = jpegs["420_odd"]  # 501 x 333; at 4/8: 251 x 167
    for num, win in [(8, (0, 0, 502, 1)), (8, (0, 0, 1, 334)), (8, (500, 0, 2, 1)),
                     (8, (0, 333, 1, 1)), (4, (0, 0, 252, 10)), (4, (250, 166, 2, 1)),
                     (1, (63, 0, 1, 1)), (8, (-1, 0, 1, 1)), (8, (0, -5, 1, 1)),
                     (8, (0, 0, 0, 1)), (8, (0, 0, 1, 0)), (8, (2 ** 40, 0, 1, 1))]:
        w, h = max(win[2], 0), max(win[3], 0)
        with pytest.raises(ValueError):
            R.decode_crop(src, num, *win, np.empty(max(w * h * 3, 0), np.uint8))
    crop(src, 4, 250, 166, 1, 1)  # the last pixel at 4/8 is fine
    crop(src, 1, 62, 41, 1, 1)    # and at 1/8 (ceil(501/8)=63, ceil(333/8)=42)
    for num in (0, 9, -8, 16):
        with pytest.raises(ValueError, match="scale_num"):
            R.decode_crop(src, num, 0, 0, 1, 1, np.empty((1, 1, 3), np.uint8))


def test_timing_stops_run_on_every_layout_and_leave_the_decode_alone(jpegs):
    """decode_crop's `stop` (bench_stages times the decoder's stages with it): every stop runs
    on every layout and window, a bad one is refused, and stop=0 is the plain decode."""
    for name, src in jpegs.items():
        H, W = full_decode(src, 8).shape[:2]
        for num, (x0, y0, w, h) in [(8, (0, 0, W, H)), (8, (W // 3, H // 4, W // 2, H // 2)),
                                    (4, (1, 0, (W + 1) // 2 - 1, (H + 1) // 2)),
                                    (8, (W - 5, H - 3, 5, 3))]:
            want = crop(src, num, x0, y0, w, h)
            for stop in (1, 2, 3):
                R.decode_crop(src, num, x0, y0, w, h, np.empty((h, w, 3), np.uint8), True, stop)
            out = np.empty((h, w, 3), np.uint8)
            R.decode_crop(src, num, x0, y0, w, h, out, stop=0)
            assert np.array_equal(out, want), (name, num, x0, y0)
    for stop in (-1, 4):
        with pytest.raises(ValueError, match="stop"):
            R.decode_crop(jpegs["420"], 8, 0, 0, 1, 1, np.empty((1, 1, 3), np.uint8), stop=stop)


def test_wrong_dst_raises(jpegs):
    src = jpegs["420"]
    for shape in [(10, 10, 3), (11, 11, 3), (11, 10), (0,)]:
        with pytest.raises(ValueError, match="dst"):
            R.decode_crop(src, 8, 0, 0, 11, 10, np.empty(shape, np.uint8))
    with pytest.raises((TypeError, ValueError, BufferError)):  # read-only
        R.decode_crop(src, 8, 0, 0, 1, 1, bytes(3))
    ro = np.empty((1, 1, 3), np.uint8)
    ro.flags.writeable = False
    with pytest.raises((TypeError, ValueError, BufferError)):
        R.decode_crop(src, 8, 0, 0, 1, 1, ro)
    with pytest.raises((TypeError, ValueError, BufferError)):  # not C-contiguous
        R.decode_crop(src, 8, 0, 0, 10, 10, np.empty((10, 20, 3), np.uint8)[:, ::2])
    with pytest.raises(TypeError):
        R.decode_crop("not bytes", 8, 0, 0, 1, 1, np.empty(3, np.uint8))


def test_cmyk_raises_unsupported_colour_space():
    cmyk = enc_pil(photo("coffee", 120, 160), mode="CMYK")
    assert R.header(cmyk) == (160, 120)  # the header itself is fine
    with pytest.raises(ValueError, match="unsupported colour space"):
        R.decode_crop(cmyk, 8, 0, 0, 16, 16, np.empty((16, 16, 3), np.uint8))


def test_not_a_jpeg_raises_libjpeg_message():
    with pytest.raises(ValueError, match="Not a JPEG file"):
        R.decode_crop(b"\x89PNG\r\n\x1a\n" + bytes(100), 8, 0, 0, 1, 1, np.empty(3, np.uint8))
    with pytest.raises(ValueError):
        R.header(b"")
    with pytest.raises(ValueError):
        R.decode_crop(b"", 8, 0, 0, 1, 1, np.empty(3, np.uint8))


def test_hostile_huge_dimensions_fail_fast():
    """A header claiming 65000x65000 must not allocate gigabytes nor decode for long."""
    base = photo("coffee", 48, 64)
    for prog in (False, True):
        b = bytearray(enc(base, "444", progressive=prog))
        i = b.index(b"\xff\xc2" if prog else b"\xff\xc0")
        b[i + 5:i + 9] = (65000).to_bytes(2, "big") * 2
        assert R.header(b) == (65000, 65000)
        t = time.perf_counter()
        for win in [(0, 0, 64, 64), (30000, 64000, 100, 100), (0, 0, 65000, 1)]:
            with pytest.raises(ValueError, match="too large" if prog else "Corrupt JPEG data"):
                crop(bytes(b), 8, *win)
        assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("name", ["420", "422_prog", "gray", "420_rst"])
def test_truncated_jpeg_raises_not_gray_rows(jpegs, name):
    src = jpegs[name]
    full = full_decode(src, 8)
    H, W = full.shape[:2]
    for frac in (0.3, 0.6, 0.9, 0.98):
        cut = src[:int(len(src) * frac)]
        with pytest.raises(ValueError, match="Premature end of JPEG file|Corrupt JPEG"):
            crop(cut, 8, 0, 0, W, H)
    # A window above the truncation point of a baseline file may decode, and then it must be
    # the real pixels; anything touching missing data raises.
    rng = np.random.default_rng(3)
    cut = src[:int(len(src) * 0.7)]
    ok = 0
    for (x0, y0, w, h) in random_windows(rng, W, H, 60):
        try:
            got = crop(cut, 8, x0, y0, w, h)
        except ValueError:
            continue
        assert np.array_equal(got, full[y0:y0 + h, x0:x0 + w])
        ok += 1
    if "prog" in name:
        assert ok == 0  # progressive: every scan is read up front


def test_corrupt_data_warning_raises(jpegs):
    """'Corrupt JPEG data' warnings (here: a bogus marker in the entropy data) are errors."""
    src = bytearray(jpegs["420"])
    sos = src.index(b"\xff\xda")
    mid = sos + (len(src) - sos) // 3
    src[mid:mid + 2] = b"\xff\xd5"  # RST5 where none is expected
    W, H = R.header(src)
    with pytest.raises(ValueError):
        crop(bytes(src), 8, 0, 0, W, H)


# ----------------------------------------------------------------------------------------------
# fuzz: every call returns or raises ValueError; a crash kills pytest and fails the run


def _try(src, rng):
    """header + a few decode_crop calls with windows inside the (claimed) image (seeking between
    restart markers where the file has them), validate at the smallest and the full scale, and
    the rewrite with restart markers."""
    try:
        R.add_restarts(src)
    except ValueError:
        pass
    for num in (1, 8):
        try:
            R.validate(src, num)
        except ValueError:
            pass
    try:
        W, H = R.header(src)
    except ValueError:
        W, H = int(rng.integers(1, 64)), int(rng.integers(1, 64))
    for _ in range(2):
        num = int(rng.integers(1, 9))
        Ws, Hs = max(1, -(-W * num // 8)), max(1, -(-H * num // 8))
        w, h = int(rng.integers(1, min(Ws, 96) + 1)), int(rng.integers(1, min(Hs, 96) + 1))
        x0, y0 = int(rng.integers(0, max(Ws - w, 0) + 1)), int(rng.integers(0, max(Hs - h, 0) + 1))
        try:
            R.decode_crop(src, num, x0, y0, w, h, np.empty((h, w, 3), np.uint8))
        except ValueError:
            pass


def test_fuzz_hostile_input_never_crashes():
    rng = np.random.default_rng(12345)
    base = photo("astronaut", 72, 88)
    seeds = [enc(base, "420"), enc(base, "422", progressive=True), enc(base, "gray"),
             enc(base, "444", restart=2), enc(base, "411", progressive=True),
             enc_pil(base, 2, progressive=True), enc_pil(base, 0, mode="CMYK"),
             R.add_restarts(enc(base, "420")), R.add_restarts(enc(base, "444"))]
    cases = 0
    for _ in range(300):  # random bytes, with and without a JPEG SOI
        n = int(rng.integers(0, 400))
        junk = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        _try(junk, rng)
        _try(b"\xff\xd8" + junk, rng)
        cases += 2
    for src in seeds:
        for cut in np.unique(np.linspace(0, len(src), 120).astype(int)):  # truncations
            _try(src[:cut], rng)
            cases += 1
        for _ in range(400):  # bit flips (1-4 per case)
            b = bytearray(src)
            for pos in rng.integers(0, len(b), int(rng.integers(1, 5))):
                b[pos] ^= 1 << int(rng.integers(0, 8))
            _try(bytes(b), rng)
            cases += 1
        for _ in range(250):  # byte overwrites, biased towards the headers
            b = bytearray(src)
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(0, min(len(b), 700) if rng.random() < 0.6 else len(b)))
                b[pos] = int(rng.integers(0, 256))
            _try(bytes(b), rng)
            cases += 1
    assert cases >= 5000
    # still sane afterwards
    src = seeds[0]
    assert np.array_equal(crop(src, 8, 5, 6, 30, 20), full_decode(src, 8)[6:26, 5:35])
