"""What the packer stores for one input file: the file kept byte for byte, converted to a JPEG,
stored as raw pixels (format version 2), or skipped with a reason; and which files are stored as
raw pixels. The record bytes themselves are engine.data.shards'.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np

from engine.data.decode import DecodeError, JpegInfo, add_restarts, decode_bgr, jpeg_info, sniff, validate_jpeg
from engine.data.folder import read_file

__all__ = ["JPEG_QUALITY", "RESTART_INTERVAL", "stores_raw", "process_file"]

# Quality of the JPEGs the packer re-encodes, unless --jpeg-quality says otherwise.
JPEG_QUALITY = 95
# MCUs between restart markers with --restart-markers: one, so a crop's pieces start and end at
# its own MCUs. libjpeg-turbo 2.1 takes its slower Huffman path for any interval, and each
# marker costs ~3 bytes, so a longer interval would save little and seek coarser.
RESTART_INTERVAL = 1


def stores_raw(seed: int, index: int, fraction: float) -> bool:
    """Whether the file at position `index` of a split's plan is stored as raw pixels: a hash
    of (seed, index) below `fraction`, so a rerun, a repair or another node picks the same
    files, and the choice does not depend on which other files were skipped."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    h = hashlib.blake2b(struct.pack(">qQ", seed, index), digest_size=8, person=b"engine-raw")
    return int.from_bytes(h.digest(), "big") < fraction * 2.0 ** 64


def _encode_jpeg(bgr: np.ndarray, quality: Optional[int] = None) -> bytes:
    q = JPEG_QUALITY if quality is None else quality
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise DecodeError("re-encoding to JPEG failed")
    return buf.tobytes()


def _limit_side(bgr: np.ndarray, max_side: Optional[int]) -> Tuple[np.ndarray, bool]:
    h, w = bgr.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return bgr, False
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA), True


def _rewritten(data: bytes, interval: int) -> Optional[bytes]:
    """A JPEG's bytes rewritten losslessly with restart markers every `interval` MCUs, or None
    where the rewrite does not apply (progressive files) or refuses the bytes; the record then
    keeps the bytes it had.

    A rewrite is also a strict check, so a file it rewrote needs no other: it reads every
    marker and all the entropy-coded data to the end-of-image marker with libjpeg's errors and
    warnings fatal, which is where the full decode's verdict comes from (decode.validate_jpeg
    says why), and refuses the layouts TurboJPEG's header probe refuses.
    tests/test_validate_scaled.py checks on the damaged corpus that it never accepts a file
    the full decode rejects; where it refuses one, validate_jpeg judges the file, so a
    rejection carries the full decode's message."""
    try:
        return add_restarts(data, interval)
    except DecodeError:
        return None


def _kept(info: JpegInfo, max_side: Optional[int]) -> bool:
    """Whether a valid JPEG with this header is stored as a JPEG without re-encoding."""
    return not info.needs_conversion and not (max_side and max(info.width, info.height) > max_side)


def process_file(path: str, max_side: Optional[int] = None, raw: bool = False,
                 jpeg_quality: Optional[int] = None, restart_interval: int = 0) -> Dict[str, Any]:
    """Validate one file. Returns {"image", "height", "width", "kind"} or {"skip": reason};
    with `raw`, {"pixels", "height", "width", "kind"} instead of "image": the file's full
    strict decode as uint8 BGR (what the loader decodes from the JPEG), capped at `max_side`.

    kind is "jpeg" (original bytes kept), "gray" (a grayscale JPEG, kept: libjpeg expands it
    to 3 channels) or "converted:<what>" (re-encoded at `jpeg_quality`, default JPEG_QUALITY;
    a raw record keeps the converted pixels themselves, never re-encoded). With
    `restart_interval`, a JPEG record is rewritten losslessly with restart markers
    (_rewritten): the same pixels, decodable piece by piece.
    """
    try:
        data = read_file(path)
    except OSError as exc:
        return {"skip": "unreadable: %s" % exc.strerror}
    if not data:
        return {"skip": "empty file"}
    fmt = sniff(data)
    try:
        if fmt == "jpeg":
            rewritten = None
            if raw:
                info = jpeg_info(data)
            elif restart_interval:
                # TurboJPEG's header probe (its refusals are the full decode's), then the
                # rewrite, which is the strict check where it applies (_rewritten).
                info = jpeg_info(data)
                if _kept(info, max_side):
                    rewritten = _rewritten(data, restart_interval)
                if rewritten is None:
                    info = validate_jpeg(data, info)
            else:
                # The header and the scaled strict decode in one call: it accepts exactly what
                # the full decode does (decode.validate_jpeg), and a kept file needs no pixels.
                info = validate_jpeg(data)
            if not raw and _kept(info, max_side):
                return {"image": data if rewritten is None else rewritten,
                        "height": info.height, "width": info.width,
                        "kind": "gray" if info.grayscale else "jpeg"}
            bgr = decode_bgr(data, info=info)  # to be converted or resized, then re-encoded
            if info.needs_conversion:
                kind = "converted:cmyk"
            else:
                kind = "gray" if info.grayscale else "jpeg"
        elif fmt == "unknown":
            return {"skip": "not an image (starts with %s)" % data[:8].hex()}
        else:
            bgr = decode_bgr(data)
            kind = "converted:" + fmt
    except DecodeError as exc:
        return {"skip": "corrupt %s: %s" % (fmt.upper(), exc)}
    bgr, resized = _limit_side(bgr, max_side)
    if resized and not kind.startswith("converted"):
        kind = "converted:resized"
    if raw:
        return {"pixels": bgr, "height": bgr.shape[0], "width": bgr.shape[1], "kind": kind}
    if kind.startswith("converted"):
        data = _encode_jpeg(bgr, jpeg_quality)
        if restart_interval:
            data = _rewritten(data, restart_interval) or data
    return {"image": data, "height": bgr.shape[0], "width": bgr.shape[1], "kind": kind}
