"""Loader: worker processes decode JPEGs straight into a ring of shared-memory batch slots.

    main process                              worker processes (N)
    ------------                              --------------------
    sampler -> (batch b, slot s, indices) --> tasks queue
                                              read record (LMDB or file), decode with
                                              libjpeg-turbo (crop window, DCT-scaled),
                                              resize, flip, write uint8 CHW into slot s
    results queue <-- (b, s, failures)    <--
    yield slot s as numpy, no copy, in batch order

Only slot numbers cross process boundaries; pixels never get pickled. The slots live in one
anonymous shared mapping that forked workers inherit: nothing is created in /dev/shm, so
nothing can be left behind there, whatever happens to the processes.
"""
from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np

from engine.data import shards
from engine.data.decode import (DecodeError, decode_bgr, decode_crop, jpeg_size, pick_scale,
                                roi_available, scaled_dim, sniff)
from engine.data.folder import classes_for, scan_split
from engine.data.sampler import Sampler
from engine.data.transforms import (center_crop, random_resized_crop, resize_shorter,
                                    sample_rng, val_resize)

__all__ = ["Loader", "default_workers"]

# A failed record is replaced by the next index; give up after this many in a row (a split
# that is mostly corrupt is a packing problem, not something to paper over).
MAX_REPLACEMENTS = 16


def default_workers() -> int:
    """Physical cores minus one (the main process feeds the accelerator), at least one."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


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

    def __init__(self, split_dir: str):
        self.root = os.path.abspath(split_dir)
        self.classes = classes_for(self.root)
        self.items = scan_split(self.root, self.classes)
        if not self.items:
            raise ValueError("%s has no files under class folders" % self.root)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> Tuple[bytes, int, str, Optional[Tuple[int, int]]]:
        rel, label = self.items[i]
        with open(os.path.join(self.root, rel), "rb") as f:
            return f.read(), label, rel, None


def _open_source(source: str):
    if not os.path.isdir(source):
        raise FileNotFoundError(
            "%s does not exist. Pass a packed split folder (with meta.json, made by "
            "tools/pack_imagenet.py) or a raw <split>/<wnid>/*.JPEG folder." % source)
    if os.path.exists(os.path.join(source, shards.META_FILE)) or any(
            f.startswith("shard-") for f in os.listdir(source)):
        return _ShardSource(source)  # read_meta explains an incomplete or unknown split
    return _FolderSource(source)


# ------------------------------------------------------------------------- per-sample work

class _Decoder:
    """Turns record bytes into one uint8 CHW sample; identical in workers and inline."""

    def __init__(self, train: bool, image_size: int, seed: int, use_roi: bool):
        self.train = train
        self.size = image_size
        self.seed = seed
        self.use_roi = use_roi
        self.resize_to = val_resize(image_size)

    def __call__(self, data: bytes, index: int, epoch: int, out: np.ndarray,
                 size: Optional[Tuple[int, int]] = None) -> None:
        """Decode into out (uint8 [3, S, S]); size is the JPEG's (width, height) when known."""
        if self.train:
            img, flip = self._train(data, index, epoch, size)
        else:
            img, flip = self._val(data, size), False
        if img.shape[0] != self.size or img.shape[1] != self.size:
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        if flip:
            img = cv2.flip(img, 1)
        # HWC -> CHW straight into the slot's three planes (3x cheaper than a numpy transpose).
        cv2.split(img, [out[0], out[1], out[2]])

    def _train(self, data: bytes, index: int, epoch: int,
               size: Optional[Tuple[int, int]]) -> Tuple[np.ndarray, bool]:
        rng = sample_rng(self.seed, epoch, index)
        S = self.size
        if size is not None or sniff(data) == "jpeg":
            width, height = size or jpeg_size(data)
            x, y, w, h = random_resized_crop(height, width, rng)
            # Decode at the smallest DCT scale that keeps the crop at least S x S: large
            # images decode at 1/2, 1/4, ... which is much cheaper than a full decode.
            num = pick_scale(w, h, S, S)
            x0, y0 = x * num // 8, y * num // 8
            x1 = min(scaled_dim(width, num), -(-(x + w) * num // 8))
            y1 = min(scaled_dim(height, num), -(-(y + h) * num // 8))
            # The fast integer IDCT: augmentation does not need the last grey level.
            crop = decode_crop(data, num, x0, y0, x1 - x0, y1 - y0, self.use_roi,
                               fast_dct=True)
        else:  # PNG etc. in a raw folder: full decode, same geometry
            full = decode_bgr(data, fast_dct=True)
            x, y, w, h = random_resized_crop(full.shape[0], full.shape[1], rng)
            crop = full[y:y + h, x:x + w]
        return crop, rng.random() < 0.5

    def _val(self, data: bytes, size: Optional[Tuple[int, int]]) -> np.ndarray:
        if size is not None or sniff(data) == "jpeg":
            width, height = size or jpeg_size(data)
            img = decode_crop(data, 8, 0, 0, width, height, self.use_roi)
        else:
            img = decode_bgr(data)
        h, w = img.shape[:2]
        th, tw = resize_shorter(h, w, self.resize_to)
        if (th, tw) != (h, w):
            img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_LINEAR)
        if th < self.size or tw < self.size:  # only for image_size > resize_to; keep it defined
            img = cv2.resize(img, (max(tw, self.size), max(th, self.size)),
                             interpolation=cv2.INTER_LINEAR)
            th, tw = img.shape[:2]
        x, y = center_crop(th, tw, self.size)
        return img[y:y + self.size, x:x + self.size]


def _fill(source, decoder: _Decoder, indices: np.ndarray, epoch: int, images: np.ndarray,
          labels: np.ndarray) -> List[Tuple[int, str, str]]:
    """Decode a batch into (images, labels); returns [(index, path, reason)] of replacements."""
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
            raise RuntimeError("%d consecutive records from index %d failed to decode (last: "
                               "%s: %s); the data is damaged, repack it"
                               % (MAX_REPLACEMENTS, idx, failures[-1][1], failures[-1][2]))
    return failures


def _worker_main(wid: int, source, decoder: _Decoder, buf: mmap.mmap, layout: Dict[str, Any],
                 tasks, results) -> None:
    # Ctrl-C goes to the whole process group; the main process decides and tells us to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    images, labels = _views(buf, layout)
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the main process died: don't linger as an orphan
                return
            continue
        if task is None:
            return
        gen, epoch, b, slot, indices = task
        try:
            failures = _fill(source, decoder, indices, epoch, images[slot], labels[slot])
            results.put((gen, b, slot, failures, None))
        except Exception:  # noqa: BLE001 - reported to the main process, which raises
            results.put((gen, b, slot, [], "worker %d: %s" % (wid, traceback.format_exc())))


def _views(buf, layout: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    slots, bs, S = layout["slots"], layout["batch_size"], layout["image_size"]
    images = np.ndarray((slots, bs, 3, S, S), np.uint8, buf, 0)
    labels = np.ndarray((slots, bs), np.int32, buf, images.nbytes)
    return images, labels


def _slot_bytes(batch_size: int, image_size: int) -> int:
    return batch_size * (3 * image_size * image_size + 4)


# ------------------------------------------------------------------------------- the loader

class Loader:
    """Batches of (uint8 [N,3,H,W] BGR images, int32 [N] labels) from a packed or raw split.

    Args:
        source: a packed split folder (has meta.json) or a raw <split>/<wnid>/*.JPEG folder.
        batch_size: samples per batch on this rank.
        train: RandomResizedCrop + horizontal flip in a shuffled order (True), or resize the
            shorter side to round(image_size / 0.875) + center crop in record order (False).
        image_size: output height and width.
        workers: decoding processes; None = physical cores - 1, 0 = decode in this process.
        seed, rank, world_size: the sample order and this rank's share (see Sampler).
        drop_last: drop the last incomplete batch; default True for train, False otherwise.
        prefetch: batch slots in flight (default 2 per worker); shared memory is
            prefetch x batch bytes.
        use_roi: use the compiled decoder when it is built: only the crop window is decoded
            for training, and val decodes skip PyTurboJPEG's per-call overhead.

    A yielded images array is a view of a shared slot: it stays valid until the next batch is
    requested. Copy it (or hand it to the framework, which copies) before asking for more.
    Iterating runs the current epoch from the current position; when it completes, the epoch
    advances by one. `state_dict()` / `load_state_dict()` resume exactly mid-epoch.
    """

    def __init__(self, source: str, *, batch_size: int, train: bool, image_size: int = 224,
                 workers: Optional[int] = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: Optional[bool] = None,
                 prefetch: Optional[int] = None, use_roi: bool = True):
        if image_size < 8:
            raise ValueError("image_size must be at least 8 (got %d)" % image_size)
        self.source_path = os.path.abspath(source)
        self._source = _open_source(source)
        self.classes: List[str] = list(self._source.classes)
        self.num_classes = len(self.classes)
        self.train = train
        self.batch_size = batch_size
        self.image_size = image_size
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0 decodes in the main process)")
        self.sampler = Sampler(len(self._source), batch_size, shuffle=train, seed=seed, rank=rank,
                               world_size=world_size,
                               drop_last=train if drop_last is None else drop_last)
        self.prefetch = max(1, prefetch if prefetch is not None else 2 * max(1, self.workers))
        self.roi = bool(use_roi and roi_available())
        self._decoder = _Decoder(train, image_size, seed, self.roi)
        self.epoch = 0
        self.position = 0  # batches handed to the caller in the current epoch
        self.num_replaced = 0
        self._warned: set = set()
        self._procs: List[mp.Process] = []
        self._buf: Optional[mmap.mmap] = None
        self._gen = 0
        self._outstanding = 0  # tasks submitted and not yet collected

    # -- public API -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def num_samples(self) -> int:
        """Records in the source (before sharding across ranks)."""
        return len(self._source)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch at the next iteration."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> Dict[str, int]:
        """{epoch, position}: position counts batches handed to the caller, not prefetched."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError("position %d out of range for %d batches per epoch; was the state "
                             "saved with another batch size or world size?" % (position, len(self)))
        self.epoch, self.position = epoch, position

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        if self.position >= len(self):  # a finished epoch: move on to the next one
            self.epoch, self.position = self.epoch + 1, 0
        it = self._iter_inline() if self.workers == 0 else self._iter_workers()
        for batch in it:
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def close(self) -> None:
        """Stop the workers and release the shared memory (also done at exit)."""
        procs, self._procs = self._procs, []
        if procs:
            for _ in procs:
                try:
                    self._tasks.put(None)
                except (OSError, ValueError):
                    pass
            deadline = time.time() + 5
            for p in procs:
                p.join(max(0.0, deadline - time.time()))
                if p.is_alive():
                    p.terminate()
                    p.join(1)
            for q in (self._tasks, self._results):
                q.close()
                q.join_thread()
        self._outstanding = 0
        if self._buf is not None:
            buf, self._buf = self._buf, None
            self._images = self._labels = None
            try:
                buf.close()
            except BufferError:  # the caller still holds a batch view; freed with it
                pass

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- iteration ---------------------------------------------------------------------------

    def _iter_inline(self):
        S, bs = self.image_size, self.batch_size
        images = np.empty((bs, 3, S, S), np.uint8)
        labels = np.empty((bs,), np.int32)
        epoch = self.epoch
        while self.position < len(self):
            indices = self.sampler.batch(epoch, self.position)
            self._note(_fill(self._source, self._decoder, indices, epoch, images, labels))
            self.position += 1
            n = len(indices)
            yield images[:n], labels[:n]

    def _start(self) -> None:
        layout = {"slots": self.prefetch, "batch_size": self.batch_size,
                  "image_size": self.image_size}
        # MAP_SHARED | MAP_ANONYMOUS: shared with the forked workers, invisible to the file
        # system, and freed by the kernel when the last process holding it exits.
        self._buf = mmap.mmap(-1, self.prefetch * _slot_bytes(self.batch_size, self.image_size))
        self._images, self._labels = _views(self._buf, layout)
        # fork: workers inherit the mapping, and an unguarded user script is not re-imported
        # as it would be under spawn/forkserver. No LMDB environment may cross the fork: this
        # process closes its own (its readers reopen them lazily) and each worker opens its
        # own on first read.
        shards.close_all_envs()
        ctx = mp.get_context("fork")
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        # One core per worker, so OpenCV must run single-threaded there. A child cannot change
        # that itself: cv2.setNumThreads after fork waits on pool threads that only exist in the
        # parent, forever. So the parent drops to one thread (stopping its pool) while forking.
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for wid in range(self.workers):
                p = ctx.Process(target=_worker_main, name="engine-loader-%d" % wid, daemon=True,
                                args=(wid, self._source, self._decoder, self._buf, layout,
                                      self._tasks, self._results))
                p.start()
                self._procs.append(p)
        finally:
            cv2.setNumThreads(cv_threads)

    def _get_result(self):
        while True:
            # Checked on every result, not only when waiting: the other workers could otherwise
            # carry on at reduced speed and hide a worker the OOM killer took.
            self._check_workers()
            try:
                return self._results.get(timeout=0.2)
            except queue.Empty:
                pass

    def _check_workers(self) -> None:
        for wid, p in enumerate(self._procs):
            if p.exitcode is not None:
                code = p.exitcode
                self.close()
                hint = " (killed by a signal: -9 is usually the out-of-memory killer)" \
                    if code < 0 else ""
                raise RuntimeError("loader worker %d (pid %d) exited unexpectedly with code %d%s"
                                   % (wid, p.pid, code, hint))

    def _drain(self) -> None:
        """Wait for tasks of an abandoned iteration: their slots may still be being written."""
        while self._outstanding:
            self._get_result()
            self._outstanding -= 1

    def _iter_workers(self):
        if not self._procs:
            self._start()
        self._drain()
        self._gen += 1
        gen, epoch, total = self._gen, self.epoch, len(self)
        free = list(range(self.prefetch))
        ready: Dict[int, Tuple[int, list]] = {}
        next_submit = self.position
        held = None  # slot of the batch the caller holds now
        try:
            while self.position < total:
                while free and next_submit < total:
                    slot = free.pop()
                    self._tasks.put((gen, epoch, next_submit, slot,
                                     self.sampler.batch(epoch, next_submit)))
                    self._outstanding += 1
                    next_submit += 1
                while self.position not in ready:
                    g, b, slot, failures, error = self._get_result()
                    self._outstanding -= 1
                    if error is not None:
                        self.close()
                        raise RuntimeError("loader %s" % error)
                    ready[b] = (slot, failures)
                slot, failures = ready.pop(self.position)
                self._note(failures)
                if held is not None:
                    free.append(held)
                held = slot
                n = len(self.sampler.batch(epoch, self.position))
                self.position += 1
                yield self._images[slot, :n], self._labels[slot, :n]
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
