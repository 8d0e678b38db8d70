"""The on-disk shard contract (version 1). This is the only module that knows the byte layout.

    <out>/<split>/meta.json          written last, atomically; a split without it is incomplete
    <out>/<split>/shard-NNNNN.lmdb   an LMDB environment opened with subdir=False

Record i of a shard: key struct.pack(">Q", i) for i in 0..num_samples-1; value a msgpack map with
at least "image" (JPEG bytes that libjpeg-turbo decodes to 3 channels), "label" (int), "height",
"width" (ints of the stored JPEG) and "path" (source path relative to the split folder).
The global index of a record is its shard's offset (running sum of num_samples in meta order)
plus its index in the shard. Readers may rely on nothing else; more meta keys may be added.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import struct
import threading
from typing import Any, Dict, Iterator, List, Optional

import lmdb
import msgpack

from engine.atomic import atomic_write, fsync_dir
from engine.errors import UserError

__all__ = [
    "FORMAT", "VERSION", "META_FILE", "ShardError", "shard_name", "record_key", "pack_record",
    "unpack_record", "ShardWriter", "write_json_atomic", "is_packed", "read_meta", "open_env",
    "close_all_envs", "Split", "CHECKSUM_ALGO", "file_checksum", "check_shard_file",
]

FORMAT = "engine-lmdb-shards"
VERSION = 1
META_FILE = "meta.json"
# Address space reserved for a shard being written. LMDB grows the file only as pages are
# written, so this costs nothing; it merely has to exceed any shard's size.
MAP_SIZE = 1 << 40
COMMIT_EVERY = 512
# ShardWriter also commits after this many bytes of records, so that the disk writes a shard
# in parts while it is being packed (see ShardWriter).
COMMIT_BYTES = 4 << 20
# OS readahead on shard files. LMDB's "no readahead" advises the kernel that access is random,
# so each 4 KB page of a ~110 KB record then faults in with its own disk read; with readahead a
# record comes in one read. From a cold page cache that made whole epochs 1.7-2.4x faster
# (bench_loader.py --cold); with a warm cache the two are the same.
READAHEAD = True
# Shard checksums are "blake2b:<hex>": in the standard library, and faster than sha256 in pure
# software, so verifying runs near disk speed without adding a dependency.
CHECKSUM_ALGO = "blake2b"
_CHUNK = 4 << 20
# LMDB's meta pages (pages 0 and 1) on a 64-bit build: a 16-byte page header, then MDB_meta =
# magic u32, version u32, address ptr, mapsize size_t, two MDB_db (48 bytes each; the free DB's
# md_pad holds the page size), last used page number, transaction id.
_MDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II QQ I12x32x 48x QQ")
_META_AT = 16


class ShardError(UserError, RuntimeError):
    """A split folder that is missing, incomplete or of a format this reader does not know."""


def shard_name(index: int) -> str:
    return "shard-%05d.lmdb" % index


def record_key(i: int) -> bytes:
    return struct.pack(">Q", i)


def pack_record(image: bytes, label: int, height: int, width: int, path: str,
                **extra: Any) -> bytes:
    rec = {"image": image, "label": int(label), "height": int(height), "width": int(width),
           "path": path}
    rec.update(extra)
    return msgpack.packb(rec, use_bin_type=True)


def unpack_record(value) -> Dict[str, Any]:
    return msgpack.unpackb(value, raw=False)


def file_checksum(path: str, progress=None) -> str:
    """"blake2b:<hex>" of a file's bytes; progress(n) is called after each chunk read."""
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return "%s:%s" % (CHECKSUM_ALGO, h.hexdigest())


def check_shard_file(path: str) -> None:
    """Raise ShardError unless `path` is an LMDB file at least as long as its header says.

    The reader maps shards into memory, and touching a page past the end of a truncated file
    kills the process with SIGBUS instead of raising; LMDB itself does not compare the file size
    with its last page number, so this check must come before any read.
    """
    fix = "repack the split, or restage it from an intact copy"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_META_AT + _META.size)
            if len(head) < _META_AT + _META.size:
                raise ShardError("%s is truncated (%d bytes, shorter than an LMDB header); %s"
                                 % (path, size, fix))
            magic, version, _addr, _mapsize, psize, last0, txn0 = _META.unpack_from(head, _META_AT)
            if magic != _MDB_MAGIC or psize < 512 or psize & (psize - 1):
                raise ShardError("%s is not an LMDB shard (damaged or overwritten); %s"
                                 % (path, fix))
            f.seek(psize)
            second = f.read(_META_AT + _META.size)
    except OSError as exc:
        raise ShardError("cannot read %s (%s); %s" % (path, exc.strerror or exc, fix)) from None
    last = last0
    if len(second) == _META_AT + _META.size:
        magic1, _v, _a, _m, _p, last1, txn1 = _META.unpack_from(second, _META_AT)
        if magic1 == _MDB_MAGIC and txn1 > txn0:  # LMDB uses the meta page of the newer txn
            last = last1
    need = (last + 1) * psize
    if size < need:
        raise ShardError("%s is truncated: %d bytes, but its LMDB header needs %d; %s"
                         % (path, size, need, fix))


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never a part."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has only fsync


class _WriteBack:
    """fdatasync of one file in a background thread: the disk writes what the shard writer
    has committed while the packer goes on decoding, instead of all of it at the end."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_RDONLY)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[OSError] = None

    def _sync(self) -> None:
        try:
            _fdatasync(self._fd)
        except OSError as exc:  # re-raised by wait(), in the writer's thread
            self._error = exc

    def start(self) -> None:
        """Start writing back; a flush still running covers this commit or the next start()."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._sync, name="shard-write-back",
                                            daemon=True)
            self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class ShardWriter:
    """Writes one shard under a temporary name; `close()` publishes it with an atomic rename.

    A writer killed at any point leaves only the temporary file, which the packer deletes and
    rewrites on the next run: a file named shard-NNNNN.lmdb is always complete.

    Records are committed about every COMMIT_BYTES, and each commit starts the disk writing it
    in the background; no commit waits for the disk. close() waits once, with one fdatasync
    of the whole file, and only then renames it: the same guarantee as a sync per commit,
    since a crash before the rename leaves only the temporary file.
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp_path = path + ".tmp"
        for stale in (self.tmp_path, self.tmp_path + "-lock"):
            if os.path.exists(stale):
                os.remove(stale)
        # lock=False: one writer per file by construction, and no -lock file left behind.
        self._env = lmdb.open(self.tmp_path, subdir=False, map_size=MAP_SIZE, lock=False,
                              readahead=False, meminit=False, max_dbs=0, sync=False,
                              metasync=False)
        self._write_back = _WriteBack(self.tmp_path)
        self._txn = self._env.begin(write=True)
        self.num_samples = 0
        self._uncommitted = 0

    def append(self, value: bytes) -> None:
        self._txn.put(record_key(self.num_samples), value, append=True)
        self.num_samples += 1
        self._uncommitted += len(value)
        if self.num_samples % COMMIT_EVERY == 0 or self._uncommitted >= COMMIT_BYTES:
            self._txn.commit()
            self._write_back.start()
            self._txn = self._env.begin(write=True)
            self._uncommitted = 0

    def close(self, checksum: bool = False) -> Optional[str]:
        """Commit, make the file durable, publish it; with checksum=True return its
        file_checksum(), computed while the disk finishes writing it."""
        self._txn.commit()
        self._write_back.wait()
        self._write_back.start()  # the fdatasync that makes the whole file durable
        try:
            digest = file_checksum(self.tmp_path) if checksum else None
        finally:
            self._write_back.close()  # waits for it
        self._env.close()
        os.replace(self.tmp_path, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return digest

    def abort(self) -> None:
        """Drop the partial shard (also after a failed commit, e.g. on a full disk)."""
        try:
            self._txn.abort()
            self._env.close()
        except lmdb.Error:
            pass
        try:
            self._write_back.close()
        except OSError:
            pass
        for f in (self.tmp_path, self.tmp_path + "-lock"):
            try:
                os.remove(f)
            except OSError:
                pass


def is_packed(split_dir: str) -> bool:
    """Whether a folder is a packed split (complete or not): it has meta.json or shard files.
    Readers then go through read_meta, which explains an incomplete or unknown split."""
    return os.path.exists(os.path.join(split_dir, META_FILE)) or any(
        f.startswith("shard-") for f in os.listdir(split_dir))


def read_meta(split_dir: str) -> Dict[str, Any]:
    """Load and validate a split's meta.json, refusing incomplete or unknown-version splits."""
    if not os.path.isdir(split_dir):
        raise ShardError("%s does not exist or is not a folder" % split_dir)
    meta_path = os.path.join(split_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise ShardError(
            "%s has no %s: the split is incomplete (a pack was interrupted or is still running). "
            "Rerun tools/pack_imagenet.py with the same arguments to finish it."
            % (split_dir, META_FILE))
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as exc:
        raise ShardError("%s is not valid JSON (%s)" % (meta_path, exc)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ShardError("%s is not an %s meta file (format=%r)"
                         % (meta_path, FORMAT, meta.get("format") if isinstance(meta, dict) else None))
    if meta.get("version") != VERSION:
        raise ShardError(
            "%s has format version %r; this engine reads version %d. Repack the data with this "
            "engine's tools/pack_imagenet.py, or use the engine release that wrote it."
            % (meta_path, meta.get("version"), VERSION))
    for key in ("split", "num_samples", "classes", "shards"):
        if key not in meta:
            raise ShardError("%s lacks the required key %r" % (meta_path, key))
    return meta


# One open Environment per shard file per process: py-lmdb refuses a second open of the same
# file in one process, yet several readers (train + eval loaders, a verifier) may share a split.
_ENVS: Dict[str, lmdb.Environment] = {}
# Bumped by close_all_envs(); readers drop transactions from an older generation.
_GENERATION = 0


def open_env(path: str) -> lmdb.Environment:
    """The process-wide read-only Environment of a shard file (opened on first use)."""
    key = os.path.realpath(path)
    env = _ENVS.get(key)
    if env is None:
        # lock=False: nothing writes a published shard.
        try:
            env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=READAHEAD,
                            max_readers=1024, max_dbs=0)
        except lmdb.Error as exc:
            raise ShardError("%s cannot be opened as an LMDB shard (%s); repack the split, or "
                             "restage it from an intact copy" % (path, exc)) from None
        _ENVS[key] = env
    return env


def close_all_envs() -> None:
    """Close this process's environments; readers reopen them lazily on their next read.

    Called before forking workers, so that a child never inherits an open environment (LMDB
    forbids using one across fork, and py-lmdb would also refuse to reopen the file there).
    """
    global _GENERATION
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()
    _GENERATION += 1


class Split:
    """Random access to the records of a packed split by global index.

    Picklable and fork-safe: environments are opened lazily in whichever process reads.
    """

    def __init__(self, split_dir: str):
        self.root = os.path.abspath(split_dir)
        self.meta = read_meta(self.root)
        self.classes: List[str] = list(self.meta["classes"])
        self.files = [os.path.join(self.root, s["file"]) for s in self.meta["shards"]]
        self.offsets = [0]
        for s in self.meta["shards"]:
            self.offsets.append(self.offsets[-1] + int(s["num_samples"]))
        if self.offsets[-1] != self.meta["num_samples"]:
            raise ShardError("%s: shards hold %d records but num_samples is %d"
                             % (self.root, self.offsets[-1], self.meta["num_samples"]))
        missing = [f for f in self.files if not os.path.exists(f)]
        if missing:
            raise ShardError("%s lists %d shard file(s) that are missing, e.g. %s"
                             % (self.root, len(missing), missing[0]))
        for f in self.files:  # a truncated shard would crash the reader with SIGBUS later
            check_shard_file(f)
        self._txns: Dict[int, Any] = {}
        self._pid: Optional[int] = None
        self._gen: Optional[int] = None

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_txns"], state["_pid"], state["_gen"] = {}, None, None
        return state

    def _txn(self, shard: int):
        if self._pid != os.getpid() or self._gen != _GENERATION:
            self._txns, self._pid, self._gen = {}, os.getpid(), _GENERATION
        txn = self._txns.get(shard)
        if txn is None:
            # A long-lived read transaction on a read-only, never-modified file: no reader
            # table, no snapshot to pin, so it is kept for the life of the reader.
            txn = open_env(self.files[shard]).begin(buffers=True)
            self._txns[shard] = txn
        return txn

    def locate(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError("record %d out of range (split has %d)" % (index, len(self)))
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def get(self, index: int) -> Dict[str, Any]:
        """The record as a dict ('image' is bytes)."""
        shard, local = self.locate(index)
        value = self._txn(shard).get(record_key(local))
        if value is None:
            raise ShardError("%s: record %d missing from %s" % (self.root, local, self.files[shard]))
        return unpack_record(value)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for i in range(len(self)):
            yield self.get(i)
