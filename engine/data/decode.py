"""Image bytes -> BGR uint8 pixels, strictly.

libjpeg-turbo (through PyTurboJPEG) decodes JPEGs, optionally at a DCT scale (1/8 .. 1/1), which
is much cheaper than a full decode followed by a downscale. Anything libjpeg reports as a warning
("Premature end of JPEG file", "Corrupt JPEG data") is an error here: a lenient decoder turns a
truncated file into gray rows that would silently reach training.

When the compiled ROI decoder (`engine.data._jpegroi`) is present, `decode_crop` decodes only the
rows and columns of a crop window; otherwise it decodes the whole image and slices it.

`validate_jpeg` answers "would the strict full decode accept this JPEG?" at a fraction of its
cost, by a strict decode at DCT scale 1/8. libjpeg raises every error and warning while reading
markers and entropy-coded data (bad Huffman code, premature end, hit marker, must resync,
extraneous bytes before EOI, ...), and a scaled decode reads all of it exactly as a full one
does: the Huffman decoder consumes every AC coefficient's bits even where the 1/8 IDCT only
needs the DC term, every iMCU row is decoded (the last one holds output rows at any scale),
and the decode runs to the end-of-image marker. What the scale changes (the IDCT kernel,
upsampling, colour conversion, buffer sizes) raises nothing for a header TurboJPEG accepted.
tests/test_validate_scaled.py checks the equivalence on hundreds of damaged files.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Optional, Tuple

import cv2
import numpy as np

try:  # built by setup.py when libjpeg-turbo's headers are present
    # (spelled as a module import so that mypy, which cannot read a compiled extension, takes
    # it as an untyped module rather than a missing attribute of engine.data)
    import engine.data._jpegroi as _jpegroi
except ImportError:  # pragma: no cover - exercised on machines without the headers
    _jpegroi = None

__all__ = [
    "DecodeError", "JpegInfo", "sniff", "jpeg_info", "jpeg_size", "decode_bgr", "decode_crop",
    "scaled_dim", "pick_scale", "roi_available", "validate_jpeg", "add_restarts",
    "VALIDATE_SCALE",
]

from turbojpeg import (
    TJCS_CMYK,
    TJCS_GRAY,
    TJCS_YCCK,
    TJFLAG_FASTDCT,
    TJFLAG_STOPONWARNING,
    TJPF_BGR,
    TJPF_CMYK,
)

# DCT scales with fast paths in libjpeg-turbo (reduced-size IDCTs); x/8 for other x are slower.
SCALE_NUMERATORS = (8, 4, 2, 1)
# validate_jpeg's scale (numerator over 8): the smallest; entropy decoding is then ~90 % of it.
VALIDATE_SCALE = 1


class DecodeError(ValueError):
    """The bytes are not an image this engine can decode to 3 channels, or are corrupt."""


_turbo = None
_turbo_pid = None
# What ctypes.util.find_library("turbojpeg") resolves to on Linux. Loading it by that name skips
# the search, which runs `ldconfig -p` in a subprocess (milliseconds in every new process, and
# the packer and the loader start several); where the name does not load, PyTurboJPEG searches.
_TURBOJPEG_SONAME = "libturbojpeg.so.0"


def _tj():
    """One TurboJPEG instance per process (it wraps a ctypes handle to the shared library)."""
    global _turbo, _turbo_pid
    if _turbo is None or _turbo_pid != os.getpid():
        from turbojpeg import TurboJPEG

        from engine import libjpeg

        # A user's own copy first (TURBOJPEG_LIB, conda, a module): the environment only, no
        # ldconfig subprocess; else the system's, by its soname.
        found = libjpeg.find_runtime(system=False)
        try:
            if found is not None:
                _turbo = TurboJPEG(found.path)
            else:
                try:
                    _turbo = TurboJPEG(_TURBOJPEG_SONAME if sys.platform.startswith("linux")
                                       else None)
                except OSError:
                    _turbo = TurboJPEG()
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(
                "libturbojpeg was not found or does not load (%s). Get it with %s"
                % (exc, libjpeg.HOW_TO_GET)) from None
        _turbo_pid = os.getpid()
    return _turbo


def sniff(data: bytes) -> str:
    """The container format from the magic bytes, never from a file name."""
    head = bytes(data[:12])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"GIF8":
        return "gif"
    return "unknown"


class JpegInfo:
    __slots__ = ("width", "height", "subsampling", "colorspace")

    def __init__(self, width: int, height: int, subsampling: int, colorspace: int):
        self.width, self.height = width, height
        self.subsampling, self.colorspace = subsampling, colorspace

    @property
    def needs_conversion(self) -> bool:
        """CMYK / YCCK JPEGs cannot be decoded straight to BGR by libjpeg."""
        return self.colorspace in (TJCS_CMYK, TJCS_YCCK)

    @property
    def grayscale(self) -> bool:
        return self.colorspace == TJCS_GRAY


def _strict(call, *args, **kwargs):
    # PyTurboJPEG reports libjpeg warnings with warnings.warn and returns the damaged pixels;
    # promote them to errors so corrupt data never passes silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return call(*args, **kwargs)
        except (OSError, UserWarning, ValueError) as exc:
            raise DecodeError(str(exc).strip() or type(exc).__name__) from None


def jpeg_info(data: bytes) -> JpegInfo:
    """Header-only probe: dimensions, subsampling and colour space, without decoding pixels."""
    if sniff(data) != "jpeg":
        raise DecodeError("not a JPEG (starts with %r)" % bytes(data[:4]))
    w, h, sub, cs = _strict(_tj().decode_header, data)
    if w <= 0 or h <= 0:
        raise DecodeError("JPEG header declares an empty image (%dx%d)" % (w, h))
    return JpegInfo(w, h, sub, cs)


def scaled_dim(dim: int, num: int, denom: int = 8) -> int:
    """Size of one side decoded at scale num/denom (libjpeg rounds up)."""
    return (dim * num + denom - 1) // denom


def pick_scale(crop_w: float, crop_h: float, out_w: int, out_h: int) -> int:
    """The smallest fast DCT scale numerator (1, 2, 4 or 8, over 8) at which the crop is still at
    least the output size in both sides, so the decode does the least work without upsampling;
    8 (full size) when even that is smaller than the output."""
    for num in SCALE_NUMERATORS[::-1]:
        if crop_w * num >= out_w * 8 and crop_h * num >= out_h * 8:
            return num
    return 8


def _decode_cmyk(data: bytes, info: JpegInfo, scale: Optional[Tuple[int, int]]) -> np.ndarray:
    cmyk = _strict(_tj().decode, data, pixel_format=TJPF_CMYK, scaling_factor=scale,
                   flags=TJFLAG_STOPONWARNING).astype(np.uint16)
    # libjpeg returns CMYK/YCCK samples as stored. Adobe applications (the writers of essentially
    # all CMYK JPEGs, ImageNet's included) store them inverted, so 255 means "no ink"; then
    # R = C' * K' / 255 (the same rule as Pillow and OpenCV).
    c, m, y, k = cmyk[..., 0], cmyk[..., 1], cmyk[..., 2], cmyk[..., 3]
    if not _adobe_inverted(data):
        c, m, y, k = 255 - c, 255 - m, 255 - y, 255 - k
    bgr = np.empty(cmyk.shape[:2] + (3,), np.uint8)
    bgr[..., 0] = (y * k + 127) // 255
    bgr[..., 1] = (m * k + 127) // 255
    bgr[..., 2] = (c * k + 127) // 255
    return bgr


def _adobe_inverted(data: bytes) -> bool:
    """True when an Adobe APP14 marker precedes the image data (inverted CMYK convention)."""
    pos, n = 2, len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: headers are over
            break
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xEE and bytes(data[pos + 4:pos + 9]) == b"Adobe":
            return True
        pos += 2 + length
    return False


def decode_bgr(data: bytes, scale: Optional[Tuple[int, int]] = None,
               info: Optional[JpegInfo] = None, fast_dct: bool = False) -> np.ndarray:
    """Decode any supported image to HxWx3 BGR uint8; JPEGs at an optional DCT scale (num, 8).

    fast_dct selects libjpeg's integer "ifast" IDCT (TJFLAG_FASTDCT): ~8% faster, within a
    grey level or two of the exact one; fine for training augmentation, not used for eval.

    Non-JPEG formats (PNG, WebP, BMP, TIFF) go through OpenCV and ignore `scale`; an alpha
    channel is dropped. Raises DecodeError for corrupt or unsupported data.
    """
    kind = sniff(data)
    if kind == "jpeg":
        if scale is not None:  # PyTurboJPEG only accepts reduced fractions: (1, 2), not (4, 8)
            g = math.gcd(*scale)
            scale = None if scale[0] == scale[1] else (scale[0] // g, scale[1] // g)
        info = info or jpeg_info(data)
        if info.needs_conversion:
            return _decode_cmyk(data, info, scale)
        flags = TJFLAG_STOPONWARNING | (TJFLAG_FASTDCT if fast_dct else 0)
        return _strict(_tj().decode, data, pixel_format=TJPF_BGR, scaling_factor=scale,
                       flags=flags)
    if kind == "unknown":
        raise DecodeError("not an image (starts with %r)" % bytes(data[:8]))
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DecodeError("corrupt or unsupported %s image" % kind.upper())
    return img


def validate_jpeg(data: bytes, info: Optional[JpegInfo] = None) -> JpegInfo:
    """Raise DecodeError exactly where decode_bgr(data, info=info) would; return the header.

    For a JPEG only: the strict decode at scale VALIDATE_SCALE/8 (the module docstring says why
    it accepts and rejects the same files), through the compiled decoder when it is built (one
    C call, no output image: about half the instructions of the full decode, ~30 % less time),
    else through TurboJPEG. Without `info`, the compiled decoder also reads the header as
    TurboJPEG's probe (jpeg_info) would, refusing the layouts that probe refuses, so a kept
    JPEG costs one C call in all. When the compiled decoder refuses a file, TurboJPEG has the
    last word (its header probe, then its scaled decode), so a rejection carries TurboJPEG's
    message, the one decode_bgr gives.
    """
    # getattr: a compiled decoder built from an older source (not rebuilt since) lacks validate()
    fast = getattr(_jpegroi, "validate", None)
    if fast is not None and (info is None or not info.needs_conversion):
        try:
            got = fast(data, VALIDATE_SCALE)
            if info is None and len(got) == 4:  # older builds return only the size
                info = JpegInfo(*got)
            if info is not None:
                return info
        except ValueError:
            pass
    info = info or jpeg_info(data)
    decode_bgr(data, (VALIDATE_SCALE, 8), info=info)
    return info


def add_restarts(data: bytes, interval: int = 1) -> Optional[bytes]:
    """The JPEG `data` rewritten losslessly with a restart marker every `interval` MCUs: the
    same DCT coefficients, quantisation tables, sampling and colour space (standard Huffman
    tables), so every decode of it gives the same pixels. decode_crop then decodes only the
    part of the image a window needs. None where the rewrite does not apply (progressive or
    arithmetic-coded JPEGs, CMYK/YCCK). Needs the compiled decoder (roi_available());
    DecodeError for corrupt data."""
    if _jpegroi is None:
        raise RuntimeError("add_restarts needs the compiled decoder engine.data._jpegroi")
    try:
        return _jpegroi.add_restarts(data, interval)
    except ValueError as exc:
        raise DecodeError(str(exc)) from None


def roi_available() -> bool:
    """Whether the compiled crop-window decoder is built (see setup.py)."""
    return _jpegroi is not None


def jpeg_size(data: bytes) -> Tuple[int, int]:
    """(width, height) from the JPEG header; the compiled decoder's probe is ~8x cheaper."""
    if _jpegroi is not None:
        try:
            return _jpegroi.header(data)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
    info = jpeg_info(data)
    return info.width, info.height


def decode_crop(data: bytes, num: int, x0: int, y0: int, w: int, h: int,
                use_roi: bool = True, fast_dct: bool = False) -> np.ndarray:
    """Rows y0..y0+h and columns x0..x0+w of the JPEG decoded at scale num/8, as BGR.

    With the ROI decoder only that window is decoded: rows below it are never read, rows above
    it are entropy-decoded and skipped, and IDCT, upsampling and colour conversion run on the
    window's columns alone. In a JPEG with restart markers (add_restarts), the entropy decode
    too starts and ends near the window: only the pieces between markers that cover it (and a
    margin) are read. Otherwise (or for CMYK, which it does not handle) the whole image
    is decoded at that scale and sliced. Both paths give identical pixels.
    """
    if use_roi and _jpegroi is not None:
        out = np.empty((h, w, 3), np.uint8)
        try:
            _jpegroi.decode_crop(data, num, x0, y0, w, h, out, fast_dct)
            return out
        except ValueError:
            pass  # CMYK/YCCK, or corrupt: the general path below decides, with its own error
    full = decode_bgr(data, None if num == 8 else (num, 8), fast_dct=fast_dct)
    if y0 + h > full.shape[0] or x0 + w > full.shape[1]:
        raise DecodeError("window %d,%d %dx%d outside the %dx%d image"
                          % (x0, y0, w, h, full.shape[1], full.shape[0]))
    return full[y0:y0 + h, x0:x0 + w]
