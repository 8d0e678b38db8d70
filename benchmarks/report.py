#!/usr/bin/env python3
"""Turn a results JSON written by run_all.py into its PNG plot and BENCHMARKS.md.

    python benchmarks/report.py benchmarks/results/2024-01-01-host.json [--markdown PATH]

run_all.py calls the same functions after running the benchmarks; this entry point only
re-renders (after a change of wording, say) without measuring anything again.

The report only assembles. The page's text is benchmarks/BENCHMARKS.template.md, whose
`{{runs:bench_x.py}}` lines expand to that benchmark's commands and to the tables its own
`markdown(results)` function makes from its JSON results; the published figures the sizing
table compares against are benchmarks/public_figures.json. What is computed here is the sizing
(loader cores per GPU), which combines several benchmarks with those figures.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from common import ROOT, describe_machine, md_table  # noqa: E402

from engine.atomic import atomic_write  # noqa: E402

TEMPLATE = os.path.join(HERE, "BENCHMARKS.template.md")
PUBLIC_FIGURES = os.path.join(HERE, "public_figures.json")
SIZING_SIZES = (160, 192, 224)


def public_figures(path: str = PUBLIC_FIGURES) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------- access

def runs_by_name(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {r["name"]: r for r in results.get("runs", [])}


def result_of(results: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    run = runs_by_name(results).get(name)
    return run.get("result") if run else None


def runs_of(results: Dict[str, Any], script: str) -> List[Dict[str, Any]]:
    """The runs of one benchmark script, in run order (failed ones included)."""
    return [r for r in results.get("runs", []) if r.get("script") == script]


def loader_runs(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Successful bench_loader results, by image size."""
    out = [r["result"] for r in runs_of(results, "bench_loader.py") if r.get("result")]
    return sorted(out, key=lambda r: r["image_size"])


def machine_line(results: Dict[str, Any]) -> str:
    return describe_machine(results.get("machine", "?"))


# ------------------------------------------------------------------------------------- sizing

def loader_per_core(results: Dict[str, Any], size: int,
                    key: str = "engine_img_s") -> Optional[Tuple[float, str]]:
    """(engine img/s per loader core at `size`, how it was obtained) or None; `key` picks the
    engine row ("engine_restarts_img_s": shards packed with --restart-markers).

    ImageNet-like runs (files the size of ImageNet's) are preferred to the smooth sample set,
    whose three times smaller files decode faster and would understate the cores needed."""
    runs = [r for r in loader_runs(results) if r.get(key)]
    if not runs:
        return None
    like = [r for r in runs if r.get("imagenet_like")]
    pool = like or runs
    data = " on the ImageNet-like set" if like else ""
    for r in pool:
        if r["image_size"] == size:
            return r[key] / max(1, r["workers"]), "measured at %d px%s" % (size, data)
    near = min(pool, key=lambda r: abs(r["image_size"] - size))
    # Not rescaled by output pixels: the decode of the source JPEG dominates the cost, so a
    # smaller output is only modestly cheaper (DCT scaling / ROI); keeping the rate is the
    # conservative estimate.
    return (near[key] / max(1, near["workers"]),
            "estimate: the rate measured at %d px%s, not rescaled" % (near["image_size"], data))


def gpu_rates(results: Dict[str, Any],
              figures: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Per-GPU model rates for the sizing table: measured here when bench_train ran on CUDA
    (its best mode per arch and size), then the published figures."""
    figures = figures or public_figures()
    rows: List[Dict[str, Any]] = []
    train = result_of(results, "train")
    if train and train.get("cuda"):
        best: Dict[Tuple[str, int], Dict[str, Any]] = {}
        for r in train["results"]:
            key = (r["arch"], r["image_size"])
            if key not in best or r["img_s"] > best[key]["img_s"]:
                best[key] = r
        for (arch, size), r in sorted(best.items()):
            rows.append({"arch": arch, "image_size": size, "gpu_img_s": r["img_s"],
                         "kind": "measured here",
                         "source": "bench_train on %s, %s, batch %d (synthetic input)"
                                   % (train["device"], r["mode"], r["batch_size"])})
    for g in figures["gpu_rates"]:
        rows.append({"arch": g["arch"], "image_size": g["image_size"], "gpu_img_s": g["img_s"],
                     "kind": g["kind"], "source": g["source"]})
    return rows


def sizing(results: Dict[str, Any], figures: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Loader cores each GPU needs: ceil(model img/s per GPU / loader img/s per core)."""
    figures = figures or public_figures()
    gpus = figures["gpus_per_node"]
    jpeg_kb = figures["imagenet_mean_jpeg_kb"]["value"]
    rows = []
    for g in gpu_rates(results, figures):
        per_core = loader_per_core(results, g["image_size"])
        row = dict(g, loader_img_s_per_core=None, loader_basis=None, cores_per_gpu=None,
                   cores_per_node=None, node_read_mb_s=None, cores_per_gpu_restarts=None)
        marked = loader_per_core(results, g["image_size"], "engine_restarts_img_s")
        if marked is not None and marked[0] > 0:
            row["cores_per_gpu_restarts"] = int(math.ceil(g["gpu_img_s"] / marked[0]))
        if per_core is not None and per_core[0] > 0:
            cores = int(math.ceil(g["gpu_img_s"] / per_core[0]))
            row.update(loader_img_s_per_core=round(per_core[0], 1), loader_basis=per_core[1],
                       cores_per_gpu=cores, cores_per_node=cores * gpus,
                       node_read_mb_s=round(g["gpu_img_s"] * gpus * jpeg_kb / 1000.0))
        rows.append(row)
    return {"formula": "loader cores per GPU = ceil(model img/s per GPU / loader img/s per core)",
            "gpus_per_node": gpus, "jpeg_kb": jpeg_kb, "rows": rows}


# --------------------------------------------------------------------------------------- plot

def write_png(results: Dict[str, Any], path: str) -> str:
    """Panel 1: train img/s per arch and mode; 2: loader rates per run; 3: end to end."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_train, ax_loader, ax_e2e = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 3, 1.4]})

    train = result_of(results, "train")
    if train and train.get("results"):
        groups = []
        for r in train["results"]:
            g = "%s\n%d px" % (r["arch"], r["image_size"])
            if g not in groups:
                groups.append(g)
        modes = [m for m in ("eager", "trace", "amp") if any(r["mode"] == m
                                                             for r in train["results"])]
        _bars(ax_train, groups, modes,
              {(("%s\n%d px" % (r["arch"], r["image_size"])), r["mode"]): r["img_s"]
               for r in train["results"]})
        ax_train.set_title("train step, input on device (%s, batch %d)"
                           % (_short(train["device"]), train["batch_size"]), fontsize=10)
    else:
        _empty(ax_train, "bench_train did not run")
    ax_train.set_ylabel("images / s")

    loaders = loader_runs(results)
    if loaders:
        series = [("engine, LMDB shards", "engine_img_s"),
                  ("engine, raw folder", "engine_raw_img_s"),
                  ("seed: megengine DataLoader", "seed_img_s"),
                  ("DALI CPU", "dali_img_s"),
                  ("decode ceiling", "decode_ceiling_img_s")]
        series = [s for s in series if any(r.get(s[1]) for r in loaders)]

        def group(r):
            return "%d px%s" % (r["image_size"], "\nImageNet-like" if r.get("imagenet_like")
                                else "")

        groups = sorted({group(r) for r in loaders},
                        key=lambda g: (g.endswith("like"), int(g.split()[0])))
        values = {(group(r), label): r.get(key) for r in loaders for label, key in series}
        _bars(ax_loader, groups, [s[0] for s in series], values)
        ax_loader.set_title("loader, %d workers, batch %d" % (loaders[-1]["workers"],
                                                             loaders[-1]["batch_size"]),
                            fontsize=10)
    else:
        _empty(ax_loader, "bench_loader did not run")
    ax_loader.set_ylabel("images / s")

    e2e = result_of(results, "e2e")
    if e2e:
        vals = [e2e["synthetic_train_img_s"], e2e["loader_train_img_s"]]
        bars = ax_e2e.bar(["synthetic", "Loader"], vals, color=["tab:gray", "tab:blue"])
        ax_e2e.bar_label(bars, labels=["", "wait %.1f %%" % (100 * e2e["data_wait_fraction"])],
                         fontsize=8)
        ax_e2e.set_title("end to end: %s %s\nbatch %d, %d px" % (
            e2e["arch"], e2e["mode"], e2e["batch_size"], e2e["image_size"]), fontsize=10)
        ax_e2e.set_ylabel("train images / s")
    else:
        _empty(ax_e2e, "bench_e2e did not run")
    title = "engine benchmarks, %s, %s" % (results.get("date", ""), machine_line(results))
    if results.get("quick"):
        title += "  [QUICK RUN: tiny sizes, not meaningful]"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def _bars(ax, groups: Sequence[str], series: Sequence[str], values: Dict[Tuple[str, str], Any]):
    width = 0.8 / max(1, len(series))
    for k, name in enumerate(series):
        xs, ys = [], []
        for i, g in enumerate(groups):
            v = values.get((g, name))
            if v is not None:
                xs.append(i + (k - (len(series) - 1) / 2) * width)
                ys.append(v)
        if xs:
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, labels=[_label(y) for y in ys], fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _label(v: float) -> str:
    return "%.0f" % v if v >= 100 else "%.3g" % v


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])


def _short(device: str) -> str:
    return device if len(device) <= 40 else device[:37] + "..."


# ----------------------------------------------------------------------------------- markdown

def bench_markdown(script: str) -> Callable[[Sequence[Dict[str, Any]]], List[str]]:
    """The `markdown(results)` function of benchmarks/<script>."""
    return importlib.import_module(os.path.splitext(script)[0]).markdown


def render_runs(results: Dict[str, Any], script: str) -> List[str]:
    """One benchmark's part of the page: its commands, its tables, its failures, wall time."""
    runs = runs_of(results, script)
    if not runs:
        return ["Not run."]
    lines = ["```"] + [r.get("command_str", " ".join(r.get("command", []))) for r in runs]
    lines += ["```", ""]
    ok = [r["result"] for r in runs if r.get("result") is not None]
    if ok:
        lines += bench_markdown(script)(ok)
    for r in runs:
        if r.get("result") is None:
            lines += ["", "**Failed**: `%s` (exit code %s):" % (r.get("command_str"),
                                                                r.get("returncode")),
                      "", "```", (r.get("error") or "").strip()[-1500:], "```"]
    lines += ["", "Wall time: %s." % ", ".join("%s %s s" % (r["name"], _secs(r.get("seconds", 0)))
                                               for r in runs)]
    return lines


def _secs(v: float) -> str:
    return "%.1f" % v if v < 10 else "%.0f" % v


def render_sizing(results: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(the sizing table, the list of its GPU figures' sources)."""
    s = results.get("sizing") or sizing(results)
    rows = [(r["arch"], r["image_size"], r["gpu_img_s"], r["kind"], r["loader_img_s_per_core"],
             r["loader_basis"], r["cores_per_gpu"], r["cores_per_node"],
             r.get("cores_per_gpu_restarts"),
             None if r["node_read_mb_s"] is None else "%.1f GB/s" % (r["node_read_mb_s"] / 1e3))
            for r in s["rows"]]
    table = md_table(["arch", "px", "model img/s per GPU", "GPU figure", "loader img/s per core",
                      "loader figure", "cores per GPU",
                      "cores per %d-GPU node" % s["gpus_per_node"],
                      "cores per GPU, --restart-markers", "shard reads per node"], rows)
    sources, seen = [], set()
    for r in s["rows"]:
        key = (r["arch"], r["image_size"], r["source"])
        if key not in seen:
            seen.add(key)
            sources.append("- %s %d px: %s" % (r["arch"], r["image_size"], r["source"]))
    return table, sources


def render_about(results: Dict[str, Any], png_rel: Optional[str],
                 json_rel: Optional[str]) -> List[str]:
    git = results.get("git") or {}
    commit = git.get("commit")
    if commit:
        commit = "`%s`" % commit[:12] + (
            " (%s)" % git["note"] if git.get("note") else
            {True: " with uncommitted changes", False: "",
             None: " (uncommitted changes unknown)"}[git.get("dirty")])
    lines = ["- Machine: %s" % machine_line(results),
             "- Commit: %s" % (commit or "unknown"),
             "- Device for the train benchmarks: %s" % (results.get("device") or "not run"),
             "- Python %s, MegEngine %s" % (results.get("python", "?"),
                                           results.get("megengine", "?"))]
    if json_rel:
        lines.append("- All figures, exact commands, the machine and the commit: [%s](%s)"
                     % (json_rel, json_rel))
    if not results.get("runs"):
        lines += ["", "> **No results yet**: run `make bench` to measure this machine and fill "
                  "in this page."]
    if results.get("quick"):
        lines += ["", "> **Quick run** (`run_all.py --quick`): tiny sizes that only show the "
                  "pipeline works; the figures are not meaningful."]
    return lines


def render_markdown(results: Dict[str, Any], png_rel: Optional[str], json_rel: Optional[str],
                    template: str = TEMPLATE) -> str:
    with open(template) as f:
        text = f.read()
    s = results.get("sizing") or sizing(results)
    table, sources = render_sizing(results)
    blocks = {"about": render_about(results, png_rel, json_rel),
              "plot": ["![benchmark plot](%s)" % png_rel] if png_rel else [],
              "sizing_table": table, "sizing_sources": sources}
    words = {"date": results.get("date", "?"), "machine": machine_line(results),
             "gpus_per_node": str(s["gpus_per_node"]), "jpeg_kb": str(s["jpeg_kb"]),
             "sizing_sizes": "/".join(str(x) for x in SIZING_SIZES)}

    def expand(m: "re.Match[str]") -> str:
        key = m.group(1)
        if key.startswith("runs:"):
            return "\n".join(render_runs(results, key[len("runs:"):]))
        if key in blocks:
            return "\n".join(blocks[key])
        if key in words:
            return words[key]
        raise KeyError("%s: unknown placeholder {{%s}}" % (template, key))

    text = re.sub(r"\{\{([a-z_]+(?::[\w.]+)?)\}\}", expand, text)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def write_markdown(results: Dict[str, Any], path: str, png_path: Optional[str] = None,
                   json_path: Optional[str] = None) -> str:
    base = os.path.dirname(os.path.abspath(path))

    def rel(p):
        return os.path.relpath(os.path.abspath(p), base).replace(os.sep, "/") if p else None

    text = render_markdown(results, rel(png_path), rel(json_path))
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a JSON file written by run_all.py")
    p.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--png", default=None, help="default: the results file with .png")
    a = p.parse_args(argv)
    with open(a.results) as f:
        results = json.load(f)
    results["sizing"] = sizing(results)
    png = a.png or os.path.splitext(a.results)[0] + ".png"
    write_png(results, png)
    write_markdown(results, a.markdown, png, a.results)
    print("wrote %s and %s" % (png, a.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
