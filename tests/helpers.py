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
