"""The on-disk shard contract (versions 1 and 2): the only module that knows the byte layout.

    <out>/<split>/meta.json          written last, atomically; a split without it is incomplete
    <out>/<split>/shard-NNNNN.lmdb   an LMDB environment opened with subdir=False

Record i of a shard: key struct.pack(">Q", i) for i in 0..num_samples-1; value a msgpack map with
at least "label" (int), "height", "width" (ints of the stored image), "path" (source path
relative to the split folder), and either "image" (JPEG bytes that libjpeg-turbo decodes to 3
channels) or, in version 2 only, "raw" (height * width * 3 bytes of uint8 BGR pixels, HxWx3
row-major: the image's full decode, so that the loader skips decoding; `record_image`).
A split is version 1 when every record is a JPEG (what older readers read, unchanged) and
version 2 when it holds raw records, which its meta.json counts ("raw_records"). Readers of
version 1 refuse version 2 by its number; a raw record has no "image", so even a reader that
skipped the check cannot take its pixels for a JPEG.
The global index of a record is its shard's offset (running sum of num_samples in meta order)
plus its index in the shard. Readers may rely on nothing else; more meta keys may be added.

Opening a split (`read_meta`, `Split`) checks that its meta.json describes the folder it is in,
before any record is read: the split name agrees with a folder named after a split, every
listed shard file is there with the size meta.json records (packs written before sizes were
recorded are checked against their LMDB header only), no unlisted shard file lies beside them,
and each shard's LMDB header is intact and holds the record count meta.json gives. All of it
costs a stat and two page reads per shard; the checksums are for tools/verify_pack.py.

Writing a shard file durably (commits in parts, write-back, the atomic publish) is
engine.data.shard_writer's, through `record_key` here.
"""
from __future__ import annotations

import bisect
import json
import os
import re
import struct
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Union

import lmdb
import msgpack
import numpy as np

from engine.atomic import atomic_write
from engine.data.checksum import CHECKSUM_ALGO, file_checksum
from engine.errors import UserError, read_error_message

__all__ = [
    "FORMAT", "VERSION", "JPEG_VERSION", "RAW_VERSION", "VERSIONS", "META_FILE", "ShardError",
    "shard_name", "record_key", "pack_record", "pack_raw_record", "unpack_record", "is_raw",
    "record_image", "raw_problem", "check_version", "write_json_atomic", "read_json", "is_packed",
    "read_meta", "open_env", "close_all_envs", "Split", "CHECKSUM_ALGO", "file_checksum",
    "check_shard_file", "check_shard", "check_listing", "unlisted_shards", "SPLITS",
]

FORMAT = "engine-lmdb-shards"
# A split of JPEG records only is version 1 (byte for byte what engines before version 2 wrote
# and read); one holding raw-pixel records is version 2. This engine reads both.
JPEG_VERSION = 1
RAW_VERSION = 2
VERSION = RAW_VERSION  # the newest version this engine reads and writes
VERSIONS = (JPEG_VERSION, RAW_VERSION)
META_FILE = "meta.json"
# The splits the packer writes, each into a folder of that name.
SPLITS = ("train", "val")
_SHARD_FILE = re.compile(r"shard-\d{5}\.lmdb$")
# OS readahead on shard files. LMDB's "no readahead" advises the kernel that access is random,
# so each 4 KB page of a ~110 KB record then faults in with its own disk read; with readahead a
# record comes in one read. From a cold page cache that made whole epochs 1.7-2.4x faster
# (bench_loader.py --cold); with a warm cache the two are the same.
READAHEAD = True
# LMDB's meta pages (pages 0 and 1) on a 64-bit build: a 16-byte page header, then MDB_meta =
# magic u32, version u32, address ptr, mapsize size_t, two MDB_db (48 bytes each; the free DB's
# md_pad holds the page size, the main DB's md_entries at byte 32 its record count), last used
# page number, transaction id.
_MDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II QQ I12x32x 32xQ8x QQ")
_META_AT = 16


class ShardError(UserError, RuntimeError):
    """A split folder that is missing, incomplete or of a format this reader does not know."""


def shard_name(index: int) -> str:
    return "shard-%05d.lmdb" % index


def record_key(i: int) -> bytes:
    return struct.pack(">Q", i)


# msgpack's encoding of a 5-entry map's header and of its first key, "image"
_RECORD_HEAD = b"\x85" + msgpack.packb("image")


def pack_record(image: bytes, label: int, height: int, width: int, path: str,
                **extra: Any) -> bytes:
    rec = {"image": image, "label": int(label), "height": int(height), "width": int(width),
           "path": path}
    n = len(image)
    if extra or type(image) is not bytes or n >= 1 << 32:
        rec.update(extra)
        return msgpack.packb(rec, use_bin_type=True)
    # The same bytes as msgpack.packb(rec, use_bin_type=True) (tests/test_shards_bytes.py checks),
    # with the image copied once: packb copies it into its buffer, then into the result.
    del rec["image"]
    tail = msgpack.packb(rec, use_bin_type=True)[1:]  # the other 4 entries, less their header
    if n < 1 << 8:
        head = b"\xc4" + struct.pack(">B", n)
    elif n < 1 << 16:
        head = b"\xc5" + struct.pack(">H", n)
    else:
        head = b"\xc6" + struct.pack(">I", n)
    return b"".join((_RECORD_HEAD, head, image, tail))


def pack_raw_record(pixels: np.ndarray, label: int, path: str, **extra: Any) -> bytes:
    """A version-2 record of uint8 BGR pixels (HxWx3); its height and width are the array's."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError("raw records hold uint8 HxWx3 pixels, not %s %s" % (pixels.dtype, pixels.shape))
    rec = {"raw": np.ascontiguousarray(pixels).tobytes(), "label": int(label),
           "height": int(pixels.shape[0]), "width": int(pixels.shape[1]), "path": path}
    rec.update(extra)
    return msgpack.packb(rec, use_bin_type=True)


def unpack_record(value) -> Dict[str, Any]:
    return msgpack.unpackb(value, raw=False)


def is_raw(rec: Mapping[str, Any]) -> bool:
    """Whether an unpacked record holds raw pixels (version 2) rather than JPEG bytes."""
    return "raw" in rec


def raw_problem(rec: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with a raw record's pixels and shape (None: they agree)."""
    h, w, data = rec.get("height"), rec.get("width"), rec.get("raw")
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        return "raw record with shape %rx%r" % (h, w)
    if not isinstance(data, bytes) or len(data) != h * w * 3:
        return "raw pixels are %s bytes, but %dx%dx3 needs %d" % (
            len(data) if isinstance(data, bytes) else type(data).__name__, h, w, h * w * 3)
    return None


def record_image(rec: Mapping[str, Any]) -> Union[bytes, np.ndarray]:
    """A record's image: JPEG bytes, or for a raw record its pixels as a read-only uint8
    HxWx3 BGR array over the record's bytes (no copy). ShardError if a raw record's byte
    count does not match its shape."""
    if "raw" not in rec:
        return rec["image"]
    problem = raw_problem(rec)
    if problem:
        raise ShardError("%s (%s); check the pack with tools/verify_pack.py" % (problem, rec.get("path")))
    return np.frombuffer(rec["raw"], np.uint8).reshape(rec["height"], rec["width"], 3)


def check_version(meta: Mapping[str, Any], meta_path: str,
                  readable: Sequence[int] = VERSIONS) -> None:
    """Raise ShardError unless meta.json's version is one of `readable` (this engine's)."""
    version = meta.get("version")
    if version in readable:
        raw = meta.get("raw_records", 0)
        if not isinstance(raw, int) or raw < 0 or (raw > 0) != (version == RAW_VERSION):
            # A version names the record kinds a split holds: version 2 exactly when raw ones.
            raise ShardError("%s has format version %r with raw_records %r, but version %d is "
                             "that of splits with raw-pixel records, %d of those without: "
                             "meta.json was edited or damaged; %s" % (
                                 meta_path, version, raw, RAW_VERSION, JPEG_VERSION,
                                 _fix(os.path.dirname(os.path.abspath(meta_path)))))
        return
    reads = "version%s %s" % ("s" if len(readable) > 1 else "", ", ".join(map(str, sorted(readable))))
    if isinstance(version, int) and version > max(readable):
        raise ShardError(
            "%s has format version %d, made by a newer engine; this engine reads %s. Upgrade "
            "the engine to read it, or repack the data with this engine's tools/pack_imagenet.py"
            % (meta_path, version, reads))
    raise ShardError(
        "%s has format version %r; this engine reads %s. Repack the data with this engine's "
        "tools/pack_imagenet.py, or use the engine release that wrote it."
        % (meta_path, version, reads))


def _fix(split_dir: str) -> str:
    """What repairs a split whose files are not what its meta.json says: a rerun of the packer
    would find the split complete and change nothing, so it has to go first."""
    return ("if %s is a staged copy, stage it again (tools/stage_shards.py), otherwise delete it "
            "and repack it (tools/pack_imagenet.py)" % split_dir)


def _unreadable(path: str, exc: OSError) -> ShardError:
    """A shard file that could not be stat'ed or read: missing (a real problem of the split), or
    refused by the file system (permissions, a stale mount, a disk error), which says nothing
    about the bytes."""
    if isinstance(exc, FileNotFoundError):
        return ShardError("%s is missing; %s" % (path, _fix(os.path.dirname(os.path.abspath(path)))))
    if isinstance(exc, PermissionError):
        return ShardError(read_error_message(exc, path))
    return ShardError("cannot read %s (%s); check that the file is readable (its permissions, its "
                      "mount, its disk)" % (path, exc.strerror or exc))


def check_shard_file(path: str) -> int:
    """The number of records `path` holds by its LMDB header; ShardError unless it is an LMDB
    file at least as long as that header says.

    The reader maps shards into memory, and touching a page past the end of a truncated file
    kills the process with SIGBUS instead of raising; LMDB itself does not compare the file size
    with its last page number, so this check must come before any read.
    """
    fix = _fix(os.path.dirname(os.path.abspath(path)))
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_META_AT + _META.size)
            if len(head) < _META_AT + _META.size:
                raise ShardError("%s is truncated (%d bytes, shorter than an LMDB header); %s"
                                 % (path, size, fix))
            magic, _v, _addr, _mapsize, psize, entries0, last0, txn0 = _META.unpack_from(
                head, _META_AT)
            if magic != _MDB_MAGIC or psize < 512 or psize & (psize - 1):
                raise ShardError("%s is not an LMDB shard (damaged or overwritten); %s"
                                 % (path, fix))
            f.seek(psize)
            second = f.read(_META_AT + _META.size)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    last, entries = last0, entries0
    if len(second) == _META_AT + _META.size:
        magic1, _v, _a, _m, _p, entries1, last1, txn1 = _META.unpack_from(second, _META_AT)
        if magic1 == _MDB_MAGIC and txn1 > txn0:  # LMDB uses the meta page of the newer txn
            last, entries = last1, entries1
    need = (last + 1) * psize
    if size < need:
        raise ShardError("%s is truncated: %d bytes, but its LMDB header needs %d; %s"
                         % (path, size, need, fix))
    return entries


def check_shard(split_dir: str, entry: Mapping[str, Any]) -> None:
    """Raise ShardError unless the shard meta.json's `entry` describes is in `split_dir` with the
    recorded size, an intact LMDB header and the recorded number of records.

    The size catches a shard replaced by another with the same record count (another split's,
    another pack's) without reading it; entries of packs from before sizes were recorded have
    none, and are checked against their header alone.
    """
    path = os.path.join(split_dir, entry["file"])
    if not os.path.lexists(path):
        raise ShardError("%s lists %s, which is missing; %s"
                         % (os.path.join(split_dir, META_FILE), path, _fix(split_dir)))
    records = check_shard_file(path)  # first: it names a truncation as such
    try:
        size = os.path.getsize(path)
    except OSError as exc:  # gone or unreadable since: say so rather than raise it raw
        raise _unreadable(path, exc) from None
    if "size" in entry and size != entry["size"]:
        raise ShardError("%s is %d bytes, but meta.json records %s: it was truncated or replaced "
                         "by another file after packing; %s"
                         % (path, size, entry["size"], _fix(split_dir)))
    if records != int(entry["num_samples"]):
        raise ShardError("%s holds %d records, but meta.json says %d: the file was replaced or "
                         "meta.json edited; %s"
                         % (path, records, entry["num_samples"], _fix(split_dir)))


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never a part."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in `path`, or None if it is absent or unreadable (a partial file)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_packed(split_dir: str) -> bool:
    """Whether a folder is a packed split (complete or not): it has meta.json or shard files.
    Readers then go through read_meta, which explains an incomplete or unknown split."""
    if os.path.exists(os.path.join(split_dir, META_FILE)):
        return True
    try:
        return any(f.startswith("shard-") for f in os.listdir(split_dir))
    except PermissionError as exc:  # another user's folder: say so, not a traceback
        raise ShardError(read_error_message(exc, split_dir)) from None


def read_meta(split_dir: str, check_files: bool = True) -> Dict[str, Any]:
    """Load and validate a split's meta.json, refusing incomplete or unknown-version splits and
    a meta.json that does not belong to this folder (another split's, another pack's: see
    check_listing). With `check_files` (the default) every shard is also checked as
    `check_shard` does, so what is returned describes the files beside it."""
    if not os.path.isdir(split_dir):
        raise ShardError("%s does not exist or is not a folder" % split_dir)
    meta_path = os.path.join(split_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise ShardError(
            "%s has no %s: the split is incomplete (a pack or a stage was interrupted or is "
            "still running). Rerun the tools/pack_imagenet.py (or tools/stage_shards.py) command "
            "that made it, with the same arguments, to finish it." % (split_dir, META_FILE))
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as exc:
        raise ShardError("%s is not valid JSON (%s)" % (meta_path, exc)) from None
    except OSError as exc:
        raise ShardError(read_error_message(exc, meta_path)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ShardError("%s is not an %s meta file (format=%r)"
                         % (meta_path, FORMAT, meta.get("format") if isinstance(meta, dict) else None))
    check_version(meta, meta_path)
    for key in ("split", "num_samples", "classes", "shards"):
        if key not in meta:
            raise ShardError("%s lacks the required key %r" % (meta_path, key))
    check_listing(split_dir, meta)
    if check_files:
        for entry in meta["shards"]:
            check_shard(split_dir, entry)
    return meta


def unlisted_shards(split_dir: str, meta: Mapping[str, Any]) -> List[str]:
    """Names of the shard files in `split_dir` that `meta` does not list, sorted."""
    listed = {e["file"] for e in meta["shards"]}
    return sorted(f for f in os.listdir(split_dir) if _SHARD_FILE.match(f) and f not in listed)


def check_listing(split_dir: str, meta: Mapping[str, Any]) -> None:
    """Raise ShardError unless `meta` is this folder's own: the split it names is the folder's
    (where the folder is named after a split, as the packer names them), it lists each shard
    once, by a plain name in this folder, its counts add up, and the folder holds no shard file
    it leaves out. Per-shard checks see only the shards a meta.json lists: these say that a
    train/ opened with val's meta.json would read 2 of its shards and ignore the rest."""
    root = os.path.abspath(split_dir)
    meta_path = os.path.join(root, META_FILE)
    entries = meta["shards"]
    bad = [e for e in entries if not isinstance(e, dict) or not isinstance(e.get("file"), str)
           or not isinstance(e.get("num_samples"), int) or e["num_samples"] < 0] \
        if isinstance(entries, list) else [entries]
    if bad or not isinstance(meta["num_samples"], int):
        raise ShardError("%s is malformed: 'shards' must list {file, num_samples, ...} entries "
                         "and 'num_samples' be a count (got %.80r); %s"
                         % (meta_path, bad[0] if bad else meta["num_samples"], _fix(root)))
    what = "split %r, %d records in %d shards" % (meta["split"], meta["num_samples"], len(entries))
    folder = os.path.basename(root)
    if folder in SPLITS and meta["split"] != folder:
        raise ShardError("%s is the %s split's (%d records in %d shards), not %s's: another "
                         "split's meta.json was put here; %s"
                         % (meta_path, meta["split"], meta["num_samples"], len(entries), folder,
                            _fix(root)))
    seen: Set[str] = set()
    for name in (e["file"] for e in entries):  # plain names: nothing outside this folder is read
        if os.path.basename(name) != name or name.startswith(".") or name in seen:
            raise ShardError("%s lists %r, which is not a plain file name of its folder, or lists "
                             "it twice; %s" % (meta_path, name, _fix(root)))
        seen.add(name)
    total = sum(e["num_samples"] for e in entries)
    if total != meta["num_samples"]:
        raise ShardError("%s: shards hold %d records but num_samples is %d; %s"
                         % (meta_path, total, meta["num_samples"], _fix(root)))
    extra = unlisted_shards(root, meta)
    if extra:
        raise ShardError("%s holds %d shard file(s) its meta.json (%s) does not list, e.g. %s: "
                         "meta.json belongs to another split or pack; %s"
                         % (root, len(extra), what, extra[0], _fix(root)))


# One open Environment per shard file per process: py-lmdb refuses a second open of the same
# file in one process, yet several readers (train + eval loaders, a verifier) may share a split.
# Keyed as py-lmdb keys its guard, by the file's identity (device, inode), so that two paths to
# one file (a hard-linked copy, a symlink) share the Environment instead of tripping the guard.
_ENVS: Dict[Any, lmdb.Environment] = {}
# Bumped by close_all_envs(); readers drop transactions from an older generation.
_GENERATION = 0
# Shard files this process has checked since the last close_all_envs (Split._txn).
_CHECKED: Set[str] = set()
# py-lmdb's errors that mean the file's bytes are not a (readable) LMDB environment.
_DAMAGED = (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError,
            lmdb.PageNotFoundError, lmdb.BadChecksumError, lmdb.IncompatibleError,
            lmdb.PanicError)


def open_env(path: str) -> lmdb.Environment:
    """The process-wide read-only Environment of a shard file (opened on first use)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    key = (st.st_dev, st.st_ino)
    env = _ENVS.get(key)
    if env is None:
        # lock=False: nothing writes a published shard.
        try:
            env = lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=READAHEAD,
                            max_readers=1024, max_dbs=0)
        except lmdb.Error as exc:
            raise ShardError(_open_error(path, exc)) from None
        _ENVS[key] = env
    return env


def _open_error(path: str, exc: lmdb.Error) -> str:
    """What a refused lmdb.open means, and its true remedy."""
    if "already open in this process" in str(exc):
        # py-lmdb's guard: LMDB's locks belong to the (process, file) pair, so it allows one
        # Environment per file per process. A fork copies the guard, so a worker is refused too
        # when its parent held an Environment of its own when it started the workers.
        return ("%s is already open in this process through an lmdb.Environment the engine did "
                "not open (py-lmdb allows one per file per process, and a forked worker "
                "inherits its parent's): the data is fine. Close that Environment before "
                "reading the split with the engine, or get it from "
                "engine.data.shards.open_env(path), which shares one per file" % path)
    if isinstance(exc, _DAMAGED):
        return ("%s cannot be opened as an LMDB shard (%s): the file is damaged or not a shard; "
                "%s" % (path, exc, _fix(os.path.dirname(os.path.abspath(path)))))
    # Out of memory or address space, too many open files, permissions: the bytes may be fine.
    return ("%s cannot be opened as an LMDB shard (%s); this is a problem of the process or the "
            "system, not a sign of damage by itself (tools/verify_pack.py %s checks the data)"
            % (path, exc, os.path.dirname(os.path.abspath(path))))


def close_all_envs() -> None:
    """Close this process's environments; readers reopen them lazily on their next read.

    Called before forking workers, so that a child never inherits an open environment (LMDB
    forbids using one across fork, and py-lmdb would also refuse to reopen the file there).
    """
    global _GENERATION
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()
    _CHECKED.clear()
    _GENERATION += 1


class Split:
    """Random access to the records of a packed split by global index.

    Picklable and fork-safe: environments are opened lazily in whichever process reads. Opening
    refuses a split whose files are not what its meta.json says (read_meta); each process
    checks a shard again (a stat and two page reads) when it first opens it, so a shard replaced
    or truncated after the split was opened is refused too rather than read or crashed on.
    """

    def __init__(self, split_dir: str):
        self.root = os.path.abspath(split_dir)
        self.meta = read_meta(self.root)
        self.classes: List[str] = list(self.meta["classes"])
        self.files = [os.path.join(self.root, s["file"]) for s in self.meta["shards"]]
        self.offsets = [0]
        for s in self.meta["shards"]:
            self.offsets.append(self.offsets[-1] + int(s["num_samples"]))
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
            if self.files[shard] not in _CHECKED:  # once per process and generation
                check_shard(self.root, self.meta["shards"][shard])
                _CHECKED.add(self.files[shard])
            txn = open_env(self.files[shard]).begin(buffers=True)
            self._txns[shard] = txn
        return txn

    def locate(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError("record %d out of range (split has %d)" % (index, len(self)))
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def get(self, index: int) -> Dict[str, Any]:
        """The record as a dict ('image' is JPEG bytes, or 'raw' pixel bytes: record_image)."""
        shard, local = self.locate(index)
        value = self._txn(shard).get(record_key(local))
        if value is None:
            raise ShardError("%s: record %d missing from %s" % (self.root, local, self.files[shard]))
        return unpack_record(value)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for i in range(len(self)):
            yield self.get(i)
