"""bench_train, bench_e2e and run_all at tiny sizes; report rendering from canned results.
Every benchmark run is checked through its JSON last line."""
import copy
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_imagenet

BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("bench_train") / "raw"), classes=2, train=8,
                         val=2)


def run(script, *args, rc=0):
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == rc, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines


def test_bench_train_tiny():
    res, lines = run("bench_train.py", "--archs", "resnet18", "--batch-size", "2", "--image-size",
                     "32", "--steps", "1", "--warmup", "1", "--modes", "eager,trace,amp")
    assert len(lines) >= 4  # title, machine, table header, rows ... then the JSON
    modes = [r["mode"] for r in res["results"]]
    if res["cuda"]:
        assert modes == ["eager", "trace", "amp"]
    else:
        assert modes == ["eager", "trace"]
        assert any("amp skipped" in n for n in res["notes"])
    for r in res["results"]:
        assert (r["arch"], r["batch_size"], r["image_size"]) == ("resnet18", 2, 32)
        assert r["img_s"] > 0 and r["loss_finite"]
    assert res["device"] and res["steps"] == 1 and res["warmup"] == 1


def test_bench_train_rejects_unknown_arch():
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train.py"), "--archs",
                        "resnet7"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "resnet7" in r.stderr


def test_bench_e2e_tiny(raw, tmp_path):
    res, lines = run("bench_e2e.py", "--data", raw, "--packed", str(tmp_path / "packed"),
                     "--batch-size", "2", "--image-size", "32", "--steps", "2", "--warmup", "1",
                     "--workers", "1", "--loader-seconds", "0.3")
    assert len(lines) >= 4
    for key in ("loader_train_img_s", "synthetic_train_img_s", "loader_capacity_img_s"):
        assert res[key] > 0, key
    assert res["ratio"] == pytest.approx(res["loader_train_img_s"] / res["synthetic_train_img_s"],
                                         rel=0.02)
    assert 0 <= res["data_wait_fraction"] <= 1
    assert (res["batch_size"], res["image_size"], res["workers"]) == (2, 32, 1)
    # The CPU model is far slower than the loader, so the < 5 % target applies here.
    assert res["target_applies"] is True and res["target_met"] is not None


# ------------------------------------------------------------------------ report, no benchmarks

CANNED = {
    "format": "engine-bench-results", "version": 1, "date": "2024-01-01 00:00:00",
    "host": "box", "machine": "box, Some CPU, 16 cores", "quick": False, "device": "cpu: Some CPU",
    "python": "3.10", "megengine": "1.13.0",
    "runs": [
        {"name": "pack", "script": "bench_pack.py", "command_str": "python bench_pack.py",
         "returncode": 0, "seconds": 3.0,
         "result": {"pack_img_s": 800.0, "decode_ceiling_img_s": 900.0, "workers": 1,
                    "files": 1200, "pack_over_ceiling": 0.89}},
        {"name": "decode", "script": "bench_decode.py", "command_str": "python bench_decode.py",
         "returncode": 0, "seconds": 3.0,
         "result": {"turbojpeg_full": 900.0, "train_roi_decode_resize": 1300.0, "images": 600,
                    "image_size": 224, "roi": True}},
        {"name": "loader_192", "script": "bench_loader.py", "command_str": "python bench_loader.py "
         "--image-size 192 --no-seed", "returncode": 0, "seconds": 30.0,
         "result": {"engine_img_s": 1800.0, "engine_raw_img_s": 1700.0, "seed_img_s": None,
                    "decode_ceiling_img_s": 1700.0, "workers": 2, "batch_size": 64,
                    "image_size": 192, "decoder": "ROI"}},
        {"name": "loader_224", "script": "bench_loader.py", "command_str": "python bench_loader.py "
         "--image-size 224", "returncode": 0, "seconds": 30.0,
         "result": {"engine_img_s": 1600.0, "engine_raw_img_s": 1500.0, "seed_img_s": 500.0,
                    "decode_ceiling_img_s": 1700.0, "workers": 2, "batch_size": 64,
                    "image_size": 224, "decoder": "ROI"}},
        {"name": "train", "script": "bench_train.py", "command_str": "python bench_train.py",
         "returncode": 0, "seconds": 100.0,
         "result": {"device": "cpu: Some CPU", "cuda": False, "batch_size": 8,
                    "image_sizes": [64], "steps": 3, "warmup": 2, "sync_every": 1,
                    "num_classes": 1000, "notes": ["amp skipped: no CUDA GPU"],
                    "results": [{"arch": a, "mode": m, "img_s": v, "batch_size": 8,
                                 "image_size": 64, "ms_per_step": 8000 / v, "timed_steps": 3,
                                 "loss_finite": True}
                                for a, m, v in [("resnet18", "eager", 3.0),
                                                ("resnet18", "trace", 3.5),
                                                ("resnet50", "eager", 1.0),
                                                ("resnet50", "trace", 1.2)]]}},
        {"name": "e2e", "script": "bench_e2e.py", "command_str": "python bench_e2e.py",
         "returncode": 1, "seconds": 2.0, "result": None, "error": "Traceback: boom"},
    ],
}


def test_sizing_uses_measured_rates_and_labels_estimates():
    import report

    s = report.sizing(CANNED)
    rows = {(r["arch"], r["image_size"]): r for r in s["rows"]}
    assert set(rows) == {(a, px) for a in ("resnet18", "resnet50") for px in (160, 192, 224)}
    r50 = rows[("resnet50", 224)]
    assert r50["loader_img_s_per_core"] == 800.0  # 1600 img/s / 2 workers, measured
    assert r50["loader_basis"] == "measured at 224 px"
    assert r50["cores_per_gpu"] == 4  # ceil(2470 / 800)
    assert r50["cores_per_node"] == 4 * s["gpus_per_node"]
    assert rows[("resnet18", 192)]["loader_img_s_per_core"] == 900.0
    assert rows[("resnet18", 160)]["loader_basis"].startswith("estimate")  # 160 not measured
    assert rows[("resnet18", 224)]["kind"] == "estimate"
    assert all(r["kind"] != "measured here" for r in s["rows"])  # CPU run: no GPU rates


def test_sizing_adds_gpu_rates_measured_here():
    import report

    res = copy.deepcopy(CANNED)
    train = res["runs"][4]["result"]
    train.update(cuda=True, device="cuda: NVIDIA H100")
    train["results"] = [dict(r, image_size=224) for r in train["results"]]
    measured = [r for r in report.sizing(res)["rows"] if r["kind"] == "measured here"]
    assert {(r["arch"], r["gpu_img_s"]) for r in measured} == {("resnet18", 3.5),
                                                                ("resnet50", 1.2)}


def test_report_writes_png_and_markdown(tmp_path):
    import report

    res = copy.deepcopy(CANNED)
    res["sizing"] = report.sizing(res)
    png = report.write_png(res, str(tmp_path / "r.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = report.write_markdown(res, str(tmp_path / "BENCHMARKS.md"), png,
                               str(tmp_path / "r.json"))
    text = open(md).read()
    for needle in ("## Packing", "## Decode", "## Loader", "## Train step", "## End to end",
                   "## Sizing", "![benchmark plot](r.png)",
                   "python bench_loader.py --image-size 224",
                   "loader cores per GPU  = ceil(", "not ours", "**Failed**", "boom",
                   "box, Some CPU, 16 cores"):
        assert needle in text, needle
    # rendering the results file again from the command line gives the same page
    with open(tmp_path / "r.json", "w") as f:
        json.dump(res, f)
    subprocess.run([sys.executable, os.path.join(BENCH, "report.py"), str(tmp_path / "r.json"),
                    "--markdown", str(tmp_path / "again.md")], check=True, capture_output=True,
                   timeout=120)
    assert open(tmp_path / "again.md").read() == text
    assert os.path.exists(tmp_path / "r.png")


# ----------------------------------------------------------------------------------- run_all

def check_run_all(out, summary, names):
    assert summary["benchmarks"] == names and summary["failed"] == []
    for key in ("json", "png", "markdown"):
        assert os.path.dirname(summary[key]) == str(out), key
        assert os.path.getsize(summary[key]) > 0, key
    with open(summary["json"]) as f:
        res = json.load(f)
    assert [r["name"] for r in res["runs"]] == names
    for r in res["runs"]:
        assert r["returncode"] == 0 and isinstance(r["result"], dict), r["name"]
        assert r["command"][1] == "benchmarks/" + r["script"]
    assert res["machine"] and res["sizing"]["rows"] and res["quick"] is True
    text = open(summary["markdown"]).read()
    for r in res["runs"]:
        assert r["command_str"] in text
    assert "Quick run" in text
    assert "![benchmark plot](%s)" % os.path.basename(summary["png"]) in text
    return res


def test_run_all_quick_subset(raw, tmp_path):
    out = tmp_path / "out"
    summary, _ = run("run_all.py", "--quick", "--out", str(out), "--data", raw, "--only",
                     "pack,decode")
    res = check_run_all(out, summary, ["pack", "decode"])
    assert res["runs"][0]["result"]["files"] == 20
    assert "Not run." in open(summary["markdown"]).read()  # loader, train, e2e were left out


def test_run_all_records_a_failing_benchmark(tmp_path):
    out = tmp_path / "out"
    summary, _ = run("run_all.py", "--quick", "--out", str(out), "--data",
                     str(tmp_path / "missing"), "--only", "decode", rc=1)
    assert summary["failed"] == ["decode"]
    with open(summary["json"]) as f:
        run0 = json.load(f)["runs"][0]
    assert run0["result"] is None and run0["returncode"] != 0 and run0["error"]
    assert "**Failed**" in open(summary["markdown"]).read()


@pytest.mark.slow
def test_run_all_quick_everything(raw, tmp_path):
    out = tmp_path / "out"
    summary, _ = run("run_all.py", "--quick", "--out", str(out), "--data", raw, "--packed",
                     str(tmp_path / "packed"))
    res = check_run_all(out, summary, ["pack", "decode", "loader_32", "train", "e2e"])
    assert res["device"]
    assert not os.path.exists(os.path.join(str(tmp_path), "BENCHMARKS.md"))
