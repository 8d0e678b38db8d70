"""The crop geometry on real photographs: the shorter-side resize, the center crop and the
RandomResizedCrop fallback give the exact sizes and windows of MegEngine's transforms, and
pick_scale chooses the DCT scale that a real decode then delivers."""
import cv2
import numpy as np
import pytest

from helpers import jpeg_bytes, photo_bgr
from engine.data.decode import decode_bgr, jpeg_size, pick_scale, scaled_dim
from engine.data.transforms import (ValTransform, center_crop, random_resized_crop, resize_shorter,
                                    sample_rng, val_resize)


def photo(height, width, name="chelsea"):
    """A real photograph resized to height x width (BGR uint8)."""
    return cv2.resize(photo_bgr(name), (width, height), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------ resize_shorter

@pytest.mark.parametrize("height, width, size, want", [
    (375, 500, 256, (256, 341)),   # landscape: 256 * 500 / 375 = 341.3
    (500, 375, 256, (341, 256)),   # portrait
    (300, 451, 256, (256, 384)),   # 384.85: the longer side is truncated, not rounded
    (451, 300, 256, (384, 256)),
    (256, 400, 256, (256, 400)),   # shorter side already the size: unchanged
    (300, 300, 224, (224, 224)),   # square
    (100, 150, 256, (256, 384)),   # upscaling follows the same rule
])
def test_resize_shorter_gives_megengines_resize_shape(height, width, size, want):
    from megengine.data import transform as T

    assert resize_shorter(height, width, size) == want
    img = photo(height, width)
    assert T.Resize(size).apply(img).shape == want + (3,)
    th, tw = want
    assert cv2.resize(img, (tw, th)).shape == (th, tw, 3)


# --------------------------------------------------------------------------------- center_crop

@pytest.mark.parametrize("height, width, size, want", [
    (256, 341, 224, (58, 16)),     # (341 - 224) / 2 = 58.5 rounds to even, as MegEngine's does
    (256, 384, 224, (80, 16)),
    (300, 451, 256, (98, 22)),     # 97.5 -> 98, 22
    (341, 256, 224, (16, 58)),
    (224, 224, 224, (0, 0)),
])
def test_center_crop_is_megengines_window(height, width, size, want):
    from megengine.data import transform as T

    assert center_crop(height, width, size) == want
    img = photo(height, width, "coffee")
    x, y = want
    ours = img[y:y + size, x:x + size]
    assert ours.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, T.CenterCrop(size).apply(img))


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (300, 451), (224, 224)])
def test_val_crop_is_megengines_resize_then_center_crop(height, width):
    from megengine.data import transform as T

    img = photo(height, width, "astronaut")
    got = ValTransform(0.875).crop(img, 224)
    assert val_resize(224) == 256 and got.shape == (224, 224, 3)
    np.testing.assert_array_equal(got, T.Compose([T.Resize(256), T.CenterCrop(224)]).apply(img))


def test_val_crop_ratio_above_one_still_gives_the_output_size():
    img = photo(120, 160)
    assert val_resize(64, 1.25) == 51  # shorter side below the crop: resized up to it
    assert ValTransform(1.25).crop(img, 64).shape == (64, 64, 3)


# ---------------------------------------------------------------- random_resized_crop fallback

@pytest.mark.parametrize("height, width, want", [
    (500, 200, (0, 116, 200, 267)),   # taller than 3/4: full width, height 200 / (3/4)
    (200, 500, (116, 0, 267, 200)),   # wider than 4/3: full height, width 200 * 4/3
    (300, 360, (0, 0, 360, 300)),     # a ratio inside [3/4, 4/3]: the whole image
    (375, 500, (0, 0, 500, 375)),     # 4/3 exactly is inside
    (301, 150, (0, 50, 150, 200)),
])
def test_random_resized_crop_falls_back_to_the_central_crop_of_the_nearest_ratio(
        height, width, want):
    """An area share above 1 cannot fit, so all ten draws fail and the fallback decides; its
    window is MegEngine's fallback window, whatever the RNG."""
    from megengine.data import transform as T

    scale = (2.0, 3.0)
    for index in range(5):
        assert random_resized_crop(height, width, sample_rng(0, 0, index), scale=scale) == want
    img = photo(height, width, "rocket")
    mge_crop = T.RandomResizedCrop((want[3], want[2]), scale_range=scale)
    assert mge_crop._get_coord(img) == want
    x, y, w, h = want
    window = img[y:y + h, x:x + w]
    assert window.shape == (h, w, 3)
    assert 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01 or (w, h) == (width, height)


def test_random_resized_crop_draws_fit_the_image_when_they_can():
    for index in range(200):
        x, y, w, h = random_resized_crop(375, 500, sample_rng(1, 2, index))
        assert 0 <= x and x + w <= 500 and 0 <= y and y + h <= 375 and w > 0 and h > 0


# ---------------------------------------------------------------------------------- pick_scale

@pytest.mark.parametrize("crop_w, crop_h, out, want", [
    (1000, 760, 224, 4),     # at 2/8: 250 x 190, too few rows; at 4/8: 500 x 380
    (1000, 900, 224, 2),     # at 2/8: 250 x 225
    (1792, 1792, 224, 1),    # exactly 8 x the output: 1/8 still fits
    (1791, 1792, 224, 2),    # one column short at 1/8
    (448, 448, 224, 4),      # half of it is exactly the output
    (500, 375, 224, 8),      # at 4/8 only 187 rows: only the full scale keeps 224
    (100, 100, 224, 8),      # smaller than the output: full scale (then upscaled)
])
def test_pick_scale_is_the_smallest_numerator_that_keeps_the_output_size(crop_w, crop_h, out,
                                                                          want):
    assert pick_scale(crop_w, crop_h, out, out) == want
    smaller = {8: 4, 4: 2, 2: 1}.get(want)
    if smaller is not None:  # the next scale down would lose pixels
        assert crop_w * smaller < out * 8 or crop_h * smaller < out * 8
    if crop_w >= out and crop_h >= out:
        assert crop_w * want >= out * 8 and crop_h * want >= out * 8


def test_pick_scale_on_a_real_decode_gives_at_least_the_output():
    """Decoding a real JPEG at the chosen scale yields at least the output size, and the next
    smaller scale would not."""
    data = jpeg_bytes(photo(760, 1000))
    width, height = jpeg_size(data)
    for out_w, out_h in ((224, 224), (128, 96), (480, 360), (64, 200)):
        num = pick_scale(width, height, out_w, out_h)
        img = decode_bgr(data, None if num == 8 else (num, 8))
        assert img.shape == (scaled_dim(height, num), scaled_dim(width, num), 3)
        assert img.shape[0] >= out_h and img.shape[1] >= out_w
        if num > 1:
            half = decode_bgr(data, (num // 2, 8))
            assert half.shape[0] < out_h or half.shape[1] < out_w
