"""Shared benchmark plumbing: the data set, repeated timing, the table and the JSON last line,
the machine and commit a result was measured on, and the labels that keep this machine's paths
out of anything that may be committed."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "engine-bench")


def add_data_args(p, packed: bool = True) -> None:
    p.add_argument("--data", default=None, metavar="DIR",
                   help="raw ImageNet-layout folder (default: the sample set, made on first use "
                        "under %s)" % DEFAULT_CACHE)
    p.add_argument("--imagenet-like", action="store_true",
                   help="default data: the sample set's ImageNet-like variant (~107 KB files at "
                        "450-500 px, 24 classes x 100 train) instead of the smooth ~33 KB one")
    if packed:
        p.add_argument("--packed", default=None, metavar="DIR",
                       help="its packed twin (packed there on first use; default: a cache folder "
                            "keyed by --data)")


# Path prefixes of this machine -> how they appear in output and results (longest match wins).
_LABELS: Dict[str, str] = {}


def label_path(path: str, label: str) -> None:
    """Show `path` (and everything under it) as `label` in titles, results and reports."""
    _LABELS[os.path.abspath(path)] = label


def show(path: str) -> str:
    """`path` as it may appear in a results file: a label plus the part below it, never an
    absolute path of this machine (the data root's own path means nothing elsewhere)."""
    p = os.path.abspath(path)
    for prefix, label in sorted(_default_labels().items(), key=lambda kv: -len(kv[0])):
        if p == prefix or p.startswith(prefix + os.sep):
            rest = os.path.relpath(p, prefix).replace(os.sep, "/")
            return label if rest == "." else label + "/" + rest
    return "<path>/" + os.path.basename(p) if os.path.isabs(path) else path


def _default_labels() -> Dict[str, str]:
    out = {DEFAULT_CACHE: "<cache>", ROOT: "."}
    out[os.path.join(DEFAULT_CACHE, "sample")] = "<sample set>"
    out[os.path.join(DEFAULT_CACHE, "sample-imagenet-like")] = "<sample set, imagenet-like>"
    out.update(_LABELS)
    return out


def scrub(text: str) -> str:
    """`text` (a captured table, an error) with this machine's paths replaced by labels: the
    labelled folders, the repository (made relative), the interpreter's prefix, the home and
    temporary folders."""
    pairs = dict(_default_labels())
    pairs[ROOT] = "."
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        pairs.setdefault(prefix, "<python>")
    pairs.setdefault(tempfile.gettempdir(), "<tmp>")
    pairs.setdefault(os.path.expanduser("~"), "~")
    for prefix, label in sorted(pairs.items(), key=lambda kv: -len(kv[0])):
        if len(prefix) > 1:
            text = text.replace(prefix, label)
    return text


def sample_data(data: Optional[str] = None, packed: Optional[str] = None,
                need_packed: bool = True, imagenet_like: bool = False) -> Tuple[str, Optional[str]]:
    """(raw root, packed root): the given folders, or the default sample set, made once.
    Given folders are labelled "<data>" and "<packed>" in output (see show())."""
    if data is not None:
        label_path(data, "<data>")
    if packed is not None:
        label_path(packed, "<packed>")
    if data is None:
        data = os.path.join(DEFAULT_CACHE, "sample-imagenet-like" if imagenet_like else "sample")
        if not os.path.exists(os.path.join(data, "val")):
            from engine.data.sample import make_sample_imagenet

            log("making the sample set in %s" % data)
            if imagenet_like:  # enough for 8 ranks x batch 256 in bench_node
                make_sample_imagenet(data, classes=24, train_per_class=100, val_per_class=10,
                                     imagenet_like=True)
            else:
                make_sample_imagenet(data)
    if need_packed:
        packed = packed or os.path.join(DEFAULT_CACHE, "packed-" + _tag(data))
        if not os.path.exists(os.path.join(packed, "val", "meta.json")):
            from engine.data.pack import pack_imagenet

            log("packing %s into %s" % (data, packed))
            pack_imagenet(data, packed, progress=False, log=log, shard_size=500)
    return data, packed


def restart_pack(data: str, packed: str, splits: Sequence[str] = ("train",)) -> str:
    """The `splits` of `data` packed with --restart-markers, beside the plain pack `packed`
    (made once: <packed>-restarts)."""
    packed = os.path.normpath(packed) + "-restarts"
    if not all(os.path.exists(os.path.join(packed, s, "meta.json")) for s in splits):
        from engine.data.pack import pack_imagenet

        log("packing %s with restart markers into %s" % (show(data), show(packed)))
        pack_imagenet(data, packed, splits=list(splits), progress=False, log=log, shard_size=500,
                      restart_markers=True)
    return packed


def _tag(path: str) -> str:
    import hashlib

    return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]


def image_files(split_dir: str) -> List[str]:
    from engine.data.folder import scan_split

    return [os.path.join(split_dir, rel) for rel, _ in scan_split(split_dir)]


def mean_file_kb(paths: Sequence[str]) -> float:
    return sum(os.path.getsize(p) for p in paths) / max(1, len(paths)) / 1e3


def read_all(paths: Sequence[str]) -> List[bytes]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(f.read())
    return out


def rate(fn: Callable[[], int], repeats: int = 5, min_seconds: float = 0.0) -> Tuple[float, List[float]]:
    """Median items/s of fn() (which returns how many items it processed) over repeats."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        while time.perf_counter() - t0 < min_seconds:
            n += fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def proc_cpu(pid: int) -> float:
    """CPU seconds a process has used, all its threads: their run time in nanoseconds from
    /proc/<pid>/task/*/schedstat where Linux has it (psutil's figure counts 10 ms clock ticks,
    too coarse for a few hundred images), else psutil's; 0.0 for a process that is gone."""
    try:
        total = 0
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001 - psutil missing or the process gone
        return 0.0


def tree_pids() -> List[int]:
    """This process and all its descendants (a loader's workers, a DataLoader's)."""
    import psutil

    me = psutil.Process()
    return [me.pid] + [c.pid for c in me.children(recursive=True)]


def tree_cpu(pids: Optional[Sequence[int]] = None) -> float:
    """CPU seconds used so far by `pids` (default: this process and its descendants now)."""
    return sum(proc_cpu(p) for p in (tree_pids() if pids is None else pids))


def settle(pids: Optional[Sequence[int]] = None, quiet_s: float = 0.2,
           limit_s: float = 5.0) -> None:
    """Wait until the processes use (almost) no CPU for quiet_s: a loader's prefetch ring is
    full again, so work counted up to now is the work for the batches consumed."""
    t_end = time.monotonic() + limit_s
    last = tree_cpu(pids)
    while time.monotonic() < t_end:
        time.sleep(quiet_s)
        now = tree_cpu(pids)
        if now - last < 0.02 * quiet_s:
            return
        last = now


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, Any]:
    """What a figure was measured on: CPU model, cores, memory, OS (no host name or path)."""
    info: Dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(), "physical_cores": None,
                            "usable_cores": None, "memory_gb": None,
                            "os": "%s %s %s" % (platform.system(), platform.release(),
                                                platform.machine())}
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    try:
        from engine.data.cpus import usable_cores

        info["usable_cores"] = usable_cores()  # affinity and container quota
    except ImportError:
        pass
    return info


def describe_machine(info: Dict[str, Any]) -> str:
    """One line from machine_info(): 'AMD EPYC, 2 cores (2 physical), 23.4 GB'."""
    if not isinstance(info, dict):  # a results file from before machine_info() existed
        return str(info)
    cores = "%s cores" % info.get("cores", "?")
    if info.get("physical_cores"):
        cores += " (%s physical)" % info["physical_cores"]
    if info.get("usable_cores") and info.get("usable_cores") != info.get("cores"):
        cores += ", %s usable" % info["usable_cores"]
    parts = [info.get("cpu") or "?", cores]
    if info.get("memory_gb"):
        parts.append("%s GB" % info["memory_gb"])
    return ", ".join(parts)


def machine() -> str:
    return describe_machine(machine_info())


def git_info() -> Dict[str, Any]:
    """{"commit": HEAD's sha or None, "dirty": whether tracked files differ from it}.

    Untracked files do not count: results written by this very run, or a virtual environment
    linked into the checkout, are not changes to the code being measured."""
    def git(*args: str) -> Optional[str]:
        try:
            r = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                               timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip() if commit else None,
            "dirty": None if status is None else bool(status.strip())}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(rows: List[Sequence], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        return "%.2f" % c if abs(c) < 10 else "%.0f" % c
    return str(c)


def num(v: Any) -> str:
    """A figure as a markdown cell: thousands separators, 2-3 significant digits, '-' for none."""
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
    return md_escape(str(v))


def md_escape(text: str) -> str:
    """Text for markdown: the "<sample set>"-style labels would otherwise be read as HTML tags
    and vanish from the rendered page."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is zero."""
    return a / b if a is not None and b else None


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """A markdown table: first column left-aligned, figures right-aligned."""
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(num(c) for c in r) + " |" for r in rows]
    return out


def finish(rows, header, result: Dict, title: str) -> None:
    """Print the human table, then the JSON object as the very last line."""
    print("%s\nmachine: %s" % (title, machine()))
    print(table(rows, header))
    print(json.dumps(result, sort_keys=True), flush=True)
