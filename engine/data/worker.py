"""The decoding side of the Loader: the batch ring's layout and what one worker process runs.

The ring is one anonymous shared mapping of `slots` batch slots, each sized for the largest
output side; a slot holds uint8 images [batch_size, 3, S, S] followed by int32 labels. A worker
receives tasks (global batch, epoch, slot, start row, sample indices, side S) down its own pipe,
reads and decodes the samples into rows start.. of that slot, and replies
(global batch, replacements, error). Only these small tuples cross the pipe; pixels never do.
"""
from __future__ import annotations

import gc
import mmap
import os
import traceback
import weakref
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from engine.data.decode import DecodeError
from engine.data.forking import ignore_stop_signals
from engine.data.sources import Source
from engine.data.transforms import Transform
from engine.errors import DataError, UserError

__all__ = ["MAX_REPLACEMENTS", "Replacement", "Task", "RingLayout", "fill", "worker_main"]

# A failed record is replaced by the next index; give up after this many in a row (a split
# that is mostly corrupt is a packing problem, not something to paper over).
MAX_REPLACEMENTS = 16

# (index, path, reason) of a record that failed to decode (replaced by the next one, or skipped)
Replacement = Tuple[int, str, str]
# (global batch, epoch, slot, first row, sample indices, output side)
Task = Tuple[int, int, int, int, np.ndarray, int]


class RingLayout:
    """Where each slot's images and labels sit in the ring's shared mapping."""

    __slots__ = ("slots", "batch_size", "max_side")

    def __init__(self, slots: int, batch_size: int, max_side: int):
        self.slots, self.batch_size, self.max_side = slots, batch_size, max_side

    @property
    def slot_bytes(self) -> int:
        return self.batch_size * (3 * self.max_side * self.max_side + 4)

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    def allocate(self) -> mmap.mmap:
        """The ring: MAP_SHARED | MAP_ANONYMOUS, shared with forked workers, invisible to the
        file system. Never close it explicitly: numpy views keep the mmap object alive, and
        closing it under a view the caller kept would turn a later read into a segfault."""
        return mmap.mmap(-1, self.nbytes)

    def arrays(self, buf: mmap.mmap, slot: int, side: int) -> Tuple[np.ndarray, np.ndarray]:
        """(images uint8 [B, 3, side, side], labels int32 [B]) of one slot, for any side up to
        max_side: a smaller batch uses the slot's first bytes, so a resolution change needs no
        new memory and no new workers."""
        bs, M = self.batch_size, self.max_side
        base = slot * self.slot_bytes
        images: np.ndarray = np.ndarray((bs, 3, side, side), np.uint8, buf, base)
        labels: np.ndarray = np.ndarray((bs,), np.int32, buf, base + bs * 3 * M * M)
        return images, labels

    def hand_out(self, buf: mmap.mmap, slot: int, side: int, size: int
                 ) -> Tuple[np.ndarray, np.ndarray, "weakref.ref[np.ndarray]"]:
        """Read-only (images [size, 3, side, side], labels [size]) of one slot for the caller,
        and a weak reference that is alive while any array made from them is.

        Both arrays are views of one fresh read-only array over the slot (the anchor). numpy
        points every view of a view at the first array whose own base is not an array, so any
        slice or reshape the caller makes keeps the anchor alive: the loader can tell, when the
        slot is refilled, that the caller still holds something of it."""
        bs, M = self.batch_size, self.max_side
        # Over a read-only memoryview (frombuffer keeps it as the base), so that no view can be
        # made writable again.
        anchor = np.frombuffer(memoryview(buf).toreadonly(), np.uint8, self.slot_bytes,
                               slot * self.slot_bytes)
        images = anchor[:bs * 3 * side * side].reshape(bs, 3, side, side)[:size]
        at = bs * 3 * M * M
        labels = anchor[at:at + 4 * bs].view(np.int32)[:size]
        return images, labels, weakref.ref(anchor)


def fill(source: Source, decoder: Transform, indices: np.ndarray, epoch: int, images: np.ndarray,
         labels: np.ndarray, skip: bool = False) -> List[Replacement]:
    """Decode samples into (images, labels); returns the records that failed to decode.

    A failed record is replaced by its successor, or, with `skip`, left out: its row is not
    written and the caller drops the rows of the returned indices (an evaluation must score each
    image once, not a stand-in twice)."""
    n = len(source)
    failures: List[Replacement] = []
    for j, idx in enumerate(indices):
        idx = int(idx)
        if skip:
            data, label, path, size = source.read(idx)
            try:
                decoder(data, idx, epoch, images[j], size)
                labels[j] = label
            except DecodeError as exc:
                failures.append((idx, path, str(exc)))
            continue
        for attempt in range(MAX_REPLACEMENTS):
            cur = (idx + attempt) % n
            data, label, path, size = source.read(cur)
            try:
                decoder(data, cur, epoch, images[j], size)
                labels[j] = label
                break
            except DecodeError as exc:
                failures.append((cur, path, str(exc)))
        else:
            raise DataError("%d consecutive records from index %d failed to decode (last: %s: %s);"
                            " the data is damaged: check it with tools/verify_pack.py or repack it"
                            % (MAX_REPLACEMENTS, idx, failures[-1][1], failures[-1][2]))
    return failures


def _run(wid: int, task: Task, source: Source, decoder: Transform, buf: mmap.mmap,
         layout: RingLayout, skip: bool = False
         ) -> Tuple[int, List[Replacement], Union[None, UserError, str]]:
    """One task -> (global batch, replacements, error): error is None, a UserError to re-raise
    as is in the main process, or a bug's traceback for it to raise."""
    global_batch, epoch, slot, start, indices, side = task
    stop = start + len(indices)
    images, labels = layout.arrays(buf, slot, side)
    try:
        return global_batch, fill(source, decoder, indices, epoch, images[start:stop],
                                  labels[start:stop], skip), None
    except UserError as exc:  # the user's to fix
        return global_batch, [], exc
    except Exception:  # noqa: BLE001 - a bug: the main process raises it with this traceback
        return global_batch, [], "loader worker %d: %s" % (wid, traceback.format_exc())


def worker_main(wid: int, conn: Any, source: Source, decoder: Transform, buf: mmap.mmap,
                layout: RingLayout, skip: bool = False) -> None:
    """A worker process: run tasks from `conn` until it sends None, closes, or the main process
    dies."""
    # Ctrl-C goes to the whole process group, and a scheduler's stop signals (SIGTERM, SIGUSR1)
    # to every process of the job: the main process decides and tells us to stop.
    ignore_stop_signals()
    # The parent's heap is shared copy-on-write; keep this process's collector off it, or every
    # collection would touch (and so copy) the pages of millions of long-lived objects.
    gc.freeze()
    parent = os.getppid()
    while True:
        try:
            if not conn.poll(1.0):
                if os.getppid() != parent:  # the main process died: don't linger as an orphan
                    return
                continue
            task: Optional[Task] = conn.recv()
        except (EOFError, OSError):  # the main process closed our pipe
            return
        if task is None:
            return
        try:
            conn.send(_run(wid, task, source, decoder, buf, layout, skip))
        except (BrokenPipeError, OSError):
            return
