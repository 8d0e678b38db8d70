#!/usr/bin/env python3
"""Turn a results JSON written by run_all.py into its PNG plot and BENCHMARKS.md.

    python benchmarks/report.py benchmarks/results/2024-01-01-host.json [--markdown PATH]

run_all.py calls the same functions after running the benchmarks; this entry point only
re-renders (after a change of wording here, say) without measuring anything again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZING_SIZES = (160, 192, 224)
GPUS_PER_NODE = 8
JPEG_KB = 110  # mean ImageNet train JPEG (performance-anchors.md, section 4)

# Public per-GPU training rates (NOT measured by this project): /work/shared/reference/
# performance-anchors.md, anchors A3, A4, A11. (arch, px, img/s, how it was obtained, source)
PUBLIC_GPU_RATES: List[Tuple[str, int, float, str, str]] = [
    ("resnet50", 160, 3500, "public, derived",
     "FFCV RN-50 on 8xA100: ~28.2k img/s at 160 px end to end, / 8 GPUs (anchor A3)"),
    ("resnet50", 192, 2600, "public, derived",
     "FFCV RN-50 on 8xA100: ~20.8k img/s at 192 px end to end, / 8 GPUs (anchor A3)"),
    ("resnet50", 224, 2470, "public",
     "NVIDIA DeepLearningExamples RN-50 v1.5, 1xA100 80GB, AMP (anchor A11)"),
    ("resnet18", 160, 10000, "public, derived",
     "FFCV RN-18 on 1xA100: 88 epochs in 187 min at 160-192 px, i.e. ~10k img/s averaged over "
     "its 160->192 px progressive resizing (anchor A4)"),
    ("resnet18", 192, 10000, "public, derived", "same FFCV RN-18 figure (anchor A4)"),
    ("resnet18", 224, round(10000 * (176.0 / 224) ** 2, -2), "estimate",
     "the ~10k img/s FFCV RN-18 figure scaled by pixel count from its ~176 px midpoint to 224 px "
     "(our arithmetic, not a published figure)"),
]


# ------------------------------------------------------------------------------------- access

def runs_by_name(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {r["name"]: r for r in results.get("runs", [])}


def result_of(results: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    run = runs_by_name(results).get(name)
    return run.get("result") if run else None


def loader_runs(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Successful bench_loader results, by image size."""
    out = [r["result"] for r in results.get("runs", [])
           if r.get("script") == "bench_loader.py" and r.get("result")]
    return sorted(out, key=lambda r: r["image_size"])


# ------------------------------------------------------------------------------------- sizing

def loader_per_core(results: Dict[str, Any], size: int) -> Optional[Tuple[float, str]]:
    """(engine img/s per loader core at `size`, how it was obtained) or None."""
    runs = loader_runs(results)
    if not runs:
        return None
    for r in runs:
        if r["image_size"] == size:
            return r["engine_img_s"] / max(1, r["workers"]), "measured at %d px" % size
    near = min(runs, key=lambda r: abs(r["image_size"] - size))
    # Not rescaled by output pixels: the decode of the source JPEG dominates the cost, so a
    # smaller output is only modestly cheaper (DCT scaling / ROI); keeping the rate is the
    # conservative estimate.
    return (near["engine_img_s"] / max(1, near["workers"]),
            "estimate: the rate measured at %d px, not rescaled" % near["image_size"])


def gpu_rates(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per-GPU model rates for the sizing table: measured here when bench_train ran on CUDA
    (its best mode per arch and size), then the public anchors."""
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
    for arch, size, rate, kind, source in PUBLIC_GPU_RATES:
        rows.append({"arch": arch, "image_size": size, "gpu_img_s": rate, "kind": kind,
                     "source": source})
    return rows


def sizing(results: Dict[str, Any]) -> Dict[str, Any]:
    """Loader cores each GPU needs: ceil(model img/s per GPU / loader img/s per core)."""
    rows = []
    for g in gpu_rates(results):
        per_core = loader_per_core(results, g["image_size"])
        row = dict(g, loader_img_s_per_core=None, loader_basis=None, cores_per_gpu=None,
                   cores_per_node=None, node_read_mb_s=None)
        if per_core is not None and per_core[0] > 0:
            cores = int(math.ceil(g["gpu_img_s"] / per_core[0]))
            row.update(loader_img_s_per_core=round(per_core[0], 1), loader_basis=per_core[1],
                       cores_per_gpu=cores, cores_per_node=cores * GPUS_PER_NODE,
                       node_read_mb_s=round(g["gpu_img_s"] * GPUS_PER_NODE * JPEG_KB / 1000.0))
        rows.append(row)
    return {"formula": "loader cores per GPU = ceil(model img/s per GPU / loader img/s per core)",
            "gpus_per_node": GPUS_PER_NODE, "jpeg_kb": JPEG_KB, "rows": rows}


# --------------------------------------------------------------------------------------- plot

def write_png(results: Dict[str, Any], path: str) -> str:
    """Panel 1: train img/s per arch and mode; 2: loader rates per size; 3: end to end."""
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
                  ("decode ceiling", "decode_ceiling_img_s")]
        groups = ["%d px" % r["image_size"] for r in loaders]
        values = {("%d px" % r["image_size"], label): r.get(key)
                  for r in loaders for label, key in series}
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
    title = "engine benchmarks, %s, %s" % (results.get("date", ""), results.get("machine", ""))
    if results.get("quick"):
        title += "  [QUICK RUN: tiny sizes, not meaningful]"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
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

def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return "{:,}".format(v)
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        if abs(v) >= 100:
            return "{:,.0f}".format(v)
        if abs(v) >= 10:
            return "%.1f" % v
        return "%.2f" % v
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(_num(c) for c in r) + " |" for r in rows]
    return out


def _command(run: Dict[str, Any]) -> List[str]:
    return ["```", run.get("command_str", " ".join(run.get("command", []))), "```"]


def _section(results, name: str, title: str, body) -> List[str]:
    run = runs_by_name(results).get(name)
    lines = ["", "## " + title, ""]
    if run is None:
        return lines + ["Not run."]
    lines += _command(run)
    if run.get("result") is None:
        return lines + ["", "**Failed** (exit code %s):" % run.get("returncode"), "", "```",
                        (run.get("error") or "").strip()[-1500:], "```"]
    lines.append("")
    return lines + body(run["result"]) + ["", "Wall time: %.0f s." % run.get("seconds", 0)]


def _pack(r):
    return _table(["figure", "value"], [
        ("pack_imagenet img/s (%d workers, %d files)" % (r["workers"], r["files"]),
         r["pack_img_s"]),
        ("decode ceiling img/s (1-process strict decode x workers)", r["decode_ceiling_img_s"]),
        ("pack / ceiling (target >= 0.8)", r["pack_over_ceiling"])])


DECODE_ROWS = [
    ("cv2_imdecode_full", "OpenCV cv2.imdecode, full image"),
    ("pil_full", "Pillow, full image"),
    ("turbojpeg_full", "libjpeg-turbo (PyTurboJPEG), full image"),
    ("turbojpeg_dct_scaled", "libjpeg-turbo, DCT-scaled for the train crop"),
    ("roi_decoder_full", "engine ROI decoder, full image"),
    ("train_full_decode_crop_resize", "train path: full decode + crop + resize + flip"),
    ("train_roi_decode_resize", "train path: ROI (+DCT) decode + resize + flip"),
    ("val_resize_center_crop", "val path: decode + resize + center crop"),
    ("val_roi_resize_center_crop", "val path with the engine decoder"),
]


def _decode(r):
    base = r.get("turbojpeg_full") or float("nan")
    rows = [(label, r[key], r[key] / base) for key, label in DECODE_ROWS if r.get(key)]
    return ["One core, %d JPEGs of the data set, %d px output." % (r["images"], r["image_size"]),
            ""] + _table(["path", "img/s", "x turbojpeg full"], rows)


def _loader_section(results) -> List[str]:
    runs = [r for r in results.get("runs", []) if r.get("script") == "bench_loader.py"]
    lines = ["", "## Loader (bench_loader)", ""]
    if not runs:
        return lines + ["Not run."]
    lines += ["```"] + [r.get("command_str", "") for r in runs] + ["```", ""]
    ok = sorted([r["result"] for r in runs if r.get("result")], key=lambda r: r["image_size"])
    rows = []
    for r in ok:
        seed, ceil = r.get("seed_img_s"), r["decode_ceiling_img_s"]
        rows.append(("%d px, %d workers, batch %d"
                     % (r["image_size"], r["workers"], r["batch_size"]),
                     r["engine_img_s"], r["engine_raw_img_s"], seed, ceil,
                     r["engine_img_s"] / ceil if ceil else None,
                     r["engine_img_s"] / seed if seed else None,
                     r["engine_img_s"] / max(1, r["workers"])))
    lines += _table(["config", "engine, LMDB shards", "engine, raw folder", "seed DataLoader",
                     "decode ceiling", "engine / ceiling", "engine / seed",
                     "engine per core"], rows)
    if ok:
        lines += ["", "img/s, medians. Engine decoder: %s. The seed pipeline is MegEngine's "
                  "DataLoader + ImageFolder (cv2) + RandomResizedCrop/flip/Normalize/ToMode, as "
                  "in the official reference; the decode ceiling is one process's full-decode "
                  "rate x workers." % ok[-1].get("decoder", "?")]
    for r in runs:
        if r.get("result") is None:
            lines += ["", "**Failed**: `%s` (exit code %s)" % (r.get("command_str"),
                                                              r.get("returncode"))]
    return lines


def _train(r):
    rows = [(x["arch"], x["image_size"], x["mode"], x["batch_size"], x["img_s"], x["ms_per_step"])
            for x in r["results"]]
    notes = ["Device: %s. Synthetic uint8 batch created once on the device; the step is "
             "engine.precision's (normalize, forward, backward, SGD); %d warm-up step(s) excluded, "
             "median of %d timed steps, full sync every %d step(s)."
             % (r["device"], r["warmup"], r["steps"], r["sync_every"]), ""]
    for n in r.get("notes", []):
        notes += ["Note: " + n + ".", ""]
    return notes + _table(["arch", "px", "mode", "batch", "img/s", "ms/step"], rows)


def _e2e(r):
    rows = [("synthetic batch (same loop, fixed batch)", r["synthetic_train_img_s"],
             r["synthetic_data_wait_fraction"], 1.0),
            ("engine Loader (%s, %d workers)" % (r["source"], r["workers"]),
             r["loader_train_img_s"], r["data_wait_fraction"], r["ratio"]),
            ("engine Loader alone, no training", r.get("loader_capacity_img_s"), None, None)]
    if r.get("target_met") is None:
        verdict = "not applicable (the loader alone is slower than the model)"
    else:
        verdict = "**met**" if r["target_met"] else "**missed**"
    return (["%s %s, batch %d, %d px on %s; %d x %d timed steps per source, interleaved."
             % (r["arch"], r["mode"], r["batch_size"], r["image_size"], r["device"],
                r.get("repeats", 1), r["steps"]), ""]
            + _table(["input", "train img/s", "data-wait", "x synthetic"], rows)
            + ["", "Target: data-wait < 5 %% whenever the loader alone is faster than the model: "
               "%s (data-wait %.1f %%)." % (verdict, 100 * r["data_wait_fraction"])])


def _sizing_section(results) -> List[str]:
    s = results.get("sizing") or sizing(results)
    lines = ["", "## Sizing: loader cores per GPU", "",
             "**Formula** (how to size a machine):", "", "```",
             "loader cores per GPU  = ceil(model img/s per GPU / loader img/s per core)",
             "loader cores per node = GPUs per node x loader cores per GPU   (+1 core per GPU for "
             "the training process)",
             "shard reads per node  = GPUs per node x model img/s x mean JPEG size (~%d KB for "
             "ImageNet)" % s["jpeg_kb"], "```", "",
             "Inputs: the loader's per-core rate is `engine img/s / workers` from bench_loader "
             "above (this machine: %s); the GPU rates are **public figures from other projects, "
             "not ours** (sources below), except rows marked *measured here*. The table assumes "
             "%d GPUs per node." % (results.get("machine", "?"), s["gpus_per_node"]), ""]
    rows = []
    for r in s["rows"]:
        rows.append((r["arch"], r["image_size"], r["gpu_img_s"], r["kind"],
                     r["loader_img_s_per_core"], r["loader_basis"], r["cores_per_gpu"],
                     r["cores_per_node"],
                     None if r["node_read_mb_s"] is None
                     else "%.1f GB/s" % (r["node_read_mb_s"] / 1000.0)))
    lines += _table(["arch", "px", "model img/s per GPU", "GPU figure", "loader img/s per core",
                     "loader figure", "cores per GPU", "cores per %d-GPU node" % s["gpus_per_node"],
                     "shard reads per node"], rows)
    lines += ["", "GPU figure sources:", ""]
    seen = set()
    for r in s["rows"]:
        key = (r["arch"], r["image_size"], r["source"])
        if key not in seen:
            seen.add(key)
            lines.append("- %s %d px: %s" % (r["arch"], r["image_size"], r["source"]))
    lines += ["", "What it means:", "",
              "- A row's *cores per GPU* is what keeps that GPU fed; with fewer, the run is "
              "loader-bound and the GPU waits (the trainer logs this as `data_wait`).",
              "- Loader rates at a size that was not measured are estimates (labelled in the "
              "table): the rate measured at the nearest size, not rescaled, because decoding the "
              "stored JPEG dominates and a smaller output is only modestly cheaper. run_all "
              "measures the loader at %s px so that the table needs no estimate."
              % "/".join(str(x) for x in SIZING_SIZES),
              "- Multi-node: every rank reads and decodes only its own share of each epoch "
              "(`Loader(rank=, world_size=)`), so the per-node figures above hold on every "
              "node whatever the node count (N nodes: N x the cores and N x the shard reads in "
              "total), and no image crosses the network, only gradients in the allreduce. Each "
              "node needs its own fast copy of the shards (local NVMe or page cache), or a "
              "shared file system that sustains the total read rate.",
              "- Per-core rates here come from %s, which may share its cores with other work; "
              "re-run `make bench` on the training machine's CPU before buying hardware from "
              "this table." % results.get("machine", "this machine")]
    return lines


def render_markdown(results: Dict[str, Any], png_rel: Optional[str],
                    json_rel: Optional[str]) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`benchmarks/run_all.py`) on %s. Regenerate the page "
             "from a results file with `python benchmarks/report.py RESULTS.json`."
             % results.get("date", "?"), "",
             "- Machine: %s" % results.get("machine", "?"),
             "- Device for the train benchmarks: %s" % results.get("device", "?"),
             "- Python %s, MegEngine %s" % (results.get("python", "?"),
                                           results.get("megengine", "?"))]
    if json_rel:
        lines.append("- All figures, exact commands and the machine: [%s](%s)"
                     % (json_rel, json_rel))
    if not results.get("runs"):
        lines += ["", "> **No results yet**: run `make bench` to measure this machine and fill "
                  "in this page."]
    if results.get("quick"):
        lines += ["", "> **Quick run** (`run_all.py --quick`): tiny sizes that only show the "
                  "pipeline works; the figures are not meaningful."]
    if png_rel:
        lines += ["", "![benchmark plot](%s)" % png_rel]
    lines += _section(results, "pack", "Packing (bench_pack)", _pack)
    lines += _section(results, "decode", "Decode, one core (bench_decode)", _decode)
    lines += _loader_section(results)
    lines += _section(results, "train", "Train step per architecture (bench_train)", _train)
    lines += _section(results, "e2e", "End to end: Loader-fed training vs synthetic input "
                                      "(bench_e2e)", _e2e)
    lines += _sizing_section(results)
    return "\n".join(lines) + "\n"


def write_markdown(results: Dict[str, Any], path: str, png_path: Optional[str] = None,
                   json_path: Optional[str] = None) -> str:
    base = os.path.dirname(os.path.abspath(path))

    def rel(p):
        return os.path.relpath(os.path.abspath(p), base).replace(os.sep, "/") if p else None

    text = render_markdown(results, rel(png_path), rel(json_path))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def main(argv=None):
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


if __name__ == "__main__":
    sys.exit(main())
