"""What the tests share: the repository root and tiny ImageNet-layout folders made from real
photographs (skimage.data). Imported by the test files as `helpers`; fixtures live in conftest.py."""
import os
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def photo_bgr(name: str) -> np.ndarray:
    """A real photograph from scikit-image as BGR uint8."""
    from skimage import data

    rgb = getattr(data, name)()
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, -1)
    return np.ascontiguousarray(rgb[..., ::-1])


def jpeg_bytes(bgr: np.ndarray, quality: int = 90, sampling: str = "420",
               progressive: bool = False) -> bytes:
    flags = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
             {"420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
              "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
              "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}[sampling]]
    if progressive:
        flags += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    ok, buf = cv2.imencode(".jpg", bgr, flags)
    assert ok
    return buf.tobytes()


# cv2's chroma layouts by name, for encode_jpeg
SAMPLING = {"420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
            "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
            "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
            "411": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411,
            "440": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440}


def encode_jpeg(bgr: np.ndarray, sampling: str = "420", progressive: bool = False,
                quality: int = 90, restart: int = 0) -> bytes:
    """JPEG bytes of a BGR photo in any layout of SAMPLING ('gray': a 1-component grayscale
    JPEG), optionally progressive or with a restart marker every `restart` MCUs."""
    if sampling == "gray":
        img, flags = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), []
    else:
        img, flags = bgr, [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, SAMPLING[sampling]]
    flags += [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    if restart:
        flags += [cv2.IMWRITE_JPEG_RST_INTERVAL, restart]
    ok, buf = cv2.imencode(".jpg", img, flags)
    assert ok
    return buf.tobytes()


def window_grid(W: int, H: int):
    """A window at every (x0, y0) of a W x H image, its size varying with the position: every
    edge of a window falls at every offset from a block boundary."""
    for y0 in range(H):
        for x0 in range(W):
            yield (x0, y0, min(W - x0, 1 + (x0 * 7 + y0) % 19),
                   min(H - y0, 1 + (y0 * 5 + x0) % 23))


def crops(name: str, n: int, seed: int, size=(300, 400)):
    """n varied crops of a photo, resized to ImageNet-like sizes (h, w)."""
    img = photo_bgr(name)
    rng = np.random.default_rng(seed)
    H, W = img.shape[:2]
    for _ in range(n):
        ch, cw = int(H * rng.uniform(0.6, 1)), int(W * rng.uniform(0.6, 1))
        y, x = rng.integers(0, H - ch + 1), rng.integers(0, W - cw + 1)
        out = cv2.resize(img[y:y + ch, x:x + cw], (size[1], size[0]), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            out = out[:, ::-1]
        yield np.ascontiguousarray(out)


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_imagenet(root: str, classes=3, train=6, val=2, seed=0) -> str:
    """ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG of real photo crops."""
    for c in range(classes):
        wnid = "n%08d" % (1000 + c)
        imgs = list(crops(PHOTOS[c % len(PHOTOS)], train + val, seed + c))
        for k, img in enumerate(imgs):
            split = "train" if k < train else "val"
            write(os.path.join(root, split, wnid, "%s_%d.JPEG" % (wnid, k)),
                  jpeg_bytes(img, quality=85 + k % 10))
    return root


def left_in_group(pgid: int) -> list:
    """Live processes of the tool's process group (its session: start_new_session)."""
    alive = []
    import psutil

    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return alive
