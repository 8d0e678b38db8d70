"""benchmarks/bench_train.py --ema: the EMA's cost per step, as a graph of its own and folded
into the step, at a tiny size; checked through the JSON last line."""
import json
import os
import subprocess
import sys

from helpers import ROOT

BENCH = os.path.join(ROOT, "benchmarks")


def test_bench_train_times_the_ema_both_ways():
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train.py"), "--archs",
                        "resnet18", "--batch-size", "2", "--image-size", "32", "--steps", "1",
                        "--warmup", "1", "--modes", "trace", "--ema", "0.9"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert [x["ema"] for x in res["results"]] == ["none", "separate", "folded"]
    assert all(x["img_s"] > 0 and x["loss_finite"] for x in res["results"])
    assert res["ema_decay"] == 0.9
    (cost,) = res["ema_cost"]
    assert (cost["arch"], cost["image_size"], cost["mode"]) == ("resnet18", 32, "trace")
    ms = {x["ema"]: x["ms_per_step"] for x in res["results"]}
    assert abs(cost["separate_ms"] - (ms["separate"] - ms["none"])) < 0.02
    assert abs(cost["folded_ms"] - (ms["folded"] - ms["none"])) < 0.02
    assert any("EMA ms/step" in line for line in lines)  # the table's column
    sys.path.insert(0, BENCH)
    import bench_train

    md = "\n".join(bench_train.markdown([res]))
    assert "| resnet18 | 32 | trace+ema folded | 2 |" in md


def test_bench_train_refuses_a_bad_decay():
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train.py"), "--ema", "1.5"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "--ema" in r.stderr
