"""shard_writer.ShardWriter: records committed in parts and written back in the background, the file
published complete (and only then) by close(), whose checksum is the file's."""
import os

import lmdb

from engine.data import shard_writer, shards


def _values(n: int, size: int):
    return [shards.pack_record(bytes([i % 251]) * size, i, 1, 1, "c/%d.JPEG" % i) for i in range(n)]


def test_many_commits_then_close_publishes_every_record_with_its_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_writer, "COMMIT_BYTES", 64 << 10)  # a commit (and write-back) every ~3 records
    path = str(tmp_path / shards.shard_name(0))
    values = _values(40, 20_000)
    w = shard_writer.ShardWriter(path)
    for v in values:
        w.append(v)
    assert not os.path.exists(path) and os.path.exists(w.tmp_path)  # not published before close
    digest = w.close(checksum=True)
    assert digest == shards.file_checksum(path) and not os.path.exists(w.tmp_path)
    shards.check_shard_file(path)
    env = lmdb.open(path, subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        assert env.stat()["entries"] == len(values)
        assert [txn.get(shards.record_key(i)) for i in range(len(values))] == values
    env.close()


def test_close_without_checksum_and_abort(tmp_path):
    path = str(tmp_path / shards.shard_name(1))
    w = shard_writer.ShardWriter(path)
    w.append(_values(1, 10)[0])
    assert w.close() is None and os.path.exists(path)
    w = shard_writer.ShardWriter(str(tmp_path / shards.shard_name(2)))
    for v in _values(30, 200_000):  # past COMMIT_BYTES: a write-back may be running
        w.append(v)
    w.abort()
    assert sorted(os.listdir(tmp_path)) == [shards.shard_name(1)]


def test_a_writer_that_fails_once_its_file_exists_leaves_no_file(tmp_path, monkeypatch):
    """A full disk can strike after LMDB has created the temp file (here: where the write-back
    opens it): the writer removes what it made, so a failed pack leaves no partial shard."""
    import errno

    import pytest

    def full(path):
        assert os.path.exists(path)  # the file LMDB made
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(shard_writer, "_WriteBack", full)
    with pytest.raises(OSError, match="No space left"):
        shard_writer.ShardWriter(str(tmp_path / "shard-00000.lmdb"))
    assert os.listdir(tmp_path) == []
