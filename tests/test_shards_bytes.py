"""The packer's record bytes and shard checksums are exactly what their definitions say:
records are msgpack.packb of the record's map, checksums are hashlib.blake2b of the file."""
import hashlib
import os

import cv2
import msgpack
import numpy as np
import pytest

from engine.data import checksum, shards
from engine.data.convert import process_file

SIZES = [0, 1, 255, 256, 65535, 65536, 107_000, 1 << 20]
PATHS = ["a.JPEG", "n01440764/n01440764_10026.JPEG", "é/" + "x" * 300 + ".jpg", ""]


@pytest.mark.parametrize("n", SIZES)
def test_pack_record_is_msgpack_of_the_map(n):
    image = os.urandom(n)
    for label, h, w in [(0, 1, 1), (999, 375, 500), (127, 128, 65536), (-1, 70000, 3)]:
        for path in PATHS:
            want = msgpack.packb({"image": image, "label": label, "height": h, "width": w,
                                  "path": path}, use_bin_type=True)
            got = shards.pack_record(image, label, h, w, path)
            assert got == want
            assert shards.unpack_record(got) == {"image": image, "label": label, "height": h,
                                                 "width": w, "path": path}


def test_pack_record_other_inputs_are_msgpack_too():
    image = os.urandom(3000)
    want = msgpack.packb({"image": image, "label": 3, "height": 2, "width": 1, "path": "p",
                          "extra": [1, 2]}, use_bin_type=True)
    assert shards.pack_record(image, 3, 2, 1, "p", extra=[1, 2]) == want
    plain = msgpack.packb({"image": image, "label": 3, "height": 2, "width": 1, "path": "p"},
                          use_bin_type=True)
    assert shards.pack_record(bytearray(image), 3, 2, 1, "p") == plain
    assert shards.pack_record(memoryview(image), 3, 2, 1, "p") == plain


@pytest.mark.parametrize("n", [0, 1, 100, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3_500_000])
def test_file_checksum_is_blake2b_of_the_file(tmp_path, n):
    data = os.urandom(n)
    path = tmp_path / "f"
    path.write_bytes(data)
    seen = []
    got = shards.file_checksum(str(path), seen.append)
    assert got == "blake2b:" + hashlib.blake2b(data).hexdigest()
    assert sum(seen) == n and all(seen)


@pytest.mark.parametrize("sodium", [False, True])
def test_blake2b_digests_match_hashlib(sodium):
    if sodium and not checksum.sodium_available():
        pytest.skip("libsodium is not installed")
    data = os.urandom(300_000)
    for n in [0, 1, 127, 128, 129, 4096, 300_000]:
        for step in [1, 128, 1000, 1 << 20]:
            if step == 1 and n > 4096:
                continue
            h = checksum.Blake2b(sodium=sodium)
            for i in range(0, n, step):
                part = data[i:min(n, i + step)]
                h.update(part if i % 2 else bytearray(part))
            assert h.hexdigest() == hashlib.blake2b(data[:n]).hexdigest()
        h = checksum.Blake2b(sodium=sodium)
        h.update(memoryview(data)[:n])
        assert h.hexdigest() == hashlib.blake2b(data[:n]).hexdigest()


def test_process_file_reads_whole_files(tmp_path):
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (48, 64, 3),
                                                                      dtype=np.uint8))
    jpeg_bytes = buf.tobytes()
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes)
    r = process_file(str(path))
    assert r["image"] == jpeg_bytes and r["kind"] == "jpeg"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert process_file(str(tmp_path / "empty.jpg")) == {"skip": "empty file"}
    assert process_file(str(tmp_path)) == {"skip": "unreadable: Is a directory"}
    assert process_file(str(tmp_path / "absent.jpg")) == {
        "skip": "unreadable: No such file or directory"}
