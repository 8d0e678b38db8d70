"""TensorBoard output for the records that go to metrics.jsonl.

`TensorBoardSink(log_dir).write(record)` takes the same dicts as `MetricsLog.write`
(`{"kind": "train", "step": 120, "loss": 2.31, "lr": 0.1, ...}`) and writes each numeric field as
a scalar tagged `<kind>/<field>` (train/loss, train/lr, eval/top1, ...) at `step`, so the JSON
lines stay the source of truth and TensorBoard is a view of them. tensorboardX is optional: it
is imported only when a sink is enabled, and its absence, or an installation that fails on
import (a protobuf it does not fit), is a one-line ConfigError saying how to install or repair
it. `read_scalars` reads event files back (for tests and tools) without TensorFlow.
"""
from __future__ import annotations

import glob
import itertools
import os
import struct
from typing import Any, Dict, List, Mapping, Optional, Tuple

from engine.errors import ConfigError

INSTALL_HINT = ("TensorBoard logging needs tensorboardX: pip install tensorboardX "
                "(or pip install -e .[tensorboard])")
_NOT_SCALARS = ("kind", "step")
# Event file names hold the creation second and the host only: two sinks opened in the same
# second (a quick resume, two sinks in one process) would write the same file and clobber it.
_SINKS = itertools.count()


def _tensorboardx():
    # TensorBoard output is only ever on because the user asked for it (--tensorboard, off by
    # default), so a tensorboardX that cannot be used is an error, not a warning: a run of days
    # that quietly wrote no events would lose what was asked for. It is a one-line error though,
    # whatever the import raised: a broken install is the user's to fix, not an engine bug.
    try:
        import tensorboardX
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    except Exception as exc:  # e.g. protobuf's TypeError on a version tensorboardX does not fit
        detail = " ".join(("%s: %s" % (type(exc).__name__, exc)).split())
        raise ConfigError(
            "TensorBoard logging is on (--tensorboard), but tensorboardX is installed and fails "
            "on import (%s); repair it (pip install --upgrade tensorboardX protobuf) or run "
            "without --tensorboard" % (detail[:300] + "..." if len(detail) > 300 else detail)
        ) from None
    return tensorboardX


class TensorBoardSink:
    """Scalars from metrics records into `log_dir` (one events file per sink).

    Build it with `enabled=is_main` like MetricsLog: disabled sinks import nothing and write
    nothing. Non-numeric fields (strings, lists, None) are skipped; booleans too. A resumed run
    passes `purge_step` = the step it resumes at, the counterpart of `MetricsLog.drop_after`:
    TensorBoard then hides the earlier run's points from that step on instead of showing both.
    """

    def __init__(self, log_dir: str, enabled: bool = True, flush_secs: int = 30,
                 purge_step: Optional[int] = None):
        self.log_dir = log_dir
        self.enabled = enabled
        self._writer = None
        if enabled:
            tbx = _tensorboardx()
            os.makedirs(log_dir, exist_ok=True)
            suffix = ".%d.%d" % (os.getpid(), next(_SINKS))
            self._writer = tbx.SummaryWriter(logdir=log_dir, flush_secs=flush_secs,
                                             purge_step=purge_step, filename_suffix=suffix)

    def write(self, record: Mapping[str, Any]) -> int:
        """Write one record's numeric fields; returns how many scalars were written."""
        if self._writer is None:
            return 0
        if "step" not in record:
            raise ConfigError("a metrics record needs a 'step' to be plotted; got keys %s"
                              % ", ".join(sorted(record)))
        kind = str(record.get("kind", "train"))
        step = int(record["step"])
        written = 0
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self._writer.add_scalar("%s/%s" % (kind, key), float(value), global_step=step)
            written += 1
        return written

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_scalars(log_dir: str) -> Dict[str, List[Tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every events file in `log_dir`.

    Parses the TFRecord framing (u64 length, u32 crc, payload, u32 crc) and decodes each payload
    with tensorboardX's Event protobuf; CRCs are not verified (a reader for our own files).
    A session START at step s (written for `purge_step`) drops the points read so far at steps
    >= s, as TensorBoard does.
    """
    event_pb2 = _tensorboardx().proto.event_pb2
    files = []
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            events = list(_records(f.read()))
        if events:
            files.append([event_pb2.Event.FromString(e) for e in events])
    # In the order the files were started (their first event's wall time), as TensorBoard reads.
    files.sort(key=lambda events: events[0].wall_time)
    out: Dict[str, List[Tuple[int, float]]] = {}
    for events in files:
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                for tag, points in out.items():
                    out[tag] = [(s, v) for s, v in points if s < event.step]
            for value in event.summary.value:
                v = value.simple_value
                if value.HasField("tensor") and value.tensor.float_val:
                    v = value.tensor.float_val[0]
                out.setdefault(value.tag, []).append((int(event.step), float(v)))
    return out


def _records(data: bytes):
    """Payloads of a TFRecord byte string; a truncated last record (still being written) ends it."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        payload = data[pos + 12:pos + 12 + length]
        if len(payload) < length:
            return
        pos += 12 + length + 4
        yield payload
