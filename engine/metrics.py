"""What a run reports: meters, throughput/data-wait timing, metrics.jsonl, the curves PNG.

Nothing here knows about ranks: the trainer builds these with `enabled=is_main` so that only
rank 0 touches the file system, and everything else is the same on all ranks.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional

from engine.atomic import atomic_write


class LossMeter:
    """Training loss over one log interval, in the form that sums across ranks.

    Keeps the sum and count of the finite losses only: one overflowing AMP step (loss inf or
    nan) must not turn the interval's mean into nan. Steps whose update was skipped for a
    gradient overflow are counted separately. `local()` is this rank's
    [loss_sum, finite_steps, skipped_steps]; the trainer all-reduces it and reads the result
    with `interval_summary`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum = 0.0
        self.finite = 0
        self.skipped = 0

    def update(self, loss: float, skipped: bool = False) -> None:
        loss = float(loss)
        if math.isfinite(loss):
            self.sum += loss
            self.finite += 1
        if skipped:
            self.skipped += 1

    def local(self) -> List[float]:
        return [self.sum, float(self.finite), float(self.skipped)]


def interval_summary(totals: Iterable[float], world_size: int) -> Dict[str, Any]:
    """{"loss", "skipped"} from LossMeter.local() vectors summed over `world_size` ranks.

    loss: mean over every rank's finite steps (None when there were none). skipped: steps
    whose update was dropped. Every rank drops the same steps (the overflow check runs on the
    all-reduced gradients), so the rank sum is divided by the world size.
    """
    loss_sum, finite, skipped = (float(v) for v in totals)
    return {"loss": loss_sum / finite if finite else None,
            "skipped": int(round(skipped / max(1, world_size)))}


class StepTimer:
    """Splits wall time into waiting for the loader vs everything else, per log interval.

    `data_wait` is the fraction of the interval spent blocked in `next(loader)`: near 0 means the
    input pipeline keeps up; near 1 means the GPU starves. Because device work is asynchronous,
    the interval only ends at a host sync (reading the loss), which the trainer does at log time,
    so images/s is exact over an interval even though individual steps are not timed.
    """

    def __init__(self) -> None:
        self.start_interval()

    def start_interval(self) -> None:
        self.t0 = time.perf_counter()
        self.wait = 0.0
        self.images = 0
        self._mark: Optional[float] = None

    def before_data(self) -> None:
        self._mark = time.perf_counter()

    def after_data(self, n_images: int) -> None:
        if self._mark is not None:
            self.wait += time.perf_counter() - self._mark
            self._mark = None
        self.images += n_images

    def read(self) -> Dict[str, float]:
        """{"img_s", "data_wait", "seconds"} for the interval so far (call after a sync)."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"img_s": self.images / dt, "data_wait": min(self.wait / dt, 1.0), "seconds": dt}


class MetricsLog:
    """Append-only JSON-lines file: one record per log interval ("train") or eval ("eval").

    Each line is flushed as written, so a crash loses at most the line in progress, and a
    reader (a plot, a dashboard) can follow the file live. Disabled instances (ranks != 0)
    write nothing.
    """

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_finite(record), sort_keys=True) + "\n")

    def drop_after(self, step: int) -> None:
        """On resume: forget records past the checkpoint, which the resumed run will redo."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write(self.path, lambda f: f.write(text.encode()))


def _finite(record: Dict[str, Any]) -> Dict[str, Any]:
    # JSON has no nan/inf; write null so every JSON parser reads the file.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a crash is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


#: What a run says, once, when it cannot draw curves.png.
PLOT_HINT = ("curves.png is not drawn: it needs matplotlib (pip install matplotlib, or pip "
             "install -e .[plot]); metrics.jsonl holds the same figures")
_plot_noted = False


def curves_figure(records: Iterable[Dict[str, Any]], title: str = ""):
    """The figure of plot_curves: training loss and LR per step, and val top-1/top-5 of the live
    weights and of the EMA (when the run kept one) by the epoch metrics.jsonl records.

    A series of a few points is drawn with markers, so a one-point series (a one-epoch run, the
    first record of a run) shows. Returns a matplotlib Figure (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]

    def style(n: int) -> Dict[str, Any]:
        return {"marker": "o", "markersize": 3} if n <= 50 else {}

    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_acc = fig.subplots(1, 3)

    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1,
                 **style(len(train)))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss")
    ax_loss.grid(alpha=0.3)

    lrs = [r for r in train if r.get("lr") is not None]
    ax_lr.plot([r["step"] for r in lrs], [r["lr"] for r in lrs], lw=1, color="tab:orange",
               **style(len(lrs)))
    if lrs and all(r["lr"] > 0 for r in lrs):
        ax_lr.set_yscale("log")  # step decays by 10x read as equal steps
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)

    for kind, name, dash in (("eval", "", "-"), ("eval_ema", " (EMA)", "--")):
        evals = [r for r in records if r.get("kind") == kind and r.get("top1") is not None]
        if not evals:
            continue
        ep = [r["epoch"] for r in evals]  # the same numbers as metrics.jsonl
        ax_acc.plot(ep, [r["top1"] for r in evals], "o" + dash, color="tab:blue",
                    label="top-1" + name)
        ax_acc.plot(ep, [r["top5"] for r in evals], "s" + dash, color="tab:green",
                    label="top-5" + name)
    if ax_acc.lines:
        ax_acc.legend()
    ax_acc.set_xlabel("epoch (as in metrics.jsonl)")
    ax_acc.set_ylabel("val accuracy (%)")
    ax_acc.grid(alpha=0.3)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(records: Iterable[Dict[str, Any]], png_path: str,
                title: str = "") -> Optional[str]:
    """Write curves_figure(records) as a PNG, atomically (never a half-written image); returns
    its path, or None where matplotlib is missing (or fails on import): the plot is optional,
    so a run goes on, and says so once per process (PLOT_HINT).

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
    headless and never disturbs a caller's interactive backend.
    """
    global _plot_noted
    try:
        import matplotlib.backends.backend_agg  # noqa: F401  (what curves_figure draws with)
        import matplotlib.figure  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing, or an install that fails on import
        if not _plot_noted:
            _plot_noted = True
            missing = isinstance(exc, ModuleNotFoundError) and \
                (exc.name or "").split(".")[0] == "matplotlib"
            detail = "" if missing else " (%s: %s)" % (
                type(exc).__name__, " ".join(str(exc).split())[:200])
            print("note: %s%s" % (PLOT_HINT, detail), file=sys.stderr)
        return None
    fig = curves_figure(records, title)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    return png_path


class TrainLog:
    """Everything the training loop reports, per log interval: losses read in one batch (reading
    a device loss synchronises, so they are read only at log time), images/s and data-wait,
    a metrics.jsonl record and the progress bar. `reduce` sums a small vector over the ranks
    (the trainer passes dist.all_reduce_sum): every rank calls `interval` at the same
    steps, so the collectives pair up."""

    def __init__(self, path: str, *, enabled: bool, start: int, total: int,
                 world_size: int, reduce, progress: bool, description: str = "",
                 tensorboard: bool = False):
        from tqdm import tqdm

        self.log = MetricsLog(path, enabled=enabled)
        self.log.drop_after(start)  # records past the checkpoint are about to be redone
        self.tb = None
        if tensorboard:  # the same records as TensorBoard events beside metrics.jsonl
            from engine.tensorboard import TensorBoardSink

            self.tb = TensorBoardSink(os.path.join(os.path.dirname(os.path.abspath(path)), "tb"),
                                      enabled=enabled, purge_step=start)
        self.world_size = world_size
        self.reduce = reduce
        self.meter, self.timer = LossMeter(), StepTimer()
        self.pending: List[Any] = []  # (device loss, update skipped) not read yet
        self.last_loss: Optional[float] = None
        self.throughput: List[float] = []
        self.bar = tqdm(total=total, initial=min(start, total), unit="step", dynamic_ncols=True,
                        disable=not (enabled and progress), desc=description)

    def before_data(self) -> None:
        self.timer.before_data()

    def after_data(self, n_images: int) -> None:
        self.timer.after_data(n_images * self.world_size)  # img/s counts every rank's images

    def add(self, loss: Any, skipped: bool) -> None:
        self.pending.append((loss, skipped))
        self.bar.update(1)

    def interval(self, step: int, epoch: int, lr: float) -> None:
        for loss, skipped in self.pending:  # the sync point: the interval's timing is exact
            self.meter.update(float(loss.item()), skipped)
        self.pending.clear()
        speed = self.timer.read()
        # Mean over all ranks' finite steps; data_wait is this rank's share of the interval
        # spent blocked on the loader.
        summary = interval_summary(self.reduce(self.meter.local()), self.world_size)
        self.last_loss = summary["loss"]
        self.throughput.append(speed["img_s"])
        self._write({"kind": "train", "epoch": epoch, "step": step, "loss": self.last_loss,
                     "skipped": summary["skipped"], "lr": lr, "img_s": speed["img_s"],
                     "data_wait": speed["data_wait"]})
        self.bar.set_postfix(loss="-" if self.last_loss is None else "%.4f" % self.last_loss,
                             lr="%.5f" % lr, img_s="%.1f" % speed["img_s"],
                             wait="%.0f%%" % (100 * speed["data_wait"]))
        self.meter.reset()
        self.timer.start_interval()

    def eval(self, step: int, epoch: int, result: Dict[str, float], name: str = "") -> None:
        self._write({"kind": "eval" + ("_" + name if name else ""), "epoch": epoch,
                     "step": step, **result})
        if self.log.enabled:
            self.bar.write("epoch %d  %sval top1 %.3f  top5 %.3f  loss %.4f  (%d images)"
                           % (epoch, name + " " if name else "", result["top1"], result["top5"],
                              result["loss"], result["images"]))

    def _write(self, record: Dict[str, Any]) -> None:
        self.log.write(record)
        if self.tb is not None:
            self.tb.write(_finite(record))

    def mean_img_s(self) -> Optional[float]:
        return sum(self.throughput) / len(self.throughput) if self.throughput else None

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
