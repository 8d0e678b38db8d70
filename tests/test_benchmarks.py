"""Every data benchmark runs at a tiny size, ends with its JSON line, echoes its configuration,
labels its data instead of printing this machine's paths, and its own markdown() renders the
figures it printed."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, make_imagenet

BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("bench") / "raw"), classes=2, train=8, val=2)


def run(script, *args):
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) >= 3  # a table before the JSON
    for path in (*args, ROOT):  # the data folders given, the repository: labels only
        if os.path.isabs(path):
            assert path not in r.stdout, path
    return json.loads(lines[-1])


def rendered(script, res):
    """The module's markdown() lines for this one result."""
    module = __import__(script[:-3])
    lines = module.markdown([res])
    assert lines and lines[0].startswith(("|", "One core", "Device", "resnet")), lines[:2]
    return "\n".join(lines)


def test_bench_pack(raw):
    res = run("bench_pack.py", "--data", raw, "--workers", "1", "--repeats", "1")
    assert res["workers"] == 1 and res["files"] == 20 and res["data"] == "<data>"
    for key in ("pack_img_s", "decode_ceiling_img_s", "checksum_mb_s", "verify_fast_mb_s",
                "verify_full_img_s"):
        assert res[key] > 0, key
    md = rendered("bench_pack.py", res)
    assert "&lt;data&gt;, 20 files" in md and "verify --fast MB/s" in md


def test_bench_decode(raw):
    res = run("bench_decode.py", "--data", raw, "--repeats", "1", "--image-size", "64")
    assert res["turbojpeg_full"] > 0 and res["train_full_decode_crop_resize"] > 0
    assert res["images"] == 16 and res["image_size"] == 64
    md = rendered("bench_decode.py", res)
    assert "One core, 16 JPEGs of &lt;data&gt;" in md and "| Pillow, full image |" in md


def test_bench_stages(raw, tmp_path):
    res = run("bench_stages.py", "--data", raw, "--packed", str(tmp_path / "packed"),
              "--sizes", "32,48", "--images", "8", "--batch-size", "4", "--loader-batches", "2",
              "--repeats", "1")
    assert res["sizes"] == [32, 48] and res["images"] == 8 and res["data"] == "<data>"
    for size in ("32", "48"):
        st = res["stages_us"][size]
        for key in ("read", "geometry", "decode", "resize", "write", "fill", "worker",
                    "ceiling"):
            assert st[key] > 0, (size, key)
        assert res["worker_over_ceiling"][size] > 0
    md = rendered("bench_stages.py", res)
    assert "| entropy decode, rows down to the crop's last |" in md and "48 px" in md


def test_bench_loader_with_cold_epochs(raw, tmp_path):
    res = run("bench_loader.py", "--data", raw, "--packed", str(tmp_path / "packed"),
              "--workers", "1", "--batch-size", "4", "--image-size", "32", "--seconds", "0.3",
              "--repeats", "1", "--cold")
    for key in ("engine_img_s", "engine_raw_img_s", "seed_img_s", "decode_ceiling_img_s",
                "cold_readahead_off_img_s", "cold_readahead_on_img_s", "engine_cpu_ms",
                "engine_raw_cpu_ms", "seed_cpu_ms", "decode_ceiling_cpu_ms",
                "engine_restarts_img_s", "engine_restarts_cpu_ms"):
        assert res[key] > 0, key
    assert (res["workers"], res["batch_size"], res["image_size"]) == (1, 4, 32)
    assert res["imagenet_like"] is False and res["data"] == "<data>"
    has_dali = importlib.util.find_spec("nvidia") is not None and \
        importlib.util.find_spec("nvidia.dali") is not None
    assert (res["dali_img_s"] is not None) == has_dali
    md = rendered("bench_loader.py", res)
    assert "| 32 px, 1 workers, batch 4, &lt;data&gt;" in md
    assert "cold, readahead on" in md  # the cold table appears for a --cold run
    assert "restart markers img/s" in md
    # the pack with restart markers is made beside the given one, not in the user's cache
    assert os.path.exists(str(tmp_path / "packed-restarts" / "train" / "meta.json"))


def test_bench_node_sized_as_another_machine(raw, tmp_path):
    res = run("bench_node.py", "--data", raw, "--packed", str(tmp_path / "packed"),
              "--local-world-size", "2", "--batch-size", "4", "--image-size", "32",
              "--batches", "1", "--cores", "8")
    # 8 cores for 2 ranks: 8 // 2 - 1 = 3 workers each; the old policy gave cores - 1 = 7.
    assert (res["usable_cores"], res["workers_per_rank"], res["before_workers_per_rank"]) == \
        (8, 3, 7)
    assert res["processes"] == 2 * (1 + 3)  # the ranks and their workers, all seen alive
    assert res["before_processes"] == 2 * (1 + 7)
    assert res["ring_bytes_per_node"] == 2 * res["ring_bytes_per_loader"] > 0
    assert res["peak_pss_bytes"] > 0 and res["img_s"] > 0
    assert res["sized_for_this_machine"] is False and res["data"] == "<packed>/train"
    md = rendered("bench_node.py", res)
    assert "8 cores (sized as, --cores): now, 2 ranks x 3 workers" in md
    assert "before, 2 ranks x 7 workers (computed)" in md


def test_bench_raw(raw):
    res = run("bench_raw.py", "--data", raw, "--images", "8", "--sizes", "32", "--batch-size",
              "4", "--seconds", "0.3", "--repeats", "1", "--pack-workers", "0")
    runs = {r["raw_fraction"]: r for r in res["runs"]}
    assert sorted(runs) == [0, 0.5, 1] and res["images"] == 8 and res["data"] == "<data>"
    assert runs[0]["version"] == 1 and runs[0]["raw_records"] == 0
    assert runs[1]["version"] == 2 and runs[1]["raw_records"] == 8
    assert runs[1]["disk_kb_per_image"] > runs[0]["disk_kb_per_image"]
    assert all(r["img_s_per_worker"] > 0 for r in res["runs"])
    md = rendered("bench_raw.py", res)
    assert "| 32 px, raw 0.5, &lt;data&gt; |" in md
