#!/usr/bin/env python3
"""Run every benchmark as a subprocess, parse each one's JSON last line, and write

    <out>/<date>-<host>.json   every figure, the exact commands, the machine and the commit
    <out>/<date>-<host>.png    train img/s per arch and mode | loader rates | end to end
    BENCHMARKS.md              each benchmark's tables and the loader-cores sizing note

The plan: pack (sample set and ImageNet-like set), decode, one loader worker's stages (160 and
224 px, ImageNet-like set), loader at 160/192/224 px on both
sets (the ImageNet-like 224 px run with --cold page-cache epochs, and a DALI row where DALI is
installed), a simulated 8-rank node sized for this machine and as on a 64-core node, train,
end to end. `make bench` runs this with the defaults (out = benchmarks/results, BENCHMARKS.md
at the repo root). `--quick` uses tiny sizes (seconds per benchmark; for tests, not for
numbers); `--out DIR` writes everything, the markdown included, under DIR instead of the
repository. `--dry-run` prints the plan.

No path of this machine is recorded: a given --data/--packed/--out appears as $DATA/$PACKED/
$OUT in the recorded commands, and captured output has its paths replaced by labels
("<sample set>", "<cache>/...", see common.show). A failing benchmark is recorded with its
error and the others still run; the exit code is 1 when any failed.
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
from common import ROOT, git_info, label_path, log, machine_info, scrub  # noqa: E402

import report  # noqa: E402

from engine.atomic import atomic_write  # noqa: E402

BENCHMARKS = ("pack", "decode", "stages", "loader", "raw", "node", "train", "e2e")
# Run only when named in --only: bench_raw packs the same files three times over.
OPT_IN = ("raw",)
RESULTS_VERSION = 2
# Placeholders for the folders a user passes, in recorded commands (shell syntax: a user can
# set DATA=... and paste the command).
PLACEHOLDERS = ("$DATA", "$PACKED", "$OUT", "$MARKDOWN")


def plan(a) -> List[Tuple[str, str, List[str]]]:
    """(name, script, arguments) of every benchmark to run, in order."""
    data = ["--data", a.data] if a.data else []
    packed = ["--packed", a.packed] if a.packed else []
    like = ["--imagenet-like"]  # ignored by the scripts when --data names the data
    sizes = [int(s) for s in a.loader_sizes.split(",") if s]
    seed_size = max(sizes)  # the seed pipeline once per set, at the largest size (the slowest)
    lw = ["--workers", str(a.loader_workers)] if a.loader_workers else []
    q = a.quick
    pack_q = ["--workers", "1", "--repeats", "1"] if q else []
    jobs = [
        ("pack", "bench_pack.py", data + pack_q),
        ("pack_imagenet_like", "bench_pack.py", data + like + pack_q),
        ("decode", "bench_decode.py", data + (["--repeats", "1", "--limit", "40",
                                               "--image-size", "64"] if q else
                                              ["--image-size", str(seed_size)])),
    ]
    # One loader worker's time per image, stage by stage, at the loader's first and last size
    # on the ImageNet-like set.
    stage_sizes = sorted({min(sizes), max(sizes)})
    jobs.append(("stages", "bench_stages.py",
                 data + packed + like + ["--sizes", ",".join(str(s) for s in stage_sizes)]
                 + (["--images", "8", "--batch-size", "4", "--loader-batches", "2",
                     "--repeats", "1"] if q else [])))
    loader_q = (["--workers", "1", "--batch-size", "4", "--seconds", "0.3", "--repeats", "1"]
                if q else [])
    for variant in ([], like):
        for s in sizes:
            jobs.append(("loader_%s%d" % ("imagenet_like_" if variant else "", s),
                         "bench_loader.py",
                         data + packed + variant + loader_q + lw + ["--image-size", str(s)]
                         + ([] if s == seed_size else ["--no-seed"])
                         + (["--cold"] if variant and s == seed_size else [])))
    # Raw-pixel records against JPEG ones, on the ImageNet-like set at the loader's first and
    # last size.
    jobs.append(("raw", "bench_raw.py", data + ["--sizes", ",".join(str(s) for s in stage_sizes)]
                 + (["--images", "8", "--batch-size", "4", "--seconds", "0.3", "--repeats", "1",
                     "--pack-workers", "0"] if q else [])))
    # bench_node defaults to the ImageNet-like set, 8 ranks, batch 256, 224 px. Sized for this
    # machine, 8 batches per rank: more than the 4 its ring prefetches, so its img/s means
    # something; as a 64-core node only processes and memory do, so 2 batches suffice.
    node = data + packed + (["--local-world-size", "2", "--batch-size", "4", "--image-size",
                             "32"] if q else [])
    jobs.append(("node", "bench_node.py", node + ["--batches", "1" if q else "8"]))
    # Quick: 8 cores for 2 ranks (3 workers each), not 64 (31 each): the flag is what is tested.
    jobs.append(("node_cores%d" % (8 if q else 64), "bench_node.py",
                 node + ["--batches", "1" if q else "2", "--cores", "8" if q else "64"]))
    jobs.append(("train", "bench_train.py",
                 ["--archs", "resnet18", "--batch-size", "2", "--image-size", "32", "--steps",
                  "1", "--warmup", "1", "--modes", "eager,trace"] if q else
                 (["--archs", a.archs] if a.archs else [])))
    jobs.append(("e2e", "bench_e2e.py", data + packed + (
        ["--batch-size", "2", "--image-size", "32", "--steps", "2", "--warmup", "1",
         "--workers", "1", "--loader-seconds", "0.3"] if q else [])))
    only = set(a.only.split(",")) if a.only else set(BENCHMARKS) - set(OPT_IN)
    return [j for j in jobs if j[0].split("_")[0] in only]


def recorded(args: List[str], a) -> List[str]:
    """`args` as recorded: the folders the user passed become $DATA, $PACKED, $OUT, ..."""
    subst = {}
    for value, name in zip((a.data, a.packed, a.out, a.markdown), PLACEHOLDERS):
        if value:
            subst[value] = name
            subst[os.path.abspath(value)] = name
    return [subst.get(x, scrub(x)) for x in args]


def quote(args: List[str]) -> str:
    """A shell command line; placeholders stay unquoted so that the shell expands them."""
    return " ".join(x if x in PLACEHOLDERS else shlex.quote(x) for x in args)


def run_one(name: str, script: str, args: List[str], timeout: float, a) -> Dict[str, Any]:
    """Run one benchmark, echoing its output live; return its record for the results file."""
    cmd = [sys.executable, os.path.join(HERE, script)] + args
    shown = [_display_python(), "benchmarks/" + script] + recorded(args, a)
    log("\n=== %s: %s" % (name, quote(shown)))
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
        "name": name, "script": script, "command": shown, "command_str": quote(shown),
        "returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "result": None,
    }
    lines = "".join(out).strip().splitlines()
    if rc == 0 and lines:
        try:
            record["result"] = json.loads(scrub(lines[-1]))
        except json.JSONDecodeError:
            record["error"] = "the last line of its output is not JSON: %r" % lines[-1][:200]
    else:
        # Keep the tail without MegEngine's CUDA-probe chatter, which fills stderr on CPU.
        tail = [l for l in "".join(err).splitlines() if not l.startswith(("debug:", "info:"))]
        record["error"] = scrub("\n".join(tail[-40:]))
    record["stdout_table"] = scrub("\n".join(lines[:-1])) if lines else ""
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
                   help="comma list of %s (default: all but %s)" % (",".join(BENCHMARKS),
                                                                   ",".join(OPT_IN)))
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
            print("%-26s %s" % (name, quote([_display_python(), "benchmarks/" + script] + args)))
        return 0

    out_dir = os.path.abspath(a.out or os.path.join(HERE, "results"))
    md_path = a.markdown or (os.path.join(out_dir, "BENCHMARKS.md") if a.out
                             else os.path.join(ROOT, "BENCHMARKS.md"))
    os.makedirs(out_dir, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9._-]+", "_", platform.node() or "host")
    stem = os.path.join(out_dir, "%s-%s" % (time.strftime("%Y-%m-%d"), host))
    for value, label in ((a.data, "<data>"), (a.packed, "<packed>"), (out_dir, "<out>")):
        if value:
            label_path(value, label)

    git = git_info()  # before running: the code measured is the code at the start
    t0 = time.perf_counter()
    runs = [run_one(name, script, args, a.timeout, a) for name, script, args in plan(a)]
    train = next((r["result"] for r in runs if r["name"] == "train" and r["result"]), None)
    results: Dict[str, Any] = dict(
        format="engine-bench-results", version=RESULTS_VERSION,
        date=time.strftime("%Y-%m-%d %H:%M:%S"), host=host, machine=machine_info(), git=git,
        quick=a.quick, device=train["device"] if train else None,
        argv=[_display_python(), "benchmarks/run_all.py"] + recorded(
            list(argv if argv is not None else sys.argv[1:]), a),
        seconds=round(time.perf_counter() - t0, 1), runs=runs, **versions())
    results["sizing"] = report.sizing(results)

    json_path, png_path = stem + ".json", stem + ".png"
    text = json.dumps(results, indent=1, sort_keys=True)
    atomic_write(json_path, lambda f: f.write(text.encode()))
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
