"""ImageNet folder -> LMDB shards (see shards.py for the format).

Every file is sniffed by content, strictly decoded, and either kept byte for byte (a JPEG that
libjpeg-turbo decodes to 3 channels), converted to an RGB JPEG at quality 95 (PNG, WebP, BMP,
TIFF, CMYK/YCCK JPEG, or anything larger than --max-side), or skipped with a reason (empty,
truncated, corrupt, not an image). Shards are independent: a process pool packs them in
parallel, each shard by one worker from its first file to its last.

Resumability: the file list, its order and its split into shards are a pure function of the
input and the arguments (the fingerprint). A shard is written under a temporary name and renamed
when complete, then a small marker records its counts; a rerun keeps every shard whose marker
matches the fingerprint and rewrites the rest. meta.json comes last. A pack killed at any moment
and rerun therefore ends with every file exactly once.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from engine.data import shards
from engine.data.decode import DecodeError, decode_bgr, jpeg_info, sniff
from engine.data.folder import LayoutError, list_classes, scan_split
from engine.errors import UserError

__all__ = ["PackError", "pack_imagenet", "process_file", "default_workers"]

JPEG_QUALITY = 95
PROGRESS_DIR = ".pack"


class PackError(UserError, ValueError):
    """Bad input or arguments: the message says what was wrong and how to fix it."""


def default_workers() -> int:
    return os.cpu_count() or 1


def _encode_jpeg(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise DecodeError("re-encoding to JPEG failed")
    return buf.tobytes()


def _limit_side(bgr: np.ndarray, max_side: Optional[int]) -> Tuple[np.ndarray, bool]:
    h, w = bgr.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return bgr, False
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA), True


def process_file(path: str, max_side: Optional[int] = None) -> Dict[str, Any]:
    """Validate one file. Returns {"image", "height", "width", "kind"} or {"skip": reason}.

    kind is "jpeg" (original bytes kept), "gray" (a grayscale JPEG, kept: libjpeg expands it
    to 3 channels) or "converted:<what>".
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return {"skip": "unreadable: %s" % exc.strerror}
    if not data:
        return {"skip": "empty file"}
    fmt = sniff(data)
    try:
        if fmt == "jpeg":
            info = jpeg_info(data)
            bgr = decode_bgr(data, info=info)  # the strict full decode every kept image passes
            if info.needs_conversion:
                kind = "converted:cmyk"
            else:
                kind = "gray" if info.grayscale else "jpeg"
        elif fmt == "unknown":
            return {"skip": "not an image (starts with %s)" % data[:8].hex()}
        else:
            bgr = decode_bgr(data)
            kind = "converted:" + fmt
    except DecodeError as exc:
        return {"skip": "corrupt %s: %s" % (fmt.upper(), exc)}
    bgr, resized = _limit_side(bgr, max_side)
    if resized and not kind.startswith("converted"):
        kind = "converted:resized"
    if kind.startswith("converted"):
        data = _encode_jpeg(bgr)
    return {"image": data, "height": bgr.shape[0], "width": bgr.shape[1], "kind": kind}


# Files processed, shared with the pool's workers (fork) so the progress bar moves per file.
_progress_counter = None


def _init_worker(counter) -> None:
    global _progress_counter
    _progress_counter = counter


def _pack_shard(job: Dict[str, Any]) -> Dict[str, Any]:
    """Write one complete shard (decode, validate, serialise, append) and its marker.

    Shards are independent, so workers write different shards concurrently and nothing but a
    small marker crosses a process boundary: piping every image back to one writer made that
    process the bottleneck. The shard appears under its final name only when complete.
    """
    src, dst, k, items, fp, max_side = (job[x] for x in
                                        ("src", "dst", "k", "items", "fp", "max_side"))
    writer = shards.ShardWriter(os.path.join(dst, shards.shard_name(k)))
    m = {"file": shards.shard_name(k), "fingerprint": fp, "seen": 0, "num_samples": 0,
         "kinds": Counter(), "skipped": [], "bytes": 0}
    try:
        for rel, label in items:
            r = process_file(os.path.join(src, rel), max_side)
            m["seen"] += 1
            if "skip" in r:
                m["skipped"].append({"path": rel, "reason": r["skip"]})
            else:
                value = shards.pack_record(r["image"], label, r["height"], r["width"], rel)
                writer.append(value)
                m["kinds"][r["kind"]] += 1
                m["bytes"] += len(value)
            if _progress_counter is not None:
                with _progress_counter.get_lock():
                    _progress_counter.value += 1
    except BaseException:
        writer.abort()
        raise
    writer.close()
    m["num_samples"] = writer.num_samples
    shards.write_json_atomic(os.path.join(dst, PROGRESS_DIR, m["file"] + ".json"), m)
    return m


def _fingerprint(split: str, classes, items, root: str, seed: int, shard_size: int,
                 max_side: Optional[int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([shards.VERSION, split, classes, seed, shard_size, max_side]).encode())
    for rel, label in items:
        st = os.stat(os.path.join(root, rel))
        h.update(("%s\0%d\0%d\0%d\n" % (rel, label, st.st_size, st.st_mtime_ns)).encode())
    return h.hexdigest()


class _Stats:
    def __init__(self):
        self.seen = self.kept = 0
        self.kinds: Counter = Counter()
        self.skipped: List[Dict[str, str]] = []
        self.bytes = 0

    def add_marker(self, m: Dict[str, Any]) -> None:
        self.seen += m["seen"]
        self.kept += m["num_samples"]
        self.kinds.update(m["kinds"])
        self.skipped.extend(m["skipped"])
        self.bytes += m["bytes"]


def _pack_split(root: str, out: str, split: str, classes: List[str], shard_size: int,
                max_side: Optional[int], seed: int, pool, counter, progress: bool,
                log) -> Dict[str, Any]:
    src = os.path.join(root, split)
    dst = os.path.join(out, split)
    try:
        items = scan_split(src, classes)
    except LayoutError as exc:
        raise PackError(str(exc)) from None
    if not items:
        raise PackError("%s has no image files under its class folders" % src)
    if split == "train":  # each shard mixes classes; the loader shuffles again per epoch
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    fp = _fingerprint(split, classes, items, src, seed, shard_size, max_side)

    meta_path = os.path.join(dst, shards.META_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("fingerprint") == fp:
            log("%s: already packed (%d records in %s), nothing to do"
                % (split, old["num_samples"], dst))
            return {"split": split, "seen": len(items), "kept": old["num_samples"],
                    "skipped": len(old["skipped"]), "kinds": old.get("kinds", {}),
                    "bytes": old.get("bytes", 0), "seconds": 0.0, "done_before": True}
        raise PackError(
            "%s already holds a complete pack of different input or arguments. Choose another "
            "--out, or delete %s to repack." % (dst, dst))

    prog = os.path.join(dst, PROGRESS_DIR)
    os.makedirs(prog, exist_ok=True)
    chunks = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    markers: Dict[int, Dict[str, Any]] = {}
    for k in range(len(chunks)):
        mpath = os.path.join(prog, shards.shard_name(k) + ".json")
        if os.path.exists(mpath) and os.path.exists(os.path.join(dst, shards.shard_name(k))):
            with open(mpath) as f:
                m = json.load(f)
            if m.get("fingerprint") == fp:
                markers[k] = m
    todo = [k for k in range(len(chunks)) if k not in markers]
    if markers and todo:
        log("%s: resuming, %d of %d shards already complete" % (split, len(markers), len(chunks)))

    t0 = time.time()
    jobs = [{"src": src, "dst": dst, "k": k, "items": chunks[k], "fp": fp, "max_side": max_side}
            for k in todo]
    todo_files = sum(len(j["items"]) for j in jobs)
    bar = _progress(len(items), len(items) - todo_files, "pack " + split, progress)
    try:
        if pool is None:
            for job in jobs:
                markers[job["k"]] = _pack_shard(job)
                bar.update(len(job["items"]))
        else:
            start = counter.value
            pending = {pool.apply_async(_pack_shard, (job,)): job["k"] for job in jobs}
            shown = 0
            while pending:
                done = [r for r in pending if r.ready()]
                for r in done:
                    markers[pending.pop(r)] = r.get()  # re-raises a worker's exception
                now = counter.value - start
                bar.update(now - shown)
                shown = now
                if not done:
                    time.sleep(0.05)
    finally:
        bar.close()
    seconds = time.time() - t0
    stats = _Stats()
    for k in range(len(chunks)):  # in shard order, whatever order the workers finished in
        stats.add_marker(markers[k])

    kinds = {k: v for k, v in sorted(stats.kinds.items())}
    meta = {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "split": split,
        "num_samples": stats.kept,
        "classes": classes,
        "shards": [{"file": markers[k]["file"], "num_samples": markers[k]["num_samples"]}
                   for k in range(len(chunks))],
        "skipped": stats.skipped,
        "kinds": kinds,
        "bytes": stats.bytes,
        "seed": seed,
        "shard_size": shard_size,
        "max_side": max_side,
        "shuffled": split == "train",
        "fingerprint": fp,
    }
    shards.write_json_atomic(meta_path, meta)
    shutil.rmtree(prog, ignore_errors=True)
    return {"split": split, "seen": stats.seen, "kept": stats.kept,
            "skipped": len(stats.skipped), "kinds": kinds, "bytes": stats.bytes,
            "seconds": seconds, "processed": todo_files, "done_before": False,
            "skipped_list": stats.skipped}


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr)


def pack_imagenet(data: str, out: str, splits: Sequence[str] = ("train", "val"),
                  workers: Optional[int] = None, shard_size: int = 5000,
                  max_side: Optional[int] = None, seed: int = 0, strict: bool = False,
                  progress: bool = True, log=print) -> Dict[str, Any]:
    """Pack ROOT/<split>/<wnid>/* into OUT/<split>/ shards; returns a summary per split.

    Raises PackError on bad input; with strict=True also when any file had to be skipped
    (the shards are still written, so a rerun after fixing the files only repacks what changed).
    """
    if shard_size < 1:
        raise PackError("--shard-size must be at least 1 (got %d)" % shard_size)
    if max_side is not None and max_side < 16:
        raise PackError("--max-side must be at least 16 px (got %d)" % max_side)
    bad = [s for s in splits if s not in ("train", "val")]
    if bad or not splits:
        raise PackError("--splits takes train and/or val (got %s)" % ",".join(splits))
    if not os.path.isdir(data):
        raise PackError("--data %s does not exist or is not a folder" % data)
    train_dir = os.path.join(data, "train")
    if os.path.isdir(train_dir):
        classes = list_classes(train_dir)
    elif splits == ["val"] or tuple(splits) == ("val",):
        classes = list_classes(os.path.join(data, "val"))
        log("note: %s not found; labels follow val's own sorted class folders" % train_dir)
    else:
        raise PackError("%s does not exist; expected ROOT/train/<wnid>/*.JPEG" % train_dir)
    if not classes:
        raise PackError("%s has no class folders" % train_dir)
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise PackError("--workers must be >= 0 (0 = decode in the main process)")

    os.makedirs(out, exist_ok=True)
    pool = counter = None
    if workers > 0:
        ctx = mp.get_context("fork")
        counter = ctx.Value("q", 0)
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(counter,))
    summaries = []
    try:
        for split in splits:
            summaries.append(_pack_split(data, out, split, classes, shard_size, max_side, seed,
                                         pool, counter, progress, log))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    result = {"out": os.path.abspath(out), "workers": workers, "splits": summaries}
    for s in summaries:
        log(_summary_line(s, out))
        for item in s.get("skipped_list", [])[:20]:
            log("  skipped %s: %s" % (item["path"], item["reason"]))
    skipped = sum(s["skipped"] for s in summaries)
    if strict and skipped:
        raise PackError("--strict: %d file(s) were skipped (listed in meta.json 'skipped')"
                        % skipped)
    return result


def _summary_line(s: Dict[str, Any], out: str) -> str:
    converted = {k.split(":", 1)[1]: v for k, v in s["kinds"].items() if k.startswith("converted")}
    conv = ", ".join("%s %d" % kv for kv in sorted(converted.items())) or "none"
    rate = s.get("processed", 0) / s["seconds"] if s["seconds"] > 0 else 0.0
    return ("%s: %d files seen, %d kept (%d grayscale), converted: %s; %d skipped; "
            "%.0f img/s; %.1f MB written to %s"
            % (s["split"], s["seen"], s["kept"], s["kinds"].get("gray", 0), conv, s["skipped"],
               rate, s["bytes"] / 1e6, os.path.join(os.path.abspath(out), s["split"])))
