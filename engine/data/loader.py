"""Loader: worker processes decode JPEGs straight into a small ring of shared-memory batch slots.

    main process                                   worker processes (N)
    ------------                                   --------------------
    sampler -> batch k gets slot s, cut into        each has its own pipe to the main process;
    chunks; each chunk goes down one worker's  -->  read records (LMDB or files), decode with
    pipe (at most 2 outstanding per worker)         libjpeg-turbo (crop window, DCT-scaled),
                                                    resize, flip, write uint8 CHW into its
    batch k is ready when all its chunks are   <--  rows of slot s, reply (k, chunk, failures)
    back; yield slot s as read-only numpy views,
    no copy, in order

This module is the main-process side: the batch stream and the supervision of the workers.
What a worker runs and the ring's layout are in engine.data.worker, where records come from
(shards or a raw folder) in engine.data.sources, and how a loader runs (LoaderOptions) in
engine.data.options.

Only slot numbers cross process boundaries; pixels never get pickled. Several workers fill one
slot, so the ring stays a few batches (`slots`, default 4) whatever the worker count: shared
memory = slots x batch bytes. The slots live in one anonymous shared mapping that the forked
workers inherit: nothing is created in /dev/shm, and the mapping is freed only when the last
numpy view of it is gone, so a batch kept past `close()` stays readable.

Each worker has its own pipes, so no lock is shared between workers: a worker killed or stopped
at any moment cannot block the others or `close()`. The main process waits on the pipes and the
workers' exit sentinels together, so a dead worker is reported at once, and a worker that makes
no progress for `timeout` seconds (stopped, or stuck in a read) is reported by name.

The pipeline is a stream of global batch numbers (epoch x batches per epoch + batch), so the
next epoch's first batches are already decoding while the current one ends.

A batch is valid until the next one is requested: its slot is refilled from then on. The views
handed out are read-only, so a write into the ring fails instead of corrupting a later batch,
and each batch's views hang off one anchor array the loader holds a weak reference to. When the
caller asks for a batch while one from two batches back in the same pass (whose slot is being
refilled) is still alive, it kept batches (`list(loader)`, appending to a list): the loader warns once
(KeptBatchWarning) with the fix, a copy of what it keeps or `copy=True`. The check is a weak
reference per batch, no copy.
"""
from __future__ import annotations

import collections
import logging
import math
import mmap
import multiprocessing as mp
import time
import warnings
import weakref
from multiprocessing.connection import wait as wait_ready
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np

from engine.data import shards
from engine.data.cpus import default_workers
from engine.data.decode import roi_available
from engine.data.folder import FolderIndex
from engine.data.forking import start_process
from engine.data.options import LoaderOptions, check_int
from engine.data.sampler import Sampler
from engine.data.sources import open_source
from engine.data.transforms import TrainTransform, Transform, ValTransform
from engine.data.worker import Replacement, RingLayout, Task, fill, worker_main
from engine.errors import ConfigError, describe_exit

__all__ = ["Loader", "LoaderOptions", "KeptBatchWarning", "default_workers"]

# Chunks a worker may hold at once: one decoding, one waiting, so it never idles between them.
PER_WORKER = 2

log = logging.getLogger("engine.data")


class KeptBatchWarning(UserWarning):
    """A batch the caller kept is being overwritten by a later one (see Loader)."""


KEPT_BATCH_ADVICE = (
    "a batch from this Loader is still referenced while its shared-memory slot is being refilled "
    "with a later batch: batches are read-only views into the loader's ring, valid only until "
    "the next batch is requested, so a kept batch (list(loader), appending batches to a list) "
    "silently changes to other images and labels. Copy what you keep (np.array(images), or "
    "hand it to the framework: mge.tensor copies), or create the Loader with copy=True")


class _Batch:
    """A batch in flight: its slot, its sample count, its output side and the chunks not yet
    back."""

    __slots__ = ("slot", "size", "side", "remaining", "failures")

    def __init__(self, slot: int, size: int, side: int, chunks: int):
        self.slot, self.size, self.side, self.remaining = slot, size, side, chunks
        self.failures: List[Replacement] = []


class Loader:
    """Batches of (uint8 [N,3,H,W] BGR images, int32 [N] labels) from a packed or raw split.

    Args:
        source: a packed split folder (has meta.json), a raw <split>/<wnid>/*.JPEG folder, or
            a FolderIndex of one (engine.data.folder.index_folder: scan once, share the list).
        batch_size: samples per batch on this rank.
        train: RandomResizedCrop + horizontal flip in a shuffled order (True), or resize the
            shorter side to round(image_size / crop_ratio) + center crop in record order (False).
        image_size: output height and width; or a function epoch -> size (progressive
            resizing), with `max_image_size` its largest value: the ring is sized for that, so
            a resolution change costs neither memory nor a worker restart.
        crop_ratio: val only: the center crop's share of the resized shorter side (0.875 is
            the standard 224/256).
        seed, rank, world_size: the sample order and this rank's share (see Sampler).
        drop_last: drop the last incomplete batch; default True for train, False otherwise.
        skip_undecodable: leave out a record that fails to decode (its batch is then that much
            shorter, possibly empty; `num_skipped` counts them) instead of replacing it by the
            next record (`num_replaced`). Evaluation skips: a replacement would score one image
            twice. Training replaces: every batch keeps its size.
        options: how it runs (workers, slots, timeout, ...): see LoaderOptions. Its fields
            are also accepted as keywords (`Loader(..., workers=4, slots=3)`), over `options`.

    A yielded batch is a pair of read-only views of a shared slot: it stays valid until the next
    batch is requested (later batches reuse the slot), and stays readable after the loader
    closes. Copy it (or hand it to the framework, which copies) before asking for more; a
    caller found keeping batches gets a KeptBatchWarning once. With `copy=True` (an option)
    each batch is a pair of writable arrays of its own instead.
    Iterating runs the current epoch from the current position; when it completes, the epoch
    advances by one. `state_dict()` / `load_state_dict()` resume exactly mid-epoch.
    """

    def __init__(self, source: Union[str, FolderIndex], *, batch_size: int, train: bool,
                 image_size: Union[int, Callable[[int], int]] = 224,
                 max_image_size: Optional[int] = None, crop_ratio: float = 0.875,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: Optional[bool] = None, skip_undecodable: bool = False,
                 options: Optional[LoaderOptions] = None, **knobs: Any):
        # Every cheap check first, before any file is opened or process started.
        opts = (LoaderOptions() if options is None else options).updated(**knobs)
        if callable(image_size):
            if max_image_size is None:
                raise ConfigError("Loader: an image_size schedule needs max_image_size (the "
                                  "largest size it returns: the ring is sized for it)")
            size_at, image_size = image_size, max_image_size
        else:
            size_at = None
        if not 0 < crop_ratio <= 1:
            raise ConfigError("Loader: crop_ratio must be in (0, 1] (got %r)" % (crop_ratio,))
        check_int("batch_size", batch_size, 1)
        check_int("image_size", image_size, 8)
        self.options = opts
        self._source = open_source(source)
        self.source_path = self._source.root
        self.classes: List[str] = list(self._source.classes)
        self.num_classes = len(self.classes)
        self.train = train
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)  # the largest (and, without a schedule, the only) size
        self._size_at = size_at
        self.local_world_size = int(opts.local_world_size)
        self.workers = default_workers(self.local_world_size) if opts.workers is None \
            else int(opts.workers)
        self.slots = int(opts.slots)
        self.persistent_workers = opts.persistent_workers
        self.timeout = float(opts.timeout)
        self.copy = bool(opts.copy)
        self.sampler = Sampler(len(self._source), self.batch_size, shuffle=train, seed=seed,
                               rank=rank, world_size=world_size,
                               drop_last=train if drop_last is None else drop_last)
        self.roi = bool(opts.use_roi and roi_available())
        self._decoder: Transform = TrainTransform(seed, self.roi) if train else \
            ValTransform(crop_ratio, self.roi)
        # Chunk so that one batch gives every worker a share: the ring needs only a few slots.
        self._chunk = max(1, math.ceil(self.batch_size / max(1, self.workers)))
        self._layout = RingLayout(self.slots, self.batch_size, self.image_size)
        self.epoch = 0
        self.position = 0  # batches handed to the caller in the current epoch
        self.skip_undecodable = bool(skip_undecodable)
        self.num_replaced = 0
        self.num_skipped = 0
        self._warned: set = set()
        # Anchors of the views handed out, newest last: all but the newest should be gone.
        self._handed: Deque["weakref.ref[np.ndarray]"] = collections.deque()
        self._warned_kept = False
        self._procs: List[Any] = []
        self._conns: List[Any] = []
        # Per worker: the global batch numbers of the chunks it holds, oldest first.
        self._held_by: List[Deque[int]] = []
        self._ring: Optional[mmap.mmap] = None
        self._next_yield = -1  # the global batch number the pipeline yields next (-1: none)

    # -- public API -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def num_samples(self) -> int:
        """Records in the source (before sharding across ranks)."""
        return len(self._source)

    def size_at(self, epoch: int) -> int:
        """The output size of `epoch`'s batches."""
        if self._size_at is None:
            return self.image_size
        size = int(self._size_at(epoch))
        if not 8 <= size <= self.image_size:
            raise ConfigError("Loader: the image_size schedule gave %d for epoch %d; it must be "
                              "in [8, max_image_size=%d]" % (size, epoch, self.image_size))
        return size

    @property
    def shared_memory_bytes(self) -> int:
        """Bytes of the shared batch ring when workers run (slots x batch bytes), else 0."""
        return self._layout.nbytes if self.workers else 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch at the next iteration."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> Dict[str, int]:
        """{epoch, position}: position counts batches handed to the caller, not prefetched."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self):
            raise ConfigError("position %d out of range for %d batches per epoch; was the state "
                              "saved with another batch size or world size?"
                              % (position, len(self)))
        self.epoch, self.position = epoch, position

    def stream(self, step: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Batches from global step `step` on (epoch = step // len(self)), endlessly: the next
        epoch's batches are already decoding when one ends. The position stays readable through
        state_dict() (epoch, position) as the stream advances."""
        self.epoch, self.position = divmod(int(step), len(self))
        while True:
            yield from self

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        if self.position >= len(self):  # a finished epoch: move on to the next one
            self.epoch, self.position = self.epoch + 1, 0
        it = self._iter_inline() if self.workers == 0 else self._iter_workers()
        # A loop variable left over from an earlier pass is not a kept batch: only batches of
        # this pass are watched.
        self._handed.clear()
        for batch in it:
            yield batch
            self._check_kept()  # the caller asks for the next one
        self.epoch, self.position = self.epoch + 1, 0
        if not self.persistent_workers:
            self.close()

    def close(self) -> None:
        """Stop the workers and drop this loader's hold on the ring (also done at exit).

        Never blocks on a dead or stopped worker: live ones get a second to finish their chunk,
        then everything still running is killed. The ring's memory is returned when the last
        batch view the caller kept is gone (numpy holds the mapping), never while one is alive.
        """
        procs, conns = self._procs, self._conns
        self._procs, self._conns = [], []
        for conn in conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 1.0
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.join(5)
        for conn in conns:
            conn.close()
        self._ring = None
        self._held_by = []
        self._next_yield = -1

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- iteration in this process -------------------------------------------------------------

    def _iter_inline(self):
        bs, epoch = self.batch_size, self.epoch
        S = self.size_at(epoch)
        layout = RingLayout(1, bs, S)  # one slot, in this process: refilled for every batch
        buf = layout.allocate()
        images, labels = layout.arrays(buf, 0, S)
        while self.position < len(self):
            indices = self.sampler.batch(epoch, self.position)
            failures = fill(self._source, self._decoder, indices, epoch, images, labels,
                            self.skip_undecodable)
            self._note(failures)
            self.position += 1
            n = self._keep(indices, failures, images, labels)
            yield self._hand_out(layout, buf, 0, S, n)

    def _hand_out(self, layout: RingLayout, buf: mmap.mmap, slot: int, side: int, size: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
        """The caller's (images, labels) of a filled slot: read-only views it may hold until
        it asks for the next batch, or copies of its own with copy=True."""
        images, labels, anchor = layout.hand_out(buf, slot, side, size)
        if self.copy:
            return np.array(images), np.array(labels)
        self._handed.append(anchor)
        return images, labels

    def _check_kept(self) -> None:
        """Warn once if a batch handed out before the newest one is still referenced: its slot
        is being refilled, so the caller holds data that is changing under it."""
        while len(self._handed) > 1:
            kept = self._handed.popleft()() is not None
            if kept and not self._warned_kept:
                self._warned_kept = True
                warnings.warn("Loader(%s): %s" % (self.source_path, KEPT_BATCH_ADVICE),
                              KeptBatchWarning, stacklevel=3)

    # -- iteration with workers ----------------------------------------------------------------

    def _start(self) -> None:
        buf = self._layout.allocate()
        self._ring = buf
        log.info("loader %s: %d workers, ring of %d slots = %.1f MB shared memory",
                 self.source_path, self.workers, self.slots, self.shared_memory_bytes / 1e6)
        # fork: workers inherit the mapping, and an unguarded user script is not re-imported
        # as it would be under spawn/forkserver. No LMDB environment may cross the fork: this
        # process closes its own (its readers reopen them lazily) and each worker opens its
        # own on first read.
        shards.close_all_envs()
        ctx = mp.get_context("fork")
        # One core per worker, so OpenCV must run single-threaded there. A child cannot change
        # that itself: cv2.setNumThreads after fork waits on pool threads that only exist in the
        # parent, forever. So the parent drops to one thread (stopping its pool) while forking.
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for wid in range(self.workers):
                mine, theirs = ctx.Pipe(duplex=True)
                p = ctx.Process(target=worker_main, name="engine-loader-%d" % wid, daemon=True,
                                args=(wid, theirs, self._source, self._decoder, buf,
                                      self._layout, self.skip_undecodable))
                try:  # Ctrl-C can reach neither the fork nor the child's start
                    start_process(p)
                finally:
                    theirs.close()
                    if p.pid is not None:  # started, even if Ctrl-C came during the fork
                        self._procs.append(p)
                        self._conns.append(mine)
        except BaseException:
            cv2.setNumThreads(cv_threads)
            self.close()
            raise
        cv2.setNumThreads(cv_threads)
        self._held_by = [collections.deque() for _ in self._procs]
        self._progress = [time.monotonic()] * len(self._procs)  # when each last made progress
        self._reset_stream(self.epoch * len(self) + self.position)

    def _reset_stream(self, global_batch: int) -> None:
        """Start the stream at `global_batch`, after any chunk still being written lands."""
        while any(self._held_by):
            self._receive(wait=True, strict=False)
        self._batches: Dict[int, _Batch] = {}  # in flight, by global batch number
        self._pending: Deque[Task] = collections.deque()
        self._free = list(range(self.slots))
        self._held: Optional[int] = None  # slot of the batch the caller holds
        # The global batch numbers the pipeline yields next and gives a slot next.
        self._next_submit = self._next_yield = global_batch

    def _submit(self, limit: int) -> None:
        """Give free slots to the next batches (up to global batch `limit`), hand out chunks."""
        while self._free and self._next_submit < limit:
            global_batch = self._next_submit
            epoch, indices = self.sampler.batch_at(global_batch)
            S = self.size_at(epoch)
            slot = self._free.pop()
            starts = range(0, len(indices), self._chunk)
            self._batches[global_batch] = _Batch(slot, len(indices), S, len(starts))
            for start in starts:
                self._pending.append((global_batch, epoch, slot, start,
                                      indices[start:start + self._chunk], S))
            self._next_submit += 1
        while self._pending:
            wid = min(range(len(self._procs)), key=lambda w: len(self._held_by[w]))
            if len(self._held_by[wid]) >= PER_WORKER:
                break
            task = self._pending.popleft()
            if not self._held_by[wid]:
                self._progress[wid] = time.monotonic()  # idle until now: the clock starts here
            try:
                self._conns[wid].send(task)
            except OSError:  # a broken pipe: the worker died since the last look
                self._procs[wid].join(1.0)  # its exit code names the cause
                self._check_workers()
                self._fail("loader worker %d (pid %d) closed its pipe%s"
                           % (wid, self._procs[wid].pid, self._where(wid)))
            self._held_by[wid].append(task[0])

    def _receive(self, wait: bool, strict: bool = True) -> None:
        """Collect finished chunks; raise for a dead, failed or stalled worker."""
        sentinels = {p.sentinel: wid for wid, p in enumerate(self._procs)}
        conns = {id(c): wid for wid, c in enumerate(self._conns)}
        ready = wait_ready(list(self._conns) + list(sentinels), timeout=0.2 if wait else 0)
        for obj in ready:
            if isinstance(obj, int):
                continue  # an exit sentinel: checked below, after the pipes are drained
            wid = conns[id(obj)]
            try:
                global_batch, failures, error = self._conns[wid].recv()  # obj is this pipe
            except (EOFError, OSError):
                continue  # the worker is gone: its sentinel reports why
            self._held_by[wid].popleft()
            self._progress[wid] = time.monotonic()
            if error is not None and strict:
                self.close()
                if isinstance(error, BaseException):
                    raise error
                raise RuntimeError(error)
            batch = self._batches.get(global_batch)
            if batch is not None:
                batch.remaining -= 1
                batch.failures.extend(failures)
        self._check_workers()

    def _check_workers(self) -> None:
        now = time.monotonic()
        for wid, p in enumerate(self._procs):
            if p.exitcode is not None:
                self._fail("loader worker %d (pid %d) %s%s"
                           % (wid, p.pid, describe_exit(p.exitcode), self._where(wid)))
            if self._held_by[wid] and now - self._progress[wid] > self.timeout:
                self._fail("loader worker %d (pid %d) made no progress for %.0f s%s%s; it may be "
                           "stopped or stuck in a read (raise Loader(timeout=...) if records "
                           "are legitimately this slow)"
                           % (wid, p.pid, now - self._progress[wid], self._state(p.pid),
                              self._where(wid)))

    def _where(self, wid: int) -> str:
        """' while decoding batch B of epoch E (records in <files>)' for a worker's chunk."""
        if not self._held_by[wid]:
            return ""
        epoch, b = divmod(self._held_by[wid][0], len(self))
        text = " while decoding batch %d of epoch %d" % (b, epoch)
        files = self._source.files_of(self.sampler.batch(epoch, b))
        if files:
            text += " (records in %s)" % ", ".join(files[:4] + (["..."] if len(files) > 4 else []))
        return text

    @staticmethod
    def _state(pid: int) -> str:
        try:
            import psutil

            status = psutil.Process(pid).status()
        except Exception:  # noqa: BLE001 - only decorates the message
            return ""
        return {"stopped": " (it is stopped: SIGSTOP or a debugger)",
                "disk-sleep": " (it is blocked in I/O: a hung file system?)"}.get(status, "")

    def _fail(self, message: str) -> None:
        self.close()
        raise RuntimeError(message)

    def _iter_workers(self):
        L = len(self)
        if not self._procs:
            self._start()
        elif self._next_yield != self.epoch * L + self.position:  # set_epoch / load_state_dict
            self._reset_stream(self.epoch * L + self.position)
        end = (self.epoch + 1) * L
        # A persistent loader decodes ahead into the next epoch (the default progression); a
        # per-pass loader stops at the end of this one.
        limit = (1 << 62) if self.persistent_workers else end
        try:
            while self._next_yield < end:
                self._submit(limit)
                batch = self._batches[self._next_yield]
                while batch.remaining:
                    self._receive(wait=True)
                    self._submit(limit)
                del self._batches[self._next_yield]
                self._note(batch.failures)
                if self._held is not None:
                    self._free.append(self._held)
                self._held = batch.slot
                global_batch = self._next_yield
                self._next_yield += 1
                self._submit(limit)  # refill the freed slot while the caller has the batch
                self.position += 1
                assert self._ring is not None  # _start made it; close() ends this generator
                n = batch.size
                if batch.failures and self.skip_undecodable:
                    images, labels = self._layout.arrays(self._ring, batch.slot, batch.side)
                    n = self._keep(self.sampler.batch_at(global_batch)[1], batch.failures,
                                   images, labels)
                yield self._hand_out(self._layout, self._ring, batch.slot, batch.side, n)
        except GeneratorExit:
            raise
        except BaseException:
            self.close()
            raise

    def _keep(self, indices: np.ndarray, failures: List[Replacement], images: np.ndarray,
              labels: np.ndarray) -> int:
        """How many rows a batch of `indices` yields: all of them, or with skip_undecodable,
        the rows whose record decoded, moved up in order over the rows of the skipped ones."""
        if not (failures and self.skip_undecodable):
            return len(indices)
        keep = ~np.isin(np.asarray(indices), [index for index, _path, _reason in failures])
        n = int(keep.sum())
        images[:n] = images[:len(indices)][keep]  # fancy indexing copies before the write
        labels[:n] = labels[:len(indices)][keep]
        return n

    def _note(self, failures: Iterable[Replacement]) -> None:
        for index, path, reason in failures:
            if self.skip_undecodable:
                self.num_skipped += 1
            else:
                self.num_replaced += 1
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn("record %d (%s) failed to decode (%s); %s"
                              % (index, path, reason, "skipped" if self.skip_undecodable
                                 else "replaced by the next record"),
                              RuntimeWarning, stacklevel=3)
