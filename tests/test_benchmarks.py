"""Every benchmark runs at a tiny size and ends with its JSON line."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_imagenet

BENCH = os.path.join(ROOT, "benchmarks")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("bench") / "raw"), classes=2, train=8, val=2)


def run(script, *args):
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) >= 3  # a table before the JSON
    return json.loads(lines[-1])


def test_bench_pack(raw):
    res = run("bench_pack.py", "--data", raw, "--workers", "1", "--repeats", "1")
    assert res["workers"] == 1 and res["files"] == 20
    assert res["pack_img_s"] > 0 and res["decode_ceiling_img_s"] > 0


def test_bench_decode(raw):
    res = run("bench_decode.py", "--data", raw, "--repeats", "1", "--image-size", "64")
    assert res["turbojpeg_full"] > 0 and res["train_full_decode_crop_resize"] > 0
    assert res["images"] == 16


def test_bench_loader(raw, tmp_path):
    res = run("bench_loader.py", "--data", raw, "--packed", str(tmp_path / "packed"),
              "--workers", "1", "--batch-size", "4", "--image-size", "32", "--seconds", "0.3",
              "--repeats", "1")
    for key in ("engine_img_s", "engine_raw_img_s", "seed_img_s", "decode_ceiling_img_s"):
        assert res[key] > 0, key
    assert (res["workers"], res["batch_size"], res["image_size"]) == (1, 4, 32)
