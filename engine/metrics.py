"""What a run reports: meters, throughput/data-wait timing, metrics.jsonl (append-only, read back
one record per step), the curves PNG, and the lines of a batch job's log.

Nothing here knows about ranks: the trainer builds these with `enabled=is_main` so that only
rank 0 touches the file system, and everything else is the same on all ranks.
"""
from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from engine.atomic import atomic_write
from engine.errors import disk_error_message


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
        self.nonfinite = 0  # losses that were not finite on steps whose update went ahead

    def update(self, loss: float, skipped: bool = False) -> None:
        loss = float(loss)
        if math.isfinite(loss):
            self.sum += loss
            self.finite += 1
        elif not skipped:
            self.nonfinite += 1
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
    """Append-only JSON-lines file: one record per log interval ("train"), eval ("eval", "eval_ema")
    and run event ("start", "resume", "stop"); nothing ever rewrites or shortens it.

    Every record carries the wall-clock `time` (Unix seconds) it was written at. A record is
    written whole or not at all: the line goes out in one write() to a file opened for appending,
    and a short write (a disk filling up mid-line) is cut back to where the line began. A torn last
    line left by an earlier process that was killed mid-write is ended with a newline before the
    first record of this one, so it stays a line of its own that readers skip. A write that fails
    (full disk, quota, a read-only or vanished folder) costs the record and one warning line, never
    the run: `write` returns False, and a note says so when records are written again. Disabled
    instances (ranks != 0) write nothing.
    """

    def __init__(self, path: str, enabled: bool = True,
                 warn: Optional[Callable[[str], None]] = None):
        self.path = path
        self.enabled = enabled
        self.warn = warn or _stderr
        self.dropped = 0          # records lost since the last write that succeeded
        self._tail_checked = False
        if enabled:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError:
                pass  # the first write says what is wrong, once

    def write(self, record: Dict[str, Any]) -> bool:
        """Append `record` (with its `time`); False when it could not be written."""
        if not self.enabled:
            return False
        record = dict(record)
        record.setdefault("time", round(time.time(), 3))
        line = (json.dumps(_finite(record), sort_keys=True) + "\n").encode()
        try:
            self._append(line)
        except OSError as exc:
            if not self.dropped:
                self.warn("warning: %s; training goes on, but its metrics records are lost "
                          "until they can be written again"
                          % " ".join(disk_error_message(exc, self.path).split("; ")[:1]))
            self.dropped += 1
            return False
        if self.dropped:
            self.warn("note: %s is written again (%d record%s lost)"
                      % (self.path, self.dropped, "" if self.dropped == 1 else "s"))
            self.dropped = 0
        return True

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if not self._tail_checked:
                # Only a process that died mid-write leaves a line without its newline: this
                # one cuts its own short writes back.
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                self._tail_checked = True
            try:
                written = os.write(fd, line)
                if written != len(line):  # the disk filled up part-way through the line
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                try:
                    os.ftruncate(fd, size)  # whole or not at all
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _finite(record: Dict[str, Any]) -> Dict[str, Any]:
    # JSON has no nan/inf; write null so every JSON parser reads the file.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """All complete records of a metrics file, as written (torn lines from a crash are skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


# Records that describe a step of the run (one per kind and step once a run is read back), as
# opposed to the events between them.
STEP_KINDS = ("train", "eval")
RESTART_KINDS = ("start", "resume")


def latest_records(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The run's history as one uninterrupted run would have logged it: each step's last record.

    A "resume" at step s (or a "start", at 0) discards the step records past s written before
    it (a run that was killed after its last checkpoint logged steps that the resumed run then
    redoes), and of several records of one kind at one step the last is kept, where it stands.
    Event records (start, resume, stop) are all kept.
    """
    kept: List[Optional[Dict[str, Any]]] = []
    where: Dict[Any, int] = {}
    for r in records:
        kind = str(r.get("kind", ""))
        if kind in RESTART_KINDS:
            at = _step(r)
            for key, i in list(where.items()):
                if key[1] > at:
                    kept[i] = None
                    del where[key]
        elif kind.startswith(STEP_KINDS) and _step(r) is not None:
            key = (kind, _step(r))
            if key in where:
                kept[where[key]] = None
            where[key] = len(kept)
        kept.append(r)
    return [r for r in kept if r is not None]


def _step(record: Dict[str, Any]) -> Any:
    try:
        return int(record.get("step", 0))
    except (TypeError, ValueError):
        return None


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """What every reader of a save dir's metrics.jsonl uses (the curves, the report): the
    complete records (`read_jsonl`), each step once (`latest_records`)."""
    return latest_records(read_jsonl(path))


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


def clock(seconds: float) -> str:
    """A duration as H:MM:SS, with days in front past 24 hours: 1d 02:03:04."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    text = "%d:%02d:%02d" % (h, m, sec)
    return "%dd %02d:%02d:%02d" % (days, h, m, sec) if days else text


def now_text() -> str:
    """The wall-clock time at the head of a log line."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def interval_line(*, step: int, total: int, epoch: int, epochs: int, loss: Optional[float],
                  lr: float, img_s: float, data_wait: float, eta_s: Optional[float]) -> str:
    """One line of a batch job's log, every --print-freq steps (epoch shown 1-based)."""
    return ("%s  epoch %d/%d  step %d/%d  loss %s  lr %.6g  %.1f img/s  data-wait %.0f%%  ETA %s"
            % (now_text(), epoch + 1, epochs, step, total,
               "-" if loss is None else "%.4f" % loss, lr, img_s, 100 * data_wait,
               "-" if eta_s is None else clock(eta_s)))


class Interval(NamedTuple):
    """What `TrainLog.interval` found over all ranks: the mean loss (None: no finite one), the
    sum of the ranks' stop codes, and how many of the ranks' losses were not finite."""

    loss: Optional[float]
    stop: float
    nonfinite: int


class TrainLog:
    """Everything the training loop reports, per log interval: losses read in one batch (reading
    a device loss synchronises, so they are read only at log time or before a checkpoint),
    images/s and data-wait, a metrics.jsonl record, a log line and the progress bar.

    `reduce` sums a small vector over the ranks (the trainer passes dist.all_reduce_sum): every
    rank calls `interval` at the same steps, so the collectives pair up. Each interval makes two:
    the loss sums, then the stop codes and non-finite loss counts that every rank must act on
    together (a signal, a divergence). Lines go to stdout on rank 0, with or without the bar.
    """

    def __init__(self, path: str, *, enabled: bool, start: int, total: int,
                 world_size: int, reduce, progress: bool, description: str = "",
                 tensorboard: bool = False, epochs: int = 1):
        from tqdm import tqdm

        self.enabled = enabled
        self.log = MetricsLog(path, enabled=enabled, warn=self._warn)
        self.tb = None
        if tensorboard:  # the same records as TensorBoard events beside metrics.jsonl
            from engine.tensorboard import TensorBoardSink

            # TensorBoard hides the earlier points from `start` on, as latest_records() does
            self.tb = TensorBoardSink(os.path.join(os.path.dirname(os.path.abspath(path)), "tb"),
                                      enabled=enabled, purge_step=start)
        self.world_size = world_size
        self.reduce = reduce
        self.start, self.total, self.epochs = start, total, epochs
        self.meter, self.timer = LossMeter(), StepTimer()
        self.pending: List[Any] = []  # (step, device loss, update skipped) not read yet
        self.last_loss: Optional[float] = None
        self.last_finite: Optional[Tuple[int, float]] = None   # this rank's (step, loss)
        self.first_nonfinite: Optional[Tuple[int, float]] = None
        self.throughput: List[float] = []
        self.t0: Optional[float] = None  # when the first step of this process began
        self.bar = tqdm(total=total, initial=min(start, total), unit="step", dynamic_ncols=True,
                        disable=not (enabled and progress), desc=description)

    # ---- lines ----
    def say(self, line: str) -> None:
        """A line of the run's log (rank 0, stdout), printed above the bar when there is one."""
        if self.enabled:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def _warn(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    # ---- steps ----
    def before_data(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()
        self.timer.before_data()

    def after_data(self, n_images: int) -> None:
        self.timer.after_data(n_images * self.world_size)  # img/s counts every rank's images

    def add(self, loss: Any, skipped: bool, step: Optional[int] = None) -> None:
        """Step `step` (0-based) ended with `loss` (a device tensor, read later)."""
        self.pending.append((step, loss, skipped))
        self.bar.update(1)

    def read_pending(self) -> None:
        """Read the losses not read yet (a host sync) into the interval's meter, noting this
        rank's last finite loss and first non-finite one."""
        for step, loss, skipped in self.pending:
            value = float(loss.item())
            self.meter.update(value, skipped)
            if math.isfinite(value):
                self.last_finite = (step, value) if step is not None else self.last_finite
            elif not skipped and self.first_nonfinite is None and step is not None:
                self.first_nonfinite = (step, value)
        self.pending.clear()

    def interval(self, step: int, epoch: int, lr: float, stop: float = 0.0) -> Interval:
        """Close the log interval that ends after `step` steps (every rank, the same steps);
        `stop` is this rank's stop code, summed over the ranks in the result."""
        self.read_pending()  # the sync point: the interval's timing is exact
        speed = self.timer.read()
        # Mean over all ranks' finite steps; data_wait is this rank's share of the interval
        # spent blocked on the loader.
        summary = interval_summary(self.reduce(self.meter.local()), self.world_size)
        agreed = self.reduce([float(stop), float(self.meter.nonfinite)])
        self.last_loss = summary["loss"]
        self.throughput.append(speed["img_s"])
        self._write({"kind": "train", "epoch": epoch, "step": step, "loss": self.last_loss,
                     "skipped": summary["skipped"], "lr": lr, "img_s": speed["img_s"],
                     "data_wait": speed["data_wait"]})
        self.bar.set_postfix(loss="-" if self.last_loss is None else "%.4f" % self.last_loss,
                             lr="%.5f" % lr, img_s="%.1f" % speed["img_s"],
                             wait="%.0f%%" % (100 * speed["data_wait"]))
        done_here = step - self.start
        eta = None
        if self.t0 is not None and done_here > 0:
            eta = (self.total - step) * (time.perf_counter() - self.t0) / done_here
        self.say(interval_line(step=step, total=self.total, epoch=epoch, epochs=self.epochs,
                               loss=self.last_loss, lr=lr, img_s=speed["img_s"],
                               data_wait=speed["data_wait"], eta_s=eta))
        self.meter.reset()
        self.timer.start_interval()
        return Interval(self.last_loss, float(agreed[0]), int(round(float(agreed[1]))))

    def eval(self, step: int, epoch: int, result: Dict[str, float], name: str = "") -> None:
        self._write({"kind": "eval" + ("_" + name if name else ""), "epoch": epoch,
                     "step": step, **result})
        self.say("%s  epoch %d/%d  %sval top1 %.3f  top5 %.3f  loss %.4f  (%d images)"
                 % (now_text(), epoch + 1, self.epochs, name + " " if name else "",
                    result["top1"], result["top5"], result["loss"], result["images"]))

    def epoch_done(self, epoch: int, seconds: float, eval_seconds: float) -> None:
        """The epoch's elapsed time (the part of it this process ran), at its end."""
        self.say("%s  epoch %d/%d done in %s (eval %s)"
                 % (now_text(), epoch + 1, self.epochs, clock(seconds), clock(eval_seconds)))

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """A run event in metrics.jsonl: start, resume (where, from what), stop (why)."""
        self.log.write({"kind": kind, "step": step, **fields})

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
