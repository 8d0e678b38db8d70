"""decode.validate_jpeg (a strict decode at DCT scale 1/8) rejects exactly the JPEGs that the
strict full decode (decode_bgr) rejects, with the same message, so the packer may validate with
it and keep what it kept before.

The corpus: real photographs encoded every way the packer meets (qualities, 4:2:0 / 4:2:2 /
4:4:4 / 4:1:1 / 4:4:0, baseline and progressive, optimised Huffman tables, restart intervals,
grayscale, CMYK, odd and tiny sizes), and damaged copies of them made deterministically from a
seed: truncations at many offsets, bit flips and byte overwrites in the headers and in the
entropy-coded data, inserted markers and bytes, deleted and duplicated runs, a lost EOI and
trailing garbage. Each file is judged by the full decode, by validate_jpeg, and by each of its
two paths on its own (the compiled decoder's validate, and TurboJPEG's scaled decode).
"""
import functools
import io
import os
from typing import List, Optional, Tuple

import cv2
import numpy as np
import pytest

from helpers import photo_bgr
from engine.data import decode as D
from engine.data.decode import DecodeError, decode_bgr, jpeg_info, validate_jpeg
from engine.data.pack import process_file

SAMPLING = {"420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
            "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
            "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
            "411": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411,
            "440": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440}


def _photo(name: str, h: int, w: int) -> np.ndarray:
    return cv2.resize(photo_bgr(name), (w, h), interpolation=cv2.INTER_AREA)


def _enc(img: np.ndarray, quality: int = 90, sampling: str = "420", progressive: bool = False,
         restart: int = 0, optimize: bool = False) -> bytes:
    flags = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if img.ndim == 3:
        flags += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, SAMPLING[sampling]]
    if progressive:
        flags += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    if restart:
        flags += [cv2.IMWRITE_JPEG_RST_INTERVAL, restart]
    if optimize:
        flags += [cv2.IMWRITE_JPEG_OPTIMIZE, 1]
    ok, buf = cv2.imencode(".jpg", img, flags)
    assert ok
    return buf.tobytes()


def _cmyk(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., ::-1]).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def sources() -> Tuple[Tuple[str, bytes], ...]:
    """Intact JPEGs; sizes are odd (partial iMCU rows and columns) and small (a fast test)."""
    chelsea, coffee = _photo("chelsea", 117, 173), _photo("coffee", 130, 197)
    astro, rocket = _photo("astronaut", 141, 141), _photo("rocket", 99, 149)
    gray = cv2.cvtColor(coffee, cv2.COLOR_BGR2GRAY)
    out = [
        ("420 q90", _enc(chelsea, 90, "420")),
        ("422 q75", _enc(coffee, 75, "422")),
        ("444 q95", _enc(astro, 95, "444")),
        ("411 q85", _enc(rocket, 85, "411")),
        ("440 q80", _enc(chelsea, 80, "440")),
        ("420 q60 optimised", _enc(astro, 60, "420", optimize=True)),
        ("420 progressive", _enc(coffee, 90, "420", progressive=True)),
        ("444 progressive q75", _enc(rocket, 75, "444", progressive=True)),
        ("422 progressive q95", _enc(astro, 95, "422", progressive=True)),
        ("420 restart 2", _enc(rocket, 90, "420", restart=2)),
        ("444 restart 5", _enc(chelsea, 85, "444", restart=5)),
        ("420 progressive restart 3", _enc(chelsea, 90, "420", progressive=True, restart=3)),
        ("gray", _enc(gray, 90)),
        ("gray progressive", _enc(gray, 80, progressive=True)),
        ("cmyk", _cmyk(rocket)),
        ("tiny 7x5", _enc(astro[:5, :7], 90, "420")),
        ("tiny 3x17 progressive", _enc(coffee[:17, :3], 90, "444", progressive=True)),
    ]
    for name, data in out:
        assert _full(data) is None, name  # intact sources decode
    return tuple(out)


MARKERS = [b"\xff\xd0", b"\xff\xd3", b"\xff\xd7", b"\xff\xd9", b"\xff\xda", b"\xff\xc4",
           b"\xff\xdb", b"\xff\xe1", b"\xff\xc0", b"\xff\xff", b"\xff\x00", b"\xff\xd8"]


def _scan_start(data: bytes) -> int:
    """Offset of the first entropy-coded byte (after the first SOS segment)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def damage(data: bytes, rng: np.random.Generator) -> Tuple[str, bytes]:
    """One damaged copy: (what was done, bytes)."""
    n = len(data)
    ecs = _scan_start(data)
    b = bytearray(data)

    def in_header() -> int:
        return int(rng.integers(2, ecs))

    def in_data() -> int:
        return int(rng.integers(ecs, n - 2))

    kind = int(rng.integers(0, 13))
    if kind == 0:  # truncation anywhere
        cut = int(rng.integers(1, n))
        return "truncate@%d" % cut, data[:cut]
    if kind == 1:  # truncation near the end: the last rows, the last bytes, the EOI
        cut = n - int(rng.integers(1, min(n - ecs, 400)))
        return "truncate-tail@%d" % cut, data[:cut]
    if kind == 2:  # bit flips in the entropy-coded data
        what = []
        for _ in range(int(rng.integers(1, 4))):
            pos, bit = in_data(), int(rng.integers(0, 8))
            b[pos] ^= 1 << bit
            what.append("%d.%d" % (pos, bit))
        return "flip-data@" + ",".join(what), bytes(b)
    if kind == 3:  # bit flip in the headers
        pos, bit = in_header(), int(rng.integers(0, 8))
        b[pos] ^= 1 << bit
        return "flip-header@%d.%d" % (pos, bit), bytes(b)
    if kind == 4:  # byte overwrite in the headers
        pos = in_header()
        b[pos] = int(rng.integers(0, 256))
        return "byte-header@%d" % pos, bytes(b)
    if kind == 5:  # byte overwrites in the entropy-coded data
        pos = in_data()
        for k in range(int(rng.integers(1, 5))):
            if pos + k < n:
                b[pos + k] = int(rng.integers(0, 256))
        return "bytes-data@%d" % pos, bytes(b)
    if kind == 6:  # a marker inserted into the entropy-coded data
        pos, m = in_data(), MARKERS[int(rng.integers(0, len(MARKERS)))]
        return "insert-marker@%d:%s" % (pos, m.hex()), data[:pos] + m + data[pos:]
    if kind == 7:  # a marker written over the entropy-coded data
        pos, m = in_data(), MARKERS[int(rng.integers(0, len(MARKERS)))]
        b[pos:pos + 2] = m
        return "overwrite-marker@%d:%s" % (pos, m.hex()), bytes(b)
    if kind == 8:  # a run deleted
        pos, k = in_data(), int(rng.integers(1, 65))
        return "delete@%d+%d" % (pos, k), data[:pos] + data[pos + k:]
    if kind == 9:  # random bytes inserted
        pos, k = in_data(), int(rng.integers(1, 17))
        junk = rng.integers(0, 256, k, dtype=np.uint8).tobytes()
        return "insert@%d+%d" % (pos, k), data[:pos] + junk + data[pos:]
    if kind == 10:  # a run duplicated
        pos, k = in_data(), int(rng.integers(1, 129))
        return "duplicate@%d+%d" % (pos, k), data[:pos + k] + data[pos:]
    if kind == 11:  # the EOI lost, or garbage after it
        if rng.random() < 0.5:
            return "no-eoi", data[:-2]
        junk = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        return "after-eoi", data + junk
    pos = int(rng.integers(2, n - 1))  # two adjacent bytes swapped anywhere
    b[pos], b[pos + 1] = b[pos + 1], b[pos]
    return "swap@%d" % pos, bytes(b)


def _verdict(check, data: bytes) -> Optional[str]:
    """None if accepted, else the error message. jpeg_info runs first, as in the packer."""
    try:
        check(data, jpeg_info(data))
        return None
    except DecodeError as exc:
        return str(exc)
    except MemoryError:
        return "MemoryError"  # a damaged header may claim more pixels than fit in memory


def _full(data: bytes) -> Optional[str]:
    return _verdict(lambda d, info: decode_bgr(d, info=info), data)


def _scaled_turbojpeg(data: bytes) -> Optional[str]:
    return _verdict(lambda d, info: decode_bgr(d, (D.VALIDATE_SCALE, 8), info=info), data)


NOT_ITS_OWN = "CMYK: not the compiled decoder's (validate_jpeg sends it to TurboJPEG)"


def _scaled_compiled(data: bytes) -> Optional[str]:
    def check(d, info):
        if info.needs_conversion:
            raise DecodeError(NOT_ITS_OWN)
        try:
            D._jpegroi.validate(d, D.VALIDATE_SCALE)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
    return _verdict(check, data)


def _validate_alone(data: bytes) -> Optional[str]:
    """validate_jpeg without a header probed first, as the packer calls it: the compiled
    decoder then reads the header itself and must refuse what TurboJPEG's probe refuses."""
    try:
        validate_jpeg(data)
        return None
    except DecodeError as exc:
        return str(exc)
    except MemoryError:
        return "MemoryError"


def _rewrite_wrong(name: str, what: str, data: bytes, full: Optional[str]) -> List[str]:
    """The packer's rewrite with restart markers (--restart-markers) doubles as its strict
    check: where it succeeds, the full decode must accept, and give the rewrite's pixels."""
    try:
        out = D.add_restarts(data)
    except DecodeError:
        return []  # refused: the packer asks validate_jpeg, whose verdict is checked below
    if out is None:
        return []  # not rewritten (progressive, CMYK): validate_jpeg decides
    if full is not None:
        return ["%s, %s: full decode %s, the rewrite accepts" % (name, what, full)]
    if not np.array_equal(decode_bgr(out), decode_bgr(data)):
        return ["%s, %s: the rewrite changed pixels" % (name, what)]
    return []


def _check_corpus(per_source: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    paths = [("validate_jpeg", lambda d: _verdict(validate_jpeg, d)),
             ("validate_jpeg, header too", _validate_alone),
             ("TurboJPEG at 1/8", _scaled_turbojpeg)]
    if D.roi_available():
        paths.append(("compiled validate", _scaled_compiled))
    rejected = accepted = 0
    wrong: List[str] = []
    for name, src in sources():
        for _ in range(per_source):
            what, data = damage(src, rng)
            full = _full(data)
            if full == "MemoryError":
                # The full decode cannot even allocate its output; the scaled one must reject.
                assert _verdict(validate_jpeg, data) not in (None, "MemoryError"), (name, what)
                continue
            rejected += full is not None
            accepted += full is None
            if D.roi_available():
                wrong += _rewrite_wrong(name, what, data, full)
            for label, judge in paths:
                got = judge(data)
                if got == NOT_ITS_OWN:
                    continue
                if (got is None) != (full is None):
                    wrong.append("%s, %s: full decode %s, %s %s"
                                 % (name, what, full or "accepts", label, got or "accepts"))
                elif label != "compiled validate" and got != full:
                    wrong.append("%s, %s: messages differ: full %r, %s %r"
                                 % (name, what, full, label, got))
    assert not wrong, "\n".join(wrong[:20])
    total = rejected + accepted
    # A corpus that is all one verdict would prove nothing.
    assert rejected > 0.3 * total and accepted > 0.1 * total, (rejected, accepted)


def test_intact_files_are_accepted_with_their_header():
    for name, src in sources():
        info = validate_jpeg(src)
        assert (info.width, info.height) == decode_bgr(src).shape[1::-1], name


def test_damaged_corpus_same_verdicts():
    _check_corpus(per_source=40, seed=2024)  # 680 damaged files


@pytest.mark.slow
def test_damaged_corpus_same_verdicts_large():
    _check_corpus(per_source=400, seed=7)  # 6800 damaged files


def test_every_truncation_offset_of_the_last_rows():
    """Truncations byte by byte over the end of the data, where a decode at 1/8 writes its last
    output row: the full decode's last 16 pixel rows come from the same bytes."""
    for name, src in sources():
        if name.startswith(("420 q90", "420 progressive", "gray", "444 restart")):
            for cut in range(len(src) - 120, len(src) + 1):
                assert _full(src[:cut]) == _verdict(validate_jpeg, src[:cut]), (name, cut)


@pytest.mark.parametrize("restarts", [0, 1])
def test_process_file_keeps_and_skips_as_the_full_decode_decides(tmp_path, restarts):
    """The packer's verdict per file: kept byte for byte with the header's size where the full
    decode accepts, skipped with the full decode's message where it rejects. With restart
    markers, the same verdicts and messages; a kept baseline file is rewritten to bytes that
    decode to its pixels."""
    if restarts and not D.roi_available():
        pytest.skip("--restart-markers needs the compiled decoder")
    rng = np.random.default_rng(99)
    n_skipped = 0
    for k, (name, src) in enumerate(sources()):
        for j in range(6):
            what, data = damage(src, rng) if j else ("intact", src)
            path = os.path.join(str(tmp_path), "%d_%d.JPEG" % (k, j))
            with open(path, "wb") as f:
                f.write(data)
            full = _full(data)
            got = process_file(path, restart_interval=restarts)
            if full is not None:
                assert got == {"skip": "corrupt JPEG: " + full}, (name, what)
                n_skipped += 1
            elif restarts and name != "cmyk":
                assert np.array_equal(decode_bgr(got["image"]), decode_bgr(data)), (name, what)
                assert (got["image"] == data) == ("progressive" in name), (name, what)
                h, w = decode_bgr(data).shape[:2]
                assert (got["height"], got["width"]) == (h, w), (name, what)
            elif name != "cmyk":
                h, w = decode_bgr(data).shape[:2]
                assert got == {"image": data, "height": h, "width": w,
                               "kind": "gray" if name.startswith("gray") else "jpeg"}, (name, what)
            else:
                assert got["kind"] == "converted:cmyk", what
    assert n_skipped > 20


def _with_sampling(src: bytes, factors: Tuple[int, ...]) -> bytes:
    """`src` (a baseline 3-component JPEG) with its SOF0's sampling factors replaced by
    `factors` = (h0, v0, h1, v1, h2, v2): the header layouts TurboJPEG's probe classifies."""
    b = bytearray(src)
    at = bytes(b).index(b"\xff\xc0")
    assert b[at + 9] == 3
    for k in range(3):
        b[at + 11 + 3 * k] = factors[2 * k] << 4 | factors[2 * k + 1]
    return bytes(b)


@pytest.mark.skipif(not D.roi_available(), reason="the compiled decoder is not built")
def test_compiled_header_refuses_what_turbojpegs_probe_refuses():
    """Every sampling-factor layout (1..4 each, 4096 headers written over a 4:4:4 file): where
    TurboJPEG's probe finds no subsampling class ("Could not determine subsampling type"), so
    that every TurboJPEG decode fails, the compiled validate refuses too; where both accept,
    they report the same header. (These files' data rarely fits the new layout; the hand-made
    file below is one libjpeg decodes.)"""
    src = _enc(_photo("astronaut", 32, 32), sampling="444")
    refused = agreed = 0
    for f in np.ndindex(4, 4, 4, 4, 4, 4):
        data = _with_sampling(src, tuple(x + 1 for x in f))
        try:
            info = jpeg_info(data)
        except DecodeError as exc:
            if "subsampling" in str(exc):
                refused += 1
                with pytest.raises(ValueError):
                    D._jpegroi.validate(data, D.VALIDATE_SCALE)
            continue
        try:
            got = D._jpegroi.validate(data, D.VALIDATE_SCALE)
        except ValueError:
            continue  # the data does not fit the new layout: the fallback has the last word
        agreed += 1
        assert got == (info.width, info.height, info.subsampling, info.colorspace), f
    assert refused > 1000 and agreed > 0, (refused, agreed)


def _flat_jpeg(luma: Tuple[int, int], w: int = 64, h: int = 32) -> bytes:
    """A valid baseline JPEG of flat grey with luma sampling factors `luma` and chroma at 1x1,
    written by hand (one-symbol Huffman tables: every block is DC category 0, then EOB, two
    bits): an encoder for the layouts that no library here writes."""
    def seg(marker: int, body: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + (len(body) + 2).to_bytes(2, "big") + body

    one_symbol = bytes([1] + [0] * 15) + b"\x00"  # one code of length 1, for symbol 0
    hs, vs = luma
    mcus = -(-w // (8 * hs)) * -(-h // (8 * vs))
    bits = 2 * mcus * (hs * vs + 2)
    data = bytearray(-(-bits // 8))
    if bits % 8:
        data[-1] = (1 << (8 - bits % 8)) - 1  # pad with 1 bits
    return (b"\xff\xd8" + seg(0xDB, b"\x00" + bytes([1] * 64))
            + seg(0xC0, bytes([8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes(
                [3, 1, hs << 4 | vs, 0, 2, 0x11, 0, 3, 0x11, 0]))
            + seg(0xC4, b"\x00" + one_symbol) + seg(0xC4, b"\x10" + one_symbol)
            + seg(0xDA, bytes([3, 1, 0, 2, 0, 3, 0, 0, 63, 0])) + bytes(data) + b"\xff\xd9")


@pytest.mark.skipif(not D.roi_available(), reason="the compiled decoder is not built")
def test_a_layout_libjpeg_decodes_but_turbojpeg_refuses_is_refused(tmp_path):
    """Luma at 4x2 with chroma at 1x1 is a valid JPEG that libjpeg decodes, but TurboJPEG's
    header probe knows no such subsampling, so the full decode refuses it: validate_jpeg, the
    compiled decoder on its own, and the packer refuse it too, with TurboJPEG's message."""
    ok = _flat_jpeg((2, 2))  # a layout TurboJPEG knows: the hand-made encoder is right
    assert decode_bgr(ok).shape == (32, 64, 3) and validate_jpeg(ok).subsampling == 2
    odd = _flat_jpeg((4, 2))
    full = _full(odd)
    assert full is not None and "subsampling" in full
    with pytest.raises(ValueError):
        D._jpegroi.validate(odd, D.VALIDATE_SCALE)
    assert _validate_alone(odd) == full
    path = os.path.join(str(tmp_path), "odd.JPEG")
    with open(path, "wb") as f:
        f.write(odd)
    assert process_file(path) == {"skip": "corrupt JPEG: " + full}
