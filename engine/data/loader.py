"""Loader: worker processes decode JPEGs straight into a small ring of shared-memory batch slots.

    main process                                   worker processes (N)
    ------------                                   --------------------
    sampler -> batch k gets slot s, cut into        each has its own pipe to the main process;
    chunks; each chunk goes down one worker's  -->  read records (LMDB or files), decode with
    pipe (at most 2 outstanding per worker)         libjpeg-turbo (crop window, DCT-scaled),
                                                    resize, flip, write uint8 CHW into its
    batch k is ready when all its chunks are   <--  rows of slot s, reply (k, chunk, failures)
    back; yield slot s as numpy, no copy, in order

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
"""
from __future__ import annotations

import collections
import gc
import logging
import math
import mmap
import multiprocessing as mp
import os
import signal
import time
import traceback
import warnings
from multiprocessing.connection import wait as wait_ready
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np

from engine.data import shards
from engine.data.cpus import default_workers
from engine.data.decode import DecodeError, roi_available
from engine.data.folder import FolderIndex, index_folder
from engine.data.sampler import Sampler
from engine.data.transforms import TrainTransform, Transform, ValTransform
from engine.errors import ConfigError, DataError, MissingPathError, UserError, describe_exit

__all__ = ["Loader", "default_workers"]

# A failed record is replaced by the next index; give up after this many in a row (a split
# that is mostly corrupt is a packing problem, not something to paper over).
MAX_REPLACEMENTS = 16


DEFAULT_SLOTS = 4
# Chunks a worker may hold at once: one decoding, one waiting, so it never idles between them.
PER_WORKER = 2
DEFAULT_TIMEOUT_S = 120.0

log = logging.getLogger("engine.data")


# ----------------------------------------------------------------------------------- sources

class _ShardSource:
    """Records of a packed split."""

    def __init__(self, split_dir: str):
        self.split = shards.Split(split_dir)
        self.classes = self.split.classes
        self.root = self.split.root

    def __len__(self) -> int:
        return len(self.split)

    def read(self, i: int) -> Tuple[bytes, int, str, Optional[Tuple[int, int]]]:
        rec = self.split.get(i)
        # The packer guarantees a 3-channel JPEG whose size is recorded: no header probe needed.
        return rec["image"], rec["label"], rec["path"], (rec["width"], rec["height"])


class _FolderSource:
    """Files of a raw <split>/<wnid>/* folder (same decode and transforms as shards)."""

    def __init__(self, index: FolderIndex):
        self.root = index.root
        self.classes = list(index.classes)
        self.items = index.items

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> Tuple[bytes, int, str, Optional[Tuple[int, int]]]:
        rel, label = self.items[i]
        with open(os.path.join(self.root, rel), "rb") as f:
            return f.read(), label, rel, None


def _open_source(source: Union[str, FolderIndex]):
    if isinstance(source, FolderIndex):
        return _FolderSource(source)
    if os.path.isfile(source):
        raise ConfigError(
            "%s is a file; pass a packed split folder (with meta.json) or a raw "
            "<split>/<wnid>/*.JPEG folder" % source)
    if not os.path.isdir(source):
        raise MissingPathError(
            "%s does not exist. Pass a packed split folder (with meta.json, made by "
            "tools/pack_imagenet.py) or a raw <split>/<wnid>/*.JPEG folder." % source)
    if shards.is_packed(source):
        return _ShardSource(source)  # read_meta explains an incomplete or unknown split
    return _FolderSource(index_folder(source))


# ------------------------------------------------------------------------- per-sample work

def _fill(source, decoder: Transform, indices: np.ndarray, epoch: int, images: np.ndarray,
          labels: np.ndarray) -> List[Tuple[int, str, str]]:
    """Decode samples into (images, labels); returns [(index, path, reason)] of replacements."""
    n = len(source)
    failures = []
    for j, idx in enumerate(indices):
        idx = int(idx)
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


def _worker_main(wid: int, conn, source, decoder: Transform, buf: mmap.mmap,
                 layout: Dict[str, int]) -> None:
    # The parent's heap is shared copy-on-write; keep this process's collector off it, or every
    # collection would touch (and so copy) the pages of millions of long-lived objects.
    gc.freeze()
    # Ctrl-C goes to the whole process group; the main process decides and tells us to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    while True:
        try:
            if not conn.poll(1.0):
                if os.getppid() != parent:  # the main process died: don't linger as an orphan
                    return
                continue
            task = conn.recv()
        except (EOFError, OSError):  # the main process closed our pipe
            return
        if task is None:
            return
        key, epoch, slot, start, indices, S = task
        stop = start + len(indices)
        images, labels = _slot_arrays(buf, layout, slot, S)
        # (key, failures, error): error is None, a UserError to re-raise, or a bug's traceback
        reply: Tuple[Any, List[Tuple[int, str, str]], Union[None, UserError, str]]
        try:
            failures = _fill(source, decoder, indices, epoch, images[start:stop],
                             labels[start:stop])
            reply = (key, failures, None)
        except UserError as exc:  # the user's to fix: re-raised as is in the main process
            reply = (key, [], exc)
        except Exception:  # noqa: BLE001 - a bug: the main process raises it with this traceback
            reply = (key, [], "loader worker %d: %s" % (wid, traceback.format_exc()))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


def _slot_arrays(buf, layout: Dict[str, int], slot: int, S: int) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [B, 3, S, S], labels int32 [B]) of one slot, for an output size S up to
    the ring's max_size: a slot is sized for the largest resolution, and a smaller batch uses
    its first bytes, so a resolution change needs no new memory and no new workers."""
    bs, M = layout["batch_size"], layout["max_size"]
    base = slot * _slot_bytes(bs, M)
    images: np.ndarray = np.ndarray((bs, 3, S, S), np.uint8, buf, base)
    labels: np.ndarray = np.ndarray((bs,), np.int32, buf, base + bs * 3 * M * M)
    return images, labels


def _slot_bytes(batch_size: int, image_size: int) -> int:
    return batch_size * (3 * image_size * image_size + 4)


class _Batch:
    """A batch in flight: its slot, its size and the chunks not yet back."""

    __slots__ = ("slot", "size", "pixels", "remaining", "failures")

    def __init__(self, slot: int, size: int, pixels: int, chunks: int):
        self.slot, self.size, self.pixels, self.remaining = slot, size, pixels, chunks
        self.failures: List[Tuple[int, str, str]] = []


# ------------------------------------------------------------------------------- the loader

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
        workers: decoding processes; None = max(1, usable cores // local_world_size - 1)
            (see engine.data.cpus), 0 = decode in this process.
        seed, rank, world_size: the sample order and this rank's share (see Sampler).
        drop_last: drop the last incomplete batch; default True for train, False otherwise.
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
            for training, and val decodes skip PyTurboJPEG's per-call overhead.
        prefetch: the former name of `slots`.

    A yielded images array is a view of a shared slot: it stays valid until the next batch is
    requested (later batches reuse the slot), and stays readable after the loader closes. Copy
    it (or hand it to the framework, which copies) before asking for more.
    Iterating runs the current epoch from the current position; when it completes, the epoch
    advances by one. `state_dict()` / `load_state_dict()` resume exactly mid-epoch.
    """

    def __init__(self, source: Union[str, FolderIndex], *, batch_size: int, train: bool,
                 image_size: Union[int, Callable[[int], int]] = 224,
                 workers: Optional[int] = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: Optional[bool] = None,
                 local_world_size: int = 1, slots: Optional[int] = None,
                 persistent_workers: bool = True, timeout: float = DEFAULT_TIMEOUT_S,
                 use_roi: bool = True, prefetch: Optional[int] = None,
                 max_image_size: Optional[int] = None, crop_ratio: float = 0.875):
        # Every cheap check first, before any file is opened or process started.
        if slots is None:
            slots = DEFAULT_SLOTS if prefetch is None else prefetch
        if callable(image_size):
            if max_image_size is None:
                raise ConfigError("Loader: an image_size schedule needs max_image_size (the "
                                  "largest size it returns: the ring is sized for it)")
            size_at, image_size = image_size, max_image_size
        else:
            size_at = None
        if not 0 < crop_ratio <= 1:
            raise ConfigError("Loader: crop_ratio must be in (0, 1] (got %r)" % (crop_ratio,))
        for name, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 8),
                                 ("local_world_size", local_world_size, 1),
                                 ("slots", slots, 2)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                hint = " (one slot is held by the caller while the next fills)" \
                    if name == "slots" else ""
                raise ConfigError("Loader: %s must be an integer >= %d (got %r)%s"
                                  % (name, low, value, hint))
        if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 0):
            raise ConfigError("Loader: workers must be an integer >= 0 (0 decodes in this "
                              "process; got %r)" % (workers,))
        if not timeout > 0:
            raise ConfigError("Loader: timeout must be > 0 seconds (got %r)" % (timeout,))
        self._source = _open_source(source)
        self.source_path = self._source.root
        self.classes: List[str] = list(self._source.classes)
        self.num_classes = len(self.classes)
        self.train = train
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)  # the largest (and, without a schedule, the only) size
        self._size_at = size_at
        self.local_world_size = int(local_world_size)
        self.workers = default_workers(self.local_world_size) if workers is None else int(workers)
        self.slots = int(slots)
        self.persistent_workers = persistent_workers
        self.timeout = float(timeout)
        self.sampler = Sampler(len(self._source), self.batch_size, shuffle=train, seed=seed,
                               rank=rank, world_size=world_size,
                               drop_last=train if drop_last is None else drop_last)
        self.roi = bool(use_roi and roi_available())
        self._decoder: Transform = TrainTransform(seed, self.roi) if train else \
            ValTransform(crop_ratio, self.roi)
        # Chunk so that one batch gives every worker a share: the ring needs only a few slots.
        self._chunk = max(1, math.ceil(self.batch_size / max(1, self.workers)))
        self.epoch = 0
        self.position = 0  # batches handed to the caller in the current epoch
        self.num_replaced = 0
        self._warned: set = set()
        self._procs: List[Any] = []
        self._conns: List[Any] = []
        self._held_by: List[Deque[int]] = []
        self._ring: Optional[mmap.mmap] = None
        self._stream = -1  # the global batch the pipeline yields next (-1: no pipeline)

    # -- public API -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def num_samples(self) -> int:
        """Records in the source (before sharding across ranks)."""
        return len(self._source)

    @property
    def prefetch(self) -> int:
        """The former name of `slots`."""
        return self.slots

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
        return self.slots * _slot_bytes(self.batch_size, self.image_size) if self.workers else 0

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
        for batch in it:
            yield batch
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
        self._stream = -1

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
        images = np.empty((bs, 3, S, S), np.uint8)
        labels = np.empty((bs,), np.int32)
        while self.position < len(self):
            indices = self.sampler.batch(epoch, self.position)
            self._note(_fill(self._source, self._decoder, indices, epoch, images, labels))
            self.position += 1
            n = len(indices)
            yield images[:n], labels[:n]

    # -- iteration with workers ----------------------------------------------------------------

    def _start(self) -> None:
        layout = {"slots": self.slots, "batch_size": self.batch_size,
                  "max_size": self.image_size}
        # MAP_SHARED | MAP_ANONYMOUS: shared with the forked workers, invisible to the file
        # system. It is never closed explicitly: numpy views keep the mmap object alive, and
        # closing it under a view the caller kept would turn a later read into a segfault.
        buf = mmap.mmap(-1, self.slots * _slot_bytes(self.batch_size, self.image_size))
        self._ring, self._layout = buf, layout
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
                p = ctx.Process(target=_worker_main, name="engine-loader-%d" % wid, daemon=True,
                                args=(wid, theirs, self._source, self._decoder, buf, layout))
                p.start()
                theirs.close()
                self._procs.append(p)
                self._conns.append(mine)
        except BaseException:
            cv2.setNumThreads(cv_threads)
            self.close()
            raise
        cv2.setNumThreads(cv_threads)
        # Per worker: the batches of the chunks it holds, in order; when it last made progress.
        self._held_by = [collections.deque() for _ in self._procs]
        self._progress = [time.monotonic()] * len(self._procs)
        self._reset_stream(self.epoch * len(self) + self.position)

    def _reset_stream(self, key: int) -> None:
        """Start the stream at global batch `key`, after any chunk still being written lands."""
        while any(self._held_by):
            self._receive(wait=True, strict=False)
        self._batches: Dict[int, _Batch] = {}
        self._pending: Deque[Tuple[int, int, int, int, np.ndarray, int]] = collections.deque()
        self._free = list(range(self.slots))
        self._held: Optional[int] = None  # slot of the batch the caller holds
        self._next_key = self._stream = key

    def _submit(self, limit: int) -> None:
        """Give free slots to the next batches (up to global batch `limit`), hand out chunks."""
        while self._free and self._next_key < limit:
            key = self._next_key
            epoch, indices = self.sampler.batch_at(key)
            S = self.size_at(epoch)
            slot = self._free.pop()
            starts = range(0, len(indices), self._chunk)
            self._batches[key] = _Batch(slot, len(indices), S, len(starts))
            for start in starts:
                self._pending.append((key, epoch, slot, start,
                                      indices[start:start + self._chunk], S))
            self._next_key += 1
        while self._pending:
            wid = min(range(len(self._procs)), key=lambda w: len(self._held_by[w]))
            if len(self._held_by[wid]) >= PER_WORKER:
                break
            task = self._pending.popleft()
            if not self._held_by[wid]:
                self._progress[wid] = time.monotonic()  # idle until now: the clock starts here
            self._conns[wid].send(task)
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
                key, failures, error = self._conns[wid].recv()  # obj is this connection
            except (EOFError, OSError):
                continue  # the worker is gone: its sentinel reports why
            self._held_by[wid].popleft()
            self._progress[wid] = time.monotonic()
            if error is not None and strict:
                self.close()
                if isinstance(error, BaseException):
                    raise error
                raise RuntimeError(error)
            batch = self._batches.get(key)
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
        key = self._held_by[wid][0]
        epoch, b = divmod(key, len(self))
        text = " while decoding batch %d of epoch %d" % (b, epoch)
        split = getattr(self._source, "split", None)
        if split is not None:
            files = sorted({os.path.basename(split.files[split.locate(int(i))[0]])
                            for i in self.sampler.batch(epoch, b)})
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
        elif self._stream != self.epoch * L + self.position:  # set_epoch / load_state_dict
            self._reset_stream(self.epoch * L + self.position)
        end = (self.epoch + 1) * L
        # A persistent loader decodes ahead into the next epoch (the default progression); a
        # per-pass loader stops at the end of this one.
        limit = (1 << 62) if self.persistent_workers else end
        try:
            while self._stream < end:
                self._submit(limit)
                batch = self._batches[self._stream]
                while batch.remaining:
                    self._receive(wait=True)
                    self._submit(limit)
                del self._batches[self._stream]
                self._note(batch.failures)
                if self._held is not None:
                    self._free.append(self._held)
                self._held = batch.slot
                self._stream += 1
                self._submit(limit)  # refill the freed slot while the caller has the batch
                self.position += 1
                images, labels = _slot_arrays(self._ring, self._layout, batch.slot,
                                              batch.pixels)
                yield images[:batch.size], labels[:batch.size]
        except GeneratorExit:
            raise
        except BaseException:
            self.close()
            raise

    def _note(self, failures) -> None:
        for index, path, reason in failures:
            self.num_replaced += 1
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn("record %d (%s) failed to decode (%s); replaced by the next record"
                              % (index, path, reason), RuntimeWarning, stacklevel=3)
