#!/usr/bin/env python3
"""Run every benchmark (pack, decode, loader at 160/192/224 px, train, e2e) as a subprocess,
parse each one's JSON last line, and write

    <out>/<date>-<host>.json   every figure, the exact commands, the machine
    <out>/<date>-<host>.png    train img/s per arch and mode | loader rates | end to end
    BENCHMARKS.md              a results table per benchmark and the loader-cores sizing note

`make bench` runs this with the defaults (out = benchmarks/results, BENCHMARKS.md at the repo
root). `--quick` uses tiny sizes (seconds per benchmark; for tests, not for numbers); `--out
DIR` writes everything, the markdown included, under DIR instead of the repository.
A failing benchmark is recorded with its error and the others still run; the exit code is 1
when any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import ROOT, log, machine  # noqa: E402

import report  # noqa: E402

BENCHMARKS = ("pack", "decode", "loader", "train", "e2e")


def plan(a) -> List[Tuple[str, str, List[str]]]:
    """(name, script, arguments) of every benchmark to run, in order."""
    data = ["--data", a.data] if a.data else []
    packed = ["--packed", a.packed] if a.packed else []
    sizes = [int(s) for s in a.loader_sizes.split(",") if s]
    seed_size = max(sizes)  # the seed pipeline once, at the largest size (the slowest to run)
    lw = ["--workers", str(a.loader_workers)] if a.loader_workers else []
    q = a.quick
    jobs = [
        ("pack", "bench_pack.py", data + (["--workers", "1", "--repeats", "1"] if q else [])),
        ("decode", "bench_decode.py", data + (["--repeats", "1", "--limit", "40",
                                               "--image-size", "64"] if q else
                                              ["--image-size", str(seed_size)])),
    ]
    for s in sizes:
        extra = (["--workers", "1", "--batch-size", "4", "--seconds", "0.3", "--repeats", "1"]
                 if q else [])
        jobs.append(("loader_%d" % s, "bench_loader.py",
                     data + packed + extra + lw + ["--image-size", str(s)]
                     + ([] if s == seed_size else ["--no-seed"])))
    jobs.append(("train", "bench_train.py",
                 ["--archs", "resnet18", "--batch-size", "2", "--image-size", "32", "--steps",
                  "1", "--warmup", "1", "--modes", "eager,trace"] if q else
                 (["--archs", a.archs] if a.archs else [])))
    jobs.append(("e2e", "bench_e2e.py", data + packed + (
        ["--batch-size", "2", "--image-size", "32", "--steps", "2", "--warmup", "1",
         "--workers", "1", "--loader-seconds", "0.3"] if q else [])))
    only = set(a.only.split(",")) if a.only else set(BENCHMARKS)
    return [j for j in jobs if j[0].split("_")[0] in only]


def run_one(name: str, script: str, args: List[str], timeout: float) -> Dict[str, Any]:
    """Run one benchmark, echoing its output live; return its record for the results file."""
    cmd = [sys.executable, os.path.join(HERE, script)] + args
    shown = [_display_python(), "benchmarks/" + script] + args
    log("\n=== %s: %s" % (name, " ".join(shlex.quote(c) for c in shown)))
    t0 = time.perf_counter()
    out: List[str] = []
    err: List[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)

    def pump(stream, sink, echo):
        for line in stream:
            sink.append(line)
            echo.write(line)
            echo.flush()

    threads = [threading.Thread(target=pump, args=(proc.stdout, out, sys.stdout), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, sys.stderr), daemon=True)]
    for t in threads:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        err.append("\nrun_all: killed after %.0f s (--timeout)\n" % timeout)
    for t in threads:
        t.join(5)
    record: Dict[str, Any] = {
        "name": name, "script": script, "command": shown,
        "command_str": " ".join(shlex.quote(c) for c in shown),
        "returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "result": None,
    }
    lines = "".join(out).strip().splitlines()
    if rc == 0 and lines:
        try:
            record["result"] = json.loads(lines[-1])
        except json.JSONDecodeError:
            record["error"] = "the last line of its output is not JSON: %r" % lines[-1][:200]
    else:
        # Keep the tail without MegEngine's CUDA-probe chatter, which fills stderr on CPU.
        tail = [l for l in "".join(err).splitlines() if not l.startswith(("debug:", "info:"))]
        record["error"] = "\n".join(tail[-40:])
    record["stdout_table"] = "\n".join(lines[:-1]) if lines else ""
    return record


def _display_python() -> str:
    """How to spell the interpreter in the recorded commands (relative inside the repo)."""
    exe = os.path.abspath(sys.executable)
    if exe.startswith(ROOT + os.sep):
        return os.path.relpath(exe, ROOT)
    return "python"


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    try:
        from importlib.metadata import version

        out["megengine"] = version("megengine")
    except Exception:  # noqa: BLE001 - informational
        out["megengine"] = "?"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks, not numbers")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where results go (default benchmarks/results, with BENCHMARKS.md at the "
                        "repository root); with --out, BENCHMARKS.md is written in DIR too")
    p.add_argument("--markdown", default=None, help="override where BENCHMARKS.md is written")
    p.add_argument("--data", default=None, help="raw ImageNet-layout folder (default: the sample "
                                                "set, made on first use)")
    p.add_argument("--packed", default=None, help="its packed twin (default: a cache folder)")
    p.add_argument("--only", default=None,
                   help="comma list of %s (default: all)" % ",".join(BENCHMARKS))
    p.add_argument("--loader-sizes", default=None,
                   help="image sizes for bench_loader (default 160,192,224; quick: 32)")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="bench_loader --workers (default: its own, 2)")
    p.add_argument("--archs", default=None, help="bench_train --archs (default: its own)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    if a.loader_sizes is None:
        a.loader_sizes = "32" if a.quick else ",".join(str(s) for s in report.SIZING_SIZES)
    if a.only:
        bad = set(a.only.split(",")) - set(BENCHMARKS)
        if bad:
            p.error("--only: unknown %s; choose from %s" % (", ".join(sorted(bad)),
                                                            ",".join(BENCHMARKS)))

    if a.dry_run:
        for name, script, args in plan(a):
            print("%-10s %s" % (name, " ".join(shlex.quote(c) for c in
                                             [_display_python(), "benchmarks/" + script] + args)))
        return 0

    out_dir = os.path.abspath(a.out or os.path.join(HERE, "results"))
    md_path = a.markdown or (os.path.join(out_dir, "BENCHMARKS.md") if a.out
                             else os.path.join(ROOT, "BENCHMARKS.md"))
    os.makedirs(out_dir, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9._-]+", "_", platform.node() or "host")
    stem = os.path.join(out_dir, "%s-%s" % (time.strftime("%Y-%m-%d"), host))

    t0 = time.perf_counter()
    runs = [run_one(name, script, args, a.timeout) for name, script, args in plan(a)]
    train = next((r["result"] for r in runs if r["name"] == "train" and r["result"]), None)
    results: Dict[str, Any] = dict(
        format="engine-bench-results", version=1, date=time.strftime("%Y-%m-%d %H:%M:%S"),
        host=host, machine=machine(), quick=a.quick,
        device=train["device"] if train else None,
        argv=[_display_python(), "benchmarks/run_all.py"] + list(argv if argv is not None
                                                                 else sys.argv[1:]),
        seconds=round(time.perf_counter() - t0, 1), runs=runs, **versions())
    results["sizing"] = report.sizing(results)

    json_path, png_path = stem + ".json", stem + ".png"
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, json_path)
    report.write_png(results, png_path)
    report.write_markdown(results, md_path, png_path, json_path)

    failed = [r["name"] for r in runs if r["result"] is None]
    log("\nrun_all: %d benchmarks in %.0f s%s" % (len(runs), results["seconds"],
                                                   "; FAILED: " + ", ".join(failed) if failed
                                                   else ""))
    summary = {"json": json_path, "png": png_path, "markdown": md_path,
               "benchmarks": [r["name"] for r in runs], "failed": failed,
               "seconds": results["seconds"]}
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
