"""Shared benchmark plumbing: the data set, repeated timing, the table and the JSON last line."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


def sample_data(data: Optional[str] = None, packed: Optional[str] = None,
                need_packed: bool = True, imagenet_like: bool = False) -> Tuple[str, Optional[str]]:
    """(raw root, packed root): the given folders, or the default sample set, made once."""
    if data is None:
        data = os.path.join(DEFAULT_CACHE, "sample-imagenet-like" if imagenet_like else "sample")
        if not os.path.exists(os.path.join(data, "val")):
            from engine.sample import make_sample_imagenet

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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    try:
        import psutil

        cores = "%d cores (%d physical)" % (psutil.cpu_count(), psutil.cpu_count(logical=False))
    except ImportError:
        cores = "%d cores" % os.cpu_count()
    return "%s, %s, %s" % (platform.node(), cpu_name(), cores)


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


def finish(rows, header, result: Dict, title: str) -> None:
    """Print the human table, then the JSON object as the very last line."""
    print("%s\nmachine: %s" % (title, machine()))
    print(table(rows, header))
    print(json.dumps(result, sort_keys=True), flush=True)
