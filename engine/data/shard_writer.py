"""Writing one shard: records appended in key order, committed in parts, written back to disk
in the background while the packer goes on, and the file published complete (and only then)
under its final name. The record keys and values are shards.py's; this module owns how a shard
file comes to exist on disk durably, so that a file named shard-NNNNN.lmdb is always complete.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import lmdb

from engine.atomic import fsync_dir
from engine.data.shards import file_checksum, record_key

__all__ = ["ShardWriter", "MAP_SIZE", "COMMIT_EVERY", "COMMIT_BYTES"]

# Address space reserved for a shard being written. LMDB grows the file only as pages are
# written, so this costs nothing; it merely has to exceed any shard's size.
MAP_SIZE = 1 << 40
COMMIT_EVERY = 512
# ShardWriter also commits after this many bytes of records, so that the disk writes a shard
# in parts while it is being packed (see ShardWriter).
COMMIT_BYTES = 1 << 20

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
        env, write_back = None, None
        try:
            # lock=False: one writer per file by construction, and no -lock file left behind.
            # mode 0666: the umask decides, as for any other file (LMDB's default is 0755).
            env = lmdb.open(self.tmp_path, subdir=False, map_size=MAP_SIZE, lock=False,
                            readahead=False, meminit=False, max_dbs=0, mode=0o666,
                            sync=False, metasync=False)
            write_back = _WriteBack(self.tmp_path)
            self._txn = env.begin(write=True)
        except BaseException:  # a full disk can strike once the file exists: leave none behind
            if write_back is not None:
                write_back.close()
            if env is not None:
                env.close()
            self._remove_files()
            raise
        self._env, self._write_back = env, write_back
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
        self._remove_files()

    def _remove_files(self) -> None:
        for f in (self.tmp_path, self.tmp_path + "-lock"):
            try:
                os.remove(f)
            except OSError:
                pass
