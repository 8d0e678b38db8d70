"""bench_train, bench_e2e and run_all at tiny sizes; report rendering from canned results; the
results files and the page carry no path of the machine they were made on.
Every benchmark run is checked through its JSON last line."""
import copy
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
    import bench_train

    md = "\n".join(bench_train.markdown([res]))
    assert "| resnet18 | 32 | trace | 2 |" in md


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
    assert res["data"] == "<packed>/train" and str(tmp_path) not in "\n".join(lines)
    import bench_e2e

    md = "\n".join(bench_e2e.markdown([res]))
    assert "| engine Loader (packed, 1 workers) |" in md and "Target: data-wait < 5 %" in md


# ------------------------------------------------------------------------ report, no benchmarks

MACHINE = {"cpu": "Some CPU", "cores": 16, "physical_cores": 8, "usable_cores": 16,
           "memory_gb": 64.0, "os": "Linux"}
CANNED = {
    "format": "engine-bench-results", "version": 2, "date": "2024-01-01 00:00:00",
    "host": "box", "machine": MACHINE, "git": {"commit": "0123456789abcdef" * 2 + "01234567",
                                               "dirty": True},
    "quick": False, "device": "cpu: Some CPU", "python": "3.10", "megengine": "1.13.0",
    "runs": [
        {"name": "pack", "script": "bench_pack.py", "command_str": "python bench_pack.py",
         "returncode": 0, "seconds": 3.0,
         "result": {"pack_img_s": 800.0, "decode_ceiling_img_s": 900.0, "workers": 1,
                    "files": 1200, "pack_over_ceiling": 0.89, "data": "<sample set>",
                    "checksum_mb_s": 1234.0}},
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
        {"name": "loader_imagenet_like_224", "script": "bench_loader.py",
         "command_str": "python bench_loader.py --imagenet-like --image-size 224 --cold",
         "returncode": 0, "seconds": 40.0,
         "result": {"engine_img_s": 1000.0, "engine_raw_img_s": 900.0, "seed_img_s": 250.0,
                    "dali_img_s": 800.0, "cold_readahead_off_img_s": 300.0,
                    "cold_readahead_on_img_s": 700.0, "decode_ceiling_img_s": 950.0,
                    "workers": 2, "batch_size": 64, "image_size": 224, "decoder": "ROI",
                    "imagenet_like": True, "mean_file_kb": 107.0,
                    "data": "<sample set, imagenet-like>"}},
        {"name": "node", "script": "bench_node.py",
         "command_str": "python bench_node.py --batches 8", "returncode": 0, "seconds": 20.0,
         "result": {"local_world_size": 8, "usable_cores": 16, "workers_per_rank": 1,
                    "processes": 16, "process_budget": 24, "ring_bytes_per_loader": 154140672,
                    "ring_bytes_per_node": 8 * 154140672, "peak_rss_bytes_sum": 5e9,
                    "peak_pss_bytes": 2e9, "img_s": 700.0, "batch_size": 256,
                    "image_size": 224, "before_workers_per_rank": 15,
                    "before_ring_bytes_per_loader": 2 * 15 * 38535168,
                    "before_processes": 8 * 16, "sized_for_this_machine": True, "slots": 4,
                    "batches": 8, "data": "<cache>/packed-0a6f1d08/train"}},
        {"name": "node_cores64", "script": "bench_node.py",
         "command_str": "python bench_node.py --batches 2 --cores 64", "returncode": 0,
         "seconds": 20.0,
         "result": {"local_world_size": 8, "usable_cores": 64, "workers_per_rank": 7,
                    "processes": 64, "process_budget": 72, "ring_bytes_per_loader": 154140672,
                    "ring_bytes_per_node": 8 * 154140672, "peak_rss_bytes_sum": 9e9,
                    "peak_pss_bytes": 3e9, "img_s": 900.0, "batch_size": 256,
                    "image_size": 224, "before_workers_per_rank": 63,
                    "before_ring_bytes_per_loader": 2 * 63 * 38535168,
                    "before_processes": 8 * 64, "sized_for_this_machine": False, "slots": 4,
                    "batches": 2, "data": "<cache>/packed-0a6f1d08/train"}},
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
TRAIN = 7  # index of the train run in CANNED["runs"]


def test_sizing_prefers_imagenet_like_rates_and_labels_estimates():
    import report

    s = report.sizing(CANNED)
    rows = {(r["arch"], r["image_size"]): r for r in s["rows"]}
    assert set(rows) == {(a, px) for a in ("resnet18", "resnet50") for px in (160, 192, 224)}
    r50 = rows[("resnet50", 224)]
    # 1000 img/s / 2 workers on the ImageNet-like set, not the smooth set's 1600 / 2
    assert r50["loader_img_s_per_core"] == 500.0
    assert r50["loader_basis"] == "measured at 224 px on the ImageNet-like set"
    assert r50["cores_per_gpu"] == 5  # ceil(2470 / 500)
    assert r50["cores_per_node"] == 5 * s["gpus_per_node"]
    assert rows[("resnet18", 192)]["loader_basis"].startswith("estimate")  # 192: not like
    assert rows[("resnet18", 224)]["kind"] == "estimate"
    assert all(r["kind"] != "measured here" for r in s["rows"])  # CPU run: no GPU rates
    assert r50["cores_per_gpu_restarts"] is None  # no run had a --restart-markers row


def test_sizing_from_restart_marker_rows_where_a_run_has_them():
    import report

    res = copy.deepcopy(CANNED)
    res["runs"][4]["result"].update(engine_restarts_img_s=1250.0, engine_restarts_cpu_ms=1.5)
    rows = {(r["arch"], r["image_size"]): r for r in report.sizing(res)["rows"]}
    assert rows[("resnet50", 224)]["cores_per_gpu_restarts"] == 4  # ceil(2470 / 625)
    assert rows[("resnet50", 224)]["cores_per_gpu"] == 5  # the plain pack's, unchanged
    table, _ = report.render_sizing(res)
    assert "cores per GPU, --restart-markers" in table[0]
    import bench_loader

    text = "\n".join(bench_loader.markdown([res["runs"][4]["result"]]))
    assert "restart markers img/s" in text and ("1,250" in text or "1250" in text)


def test_sizing_uses_the_smooth_set_when_no_imagenet_like_run():
    import report

    res = copy.deepcopy(CANNED)
    del res["runs"][4]
    rows = {(r["arch"], r["image_size"]): r for r in report.sizing(res)["rows"]}
    assert rows[("resnet50", 224)]["loader_img_s_per_core"] == 800.0
    assert rows[("resnet50", 224)]["loader_basis"] == "measured at 224 px"
    assert rows[("resnet18", 192)]["loader_img_s_per_core"] == 900.0
    assert rows[("resnet18", 160)]["loader_basis"].startswith("estimate")  # 160 not measured


def test_sizing_reads_the_public_figures_file(tmp_path):
    """The GPU rates, their sources and the node assumptions come from public_figures.json."""
    import report

    figures = report.public_figures()
    assert {(g["arch"], g["image_size"]) for g in figures["gpu_rates"]} == \
        {(a, px) for a in ("resnet18", "resnet50") for px in (160, 192, 224)}
    assert all(g["source"] and g["kind"] in ("public", "public, derived", "estimate")
               for g in figures["gpu_rates"])
    figures["gpus_per_node"] = 4
    figures["gpu_rates"] = [dict(figures["gpu_rates"][0], img_s=5000, source="a test figure")]
    s = report.sizing(CANNED, figures)
    assert s["gpus_per_node"] == 4 and len(s["rows"]) == 1
    row = s["rows"][0]
    assert (row["gpu_img_s"], row["source"]) == (5000, "a test figure")
    assert row["cores_per_node"] == 4 * row["cores_per_gpu"]


def test_sizing_adds_gpu_rates_measured_here():
    import report

    res = copy.deepcopy(CANNED)
    train = res["runs"][TRAIN]["result"]
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
    for needle in ("## Packing", "## Decode", "## Loader", "## A simulated node",
                   "## Train step", "## End to end", "## Sizing", "![benchmark plot](r.png)",
                   "python bench_loader.py --image-size 224",
                   "loader cores per GPU  = ceil(", "not ours", "**Failed**", "boom",
                   "Some CPU, 16 cores (8 physical), 64.0 GB",
                   "Commit: `0123456789ab` with uncommitted changes",
                   # each benchmark's own rows
                   "| &lt;sample set&gt;, 1200 files, 1 workers | 800 | 900 | 0.89 | 1,234 |",
                   "| 224 px, 2 workers, batch 64, &lt;sample set, imagenet-like&gt; (107 KB "
                   "files) | 1,000 | 900 | 250 | 800 |",
                   "| 224 px, 2 workers, batch 64, &lt;sample set, imagenet-like&gt; (107 KB "
                   "files) | 300 | 700 | 2.33 |",
                   "| 16 cores: now, 8 ranks x 1 workers | 16 | 24 | 154 | 1,233 | 5,000 | "
                   "2,000 | 700 |",
                   # no rate where only memory and processes mean something
                   "| 64 cores (sized as, --cores): now, 8 ranks x 7 workers | 64 | 72 | 154 "
                   "| 1,233 | 9,000 | 3,000 | - |",
                   "| 64 cores (sized as, --cores): before, 8 ranks x 63 workers (computed) | "
                   "512 | 72 |",
                   "| resnet50 | 64 | trace | 8 | 1.20 |"):
        assert needle in text, needle
    assert "{{" not in text and "}}" not in text  # every placeholder of the template expanded
    # rendering the results file again from the command line gives the same page and plot
    with open(tmp_path / "r.json", "w") as f:
        json.dump(res, f)
    os.remove(png)
    subprocess.run([sys.executable, os.path.join(BENCH, "report.py"), str(tmp_path / "r.json"),
                    "--markdown", str(tmp_path / "again.md")], check=True, capture_output=True,
                   timeout=120)
    assert open(tmp_path / "again.md").read() == text
    assert os.path.getsize(png) > 0


def test_report_template_placeholders_are_all_known(tmp_path):
    import report

    template = tmp_path / "t.md"
    template.write_text("# T\n\n{{runs:bench_pack.py}}\n\n{{no_such_thing}}\n")
    with pytest.raises(KeyError, match="no_such_thing"):
        report.render_markdown(CANNED, None, None, template=str(template))


# ------------------------------------------------------------------------------ machine paths

def test_labels_replace_this_machines_paths(tmp_path):
    import common

    data = str(tmp_path / "imagenet")
    common.label_path(data, "<data>")
    assert common.show(os.path.join(data, "train")) == "<data>/train"
    assert common.show(os.path.join(common.DEFAULT_CACHE, "sample", "val")) == "<sample set>/val"
    assert common.show(os.path.join(common.DEFAULT_CACHE, "packed-1234abcd")) == \
        "<cache>/packed-1234abcd"
    text = common.scrub("read %s/train/x.JPEG; at %s/engine/data/loader.py"
                        % (data, common.ROOT))
    assert text == "read <data>/train/x.JPEG; at ./engine/data/loader.py"


def test_git_info_names_the_checked_out_commit():
    import common

    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=60).stdout.strip()
    info = common.git_info()
    assert len(head) == 40 and info["commit"] == head
    assert info["dirty"] in (True, False)


def test_machine_info_has_cpu_cores_and_memory():
    import common

    info = common.machine_info()
    assert info["cpu"] and info["cores"] == os.cpu_count() and info["memory_gb"] > 0
    assert common.describe_machine(info).startswith("%s, %d cores" % (info["cpu"],
                                                                      info["cores"]))


def machine_paths():
    """Absolute paths that mean something only on this machine."""
    paths = {ROOT, os.path.expanduser("~"), os.path.realpath(ROOT)}
    return [p for p in paths if len(p) > 1]


def test_committed_results_and_page_hold_no_machine_paths():
    results = os.path.join(BENCH, "results")
    files = [os.path.join(results, f) for f in os.listdir(results) if f.endswith(".json")]
    files += [os.path.join(ROOT, "BENCHMARKS.md")]
    assert len(files) >= 2
    for path in files:
        text = open(path).read()
        for p in machine_paths() + ["/root/", "/home/", "/tmp/", "/Users/"]:  # any home, tmp
            assert p not in text, (path, p)
    for path in files[:-1]:
        with open(path) as f:
            res = json.load(f)
        assert res["version"] == 2 and "commit" in res["git"] and res["machine"]["cpu"]


# ----------------------------------------------------------------------------------- run_all

def check_run_all(out, summary, names, raw):
    assert summary["benchmarks"] == names and summary["failed"] == []
    for key in ("json", "png", "markdown"):
        assert os.path.dirname(summary[key]) == str(out), key
        assert os.path.getsize(summary[key]) > 0, key
    with open(summary["json"]) as f:
        text = f.read()
    for p in machine_paths() + [raw, str(out)]:  # $DATA, $OUT and labels instead
        assert p not in text, p
    res = json.loads(text)
    assert [r["name"] for r in res["runs"]] == names
    for r in res["runs"]:
        assert r["returncode"] == 0 and isinstance(r["result"], dict), r["name"]
        assert r["command"][1] == "benchmarks/" + r["script"]
        if r["script"] != "bench_train.py":  # the one benchmark without data
            assert r["command"][2:4] == ["--data", "$DATA"], r["command"]
    assert res["version"] == 2 and res["quick"] is True and res["sizing"]["rows"]
    assert res["git"]["commit"] and res["machine"]["cores"] == os.cpu_count()
    assert res["argv"][1:7] == ["benchmarks/run_all.py", "--quick", "--out", "$OUT", "--data",
                                "$DATA"]
    text = open(summary["markdown"]).read()
    for r in res["runs"]:
        assert r["command_str"] in text
    assert "Quick run" in text
    assert "![benchmark plot](%s)" % os.path.basename(summary["png"]) in text
    for p in machine_paths() + [raw]:
        assert p not in text, p
    return res


def test_run_all_quick_subset(raw, tmp_path):
    out = tmp_path / "out"
    summary, _ = run("run_all.py", "--quick", "--out", str(out), "--data", raw, "--only",
                     "pack,decode")
    res = check_run_all(out, summary, ["pack", "pack_imagenet_like", "decode"], raw)
    assert [r["result"]["files"] for r in res["runs"][:2]] == [20, 20]
    assert "--imagenet-like" in res["runs"][1]["command"]
    assert "Not run." in open(summary["markdown"]).read()  # loader, train, e2e were left out


def test_run_all_plan_has_node_and_imagenet_like_runs(capsys):
    import run_all

    assert run_all.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    plan = {line.split()[0]: line.split()[1:] for line in lines}
    assert list(plan) == ["pack", "pack_imagenet_like", "decode", "stages", "loader_160",
                          "loader_192",
                          "loader_224", "loader_imagenet_like_160", "loader_imagenet_like_192",
                          "loader_imagenet_like_224", "node", "node_cores64", "train", "e2e"]
    assert "--cold" in plan["loader_imagenet_like_224"]
    assert "--imagenet-like" in plan["loader_imagenet_like_224"]
    assert not any("--cold" in v for k, v in plan.items() if k != "loader_imagenet_like_224")
    assert plan["node_cores64"][-2:] == ["--cores", "64"] and "--cores" not in plan["node"]


def test_run_all_records_a_failing_benchmark(tmp_path):
    out = tmp_path / "out"
    missing = str(tmp_path / "missing")
    summary, _ = run("run_all.py", "--quick", "--out", str(out), "--data", missing, "--only",
                     "decode", rc=1)
    assert summary["failed"] == ["decode"]
    with open(summary["json"]) as f:
        text = f.read()
    run0 = json.loads(text)["runs"][0]
    assert run0["result"] is None and run0["returncode"] != 0 and run0["error"]
    assert "<data>" in run0["error"] and missing not in text  # the error names it by label
    assert "**Failed**" in open(summary["markdown"]).read()


@pytest.mark.slow
def test_run_all_quick_everything(raw, tmp_path):
    out = tmp_path / "out"
    summary, _ = run("run_all.py", "--quick", "--out", str(out), "--data", raw, "--packed",
                     str(tmp_path / "packed"))
    res = check_run_all(out, summary, ["pack", "pack_imagenet_like", "decode", "stages",
                                       "loader_32",
                                       "loader_imagenet_like_32", "node", "node_cores8",
                                       "train", "e2e"], raw)
    assert res["device"]
    assert not os.path.exists(os.path.join(str(tmp_path), "BENCHMARKS.md"))
    text = open(summary["markdown"]).read()
    assert "cold, readahead on" in text and "(sized as, --cores)" in text
