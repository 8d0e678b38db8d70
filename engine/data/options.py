"""How a Loader runs: its worker count, ring size, stall timeout, decoder choice and whether it
hands out copies, grouped in one frozen, checked value. None of them changes a batch's values:
they trade memory, processes and latency, never pixels or order."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from engine.errors import ConfigError

__all__ = ["LoaderOptions", "DEFAULT_SLOTS", "DEFAULT_TIMEOUT_S", "check_int"]

DEFAULT_SLOTS = 4
DEFAULT_TIMEOUT_S = 120.0


def check_int(name: str, value: Any, low: int, hint: str = "") -> None:
    """Refuse anything but an integer >= low (a bool is not a count), naming the argument."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ConfigError("Loader: %s must be an integer >= %d (got %r)%s"
                          % (name, low, value, hint))


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How a Loader runs, never what it yields: the batches are the same whatever these are.

    Pass one as `Loader(..., options=LoaderOptions(...))`, or give the same names as keywords
    to the Loader, which fill in (and override) `options`. Each value is checked here, before
    any file is opened or process started.

    Attributes:
        workers: decoding processes; None = max(1, usable cores // local_world_size - 1)
            (see engine.data.cpus), 0 = decode in this process.
        local_world_size: loaders sharing this machine (one per GPU process): sizes the
            default worker count.
        slots: batches in the shared ring (>= 2: one held by the caller, the rest filling);
            shared memory = slots x batch bytes, whatever the worker count.
        persistent_workers: keep the workers and the ring between epochs (True), or start
            them for each pass and release them at its end (False: for an eval loader that
            runs once an epoch and should hold nothing in between).
        timeout: seconds a worker may work on one chunk of a batch before it is reported as
            stalled (stopped, or stuck in a read), naming the worker.
        use_roi: use the compiled decoder when it is built: only the crop window is decoded
            for training, and val decodes skip PyTurboJPEG's per-call overhead (same pixels).
        copy: hand out each batch as arrays of its own (writable, valid for ever) instead of
            read-only views into the ring (valid until the next batch is requested): for a
            caller that keeps batches. Costs one copy of every batch.
    """

    workers: Optional[int] = None
    local_world_size: int = 1
    slots: int = DEFAULT_SLOTS
    persistent_workers: bool = True
    timeout: float = DEFAULT_TIMEOUT_S
    use_roi: bool = True
    copy: bool = False

    def __post_init__(self) -> None:
        check_int("local_world_size", self.local_world_size, 1)
        check_int("slots", self.slots, 2, " (one slot is held by the caller while the next fills)")
        if self.workers is not None and (not isinstance(self.workers, (int, np.integer))
                                         or self.workers < 0):
            raise ConfigError("Loader: workers must be an integer >= 0 (0 decodes in this "
                              "process; got %r)" % (self.workers,))
        if not self.timeout > 0:
            raise ConfigError("Loader: timeout must be > 0 seconds (got %r)" % (self.timeout,))

    def updated(self, **knobs: Any) -> "LoaderOptions":
        """A copy with these fields replaced (and checked); an unknown name is a TypeError, as
        an unknown keyword argument is."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(knobs) - set(names))
        if unknown:
            raise TypeError("Loader() got an unexpected keyword argument %r (its options are %s)"
                            % (unknown[0], ", ".join(names)))
        return dataclasses.replace(self, **knobs) if knobs else self
