"""The loader under faults and bad input: nothing crashes, hangs or leaks, and every error names
what went wrong. A crash or a hang is the failure here, so those cases run in a subprocess with
a deadline."""
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import psutil
import pytest

from helpers import ROOT, make_imagenet, write
from engine.data import Loader
from engine.data.pack import pack_imagenet
from engine.errors import ConfigError, DataError, UserError


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults") / "raw")
    make_imagenet(root, classes=3, train=12, val=3)
    out = str(tmp_path_factory.mktemp("faults") / "packed")
    pack_imagenet(root, out, workers=1, shard_size=6, progress=False, log=lambda *a: None)
    return out


def run_script(body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    script = "import sys; sys.path.insert(0, %r)\n" % ROOT + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout)


def loader_children():
    return [c for c in psutil.Process().children(recursive=True)
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("how", ["after the loop", "after close", "after with",
                                 "after returning from the loop"])
def test_a_kept_batch_stays_readable(packed, how):
    """Batch views kept past the loop, close() or `with` keep the ring mapped: no segfault."""
    r = run_script("""
        import numpy as np
        from engine.data import Loader
        split = %r
        how = %r
        def take():
            ld = Loader(split, batch_size=4, train=True, workers=2, image_size=32)
            for x, y in ld:
                return x
        if how == "after returning from the loop":
            kept = [take()]
        elif how == "after with":
            with Loader(split, batch_size=4, train=True, workers=2, image_size=32) as ld:
                kept = [x for x, y in ld]
        else:
            ld = Loader(split, batch_size=4, train=True, workers=2, image_size=32)
            kept = [x for x, y in ld]
            if how == "after close":
                ld.close()
                del ld
        import gc; gc.collect()
        print("sum", sum(int(k.sum()) for k in kept))
    """ % (os.path.join(packed, "train"), how))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert int(r.stdout.split()[-1]) > 0


def test_a_shard_truncated_under_a_running_loader_names_the_cause_and_the_shard(packed,
                                                                                tmp_path):
    """Workers map shard files; one cut short under them dies of SIGBUS (or, for a shard it
    opens afterwards, the reader's size check refuses it): either way the error names the
    shard and says what to do, and nothing is left running."""
    split = str(tmp_path / "train")
    shutil.copytree(os.path.join(packed, "train"), split)
    ld = Loader(split, batch_size=4, train=True, workers=2, image_size=32, seed=1)
    for _ in ld:  # a whole epoch: the workers have opened (mapped) most shards
        pass
    for f in os.listdir(split):
        if f.endswith(".lmdb"):
            os.truncate(os.path.join(split, f), 8192)  # meta pages kept, data pages gone
    with pytest.raises((RuntimeError, UserError)) as e:
        for _ in range(3):
            for _ in ld:
                pass
    msg = str(e.value)
    assert "Traceback" not in msg and re.search(r"shard-\d+\.lmdb", msg), msg
    assert re.search(r"SIGBUS|truncated", msg), msg
    assert not ld._procs and not loader_children()


def test_a_stopped_worker_is_reported_by_the_watchdog(packed):
    ld = Loader(os.path.join(packed, "train"), batch_size=4, train=True, workers=2,
                image_size=32, timeout=2)
    it = iter(ld)
    next(it)
    victim = ld._procs[0]
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"worker 0 \(pid %d\) made no progress for \d+ s "
                                               r"\(it is stopped" % victim.pid):
            for _ in range(20):  # several epochs: the stopped worker holds chunks in each
                for _ in it:
                    pass
                it = iter(ld)
        assert time.monotonic() - t0 < 30  # a deadline, not a benchmark: the old loader hung
    finally:
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)
    assert not ld._procs and not loader_children()  # close() killed the stopped worker too


def test_a_killed_worker_is_reported_at_once_and_close_does_not_wait_on_it(packed):
    """Per-worker pipes: a worker killed mid-chunk holds no lock the others or close() need."""
    ld = Loader(os.path.join(packed, "train"), batch_size=8, train=True, workers=2,
                image_size=64)
    it = iter(ld)
    next(it)
    os.kill(ld._procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker 1 .*exited unexpectedly with code -9 "
                                           r"\(SIGKILL: usually the out-of-memory killer"):
        for _ in range(20):
            for _ in it:
                pass
            it = iter(ld)
    assert time.monotonic() - t0 < 3  # the old queue-based loader took 5.2 s here
    ld2 = Loader(os.path.join(packed, "train"), batch_size=8, train=True, workers=2,
                 image_size=64)
    next(iter(ld2))
    os.kill(ld2._procs[0].pid, signal.SIGKILL)
    t0 = time.monotonic()
    ld2.close()
    assert time.monotonic() - t0 < 3
    assert not loader_children()


@pytest.mark.parametrize("slots", [2, 3])
def test_the_smallest_rings_never_deadlock(packed, slots):
    r = run_script("""
        from engine.data import Loader
        ld = Loader(%r, batch_size=3, train=True, workers=2, image_size=32, slots=%d)
        n = sum(1 for _ in range(4) for _ in ld)
        print("batches", n, len(ld))
    """ % (os.path.join(packed, "train"), slots), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    n, per_epoch = map(int, r.stdout.split()[-2:])
    assert n == 4 * per_epoch


@pytest.mark.parametrize("kwargs, match", [
    (dict(slots=1), "slots must be an integer >= 2"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(image_size=4), "image_size must be an integer >= 8"),
    (dict(workers=-1), "workers must be an integer >= 0"),
    (dict(local_world_size=0), "local_world_size must be an integer >= 1"),
    (dict(timeout=0), "timeout must be > 0"),
])
def test_bad_arguments_are_refused_before_anything_starts(packed, kwargs, match):
    args = dict(batch_size=4, train=True)
    args.update(kwargs)
    before = loader_children()
    with pytest.raises(ConfigError, match=match):
        Loader(os.path.join(packed, "train"), **args)
    assert loader_children() == before


def test_a_file_where_a_folder_is_expected_says_so(packed, tmp_path):
    f = write(str(tmp_path / "train.tar"), b"not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        Loader(f, batch_size=2, train=True)
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        Loader(str(tmp_path / "nope"), batch_size=2, train=True)
    assert isinstance(e.value, UserError)


def test_a_split_of_garbage_keeps_its_error_type_through_a_worker(tmp_path):
    """A worker's user-facing error reaches the caller as the same exception, one line."""
    src = tmp_path / "train"
    for k in range(20):
        write(str(src / "n00000001" / ("%02d.JPEG" % k)), b"garbage %d" % k)
    for w in (0, 2):
        ld = Loader(str(src), batch_size=4, train=False, workers=w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the replacements before it
            with pytest.raises(DataError, match="16 consecutive records .* failed to decode"):
                for _ in ld:
                    pass
    assert not loader_children()


def test_break_and_restart_and_set_epoch_resume_the_exact_stream(packed):
    kw = dict(batch_size=4, train=True, image_size=32, seed=5)
    with Loader(os.path.join(packed, "train"), workers=0, **kw) as ref:
        e0 = [y.copy() for _, y in ref]
        ref.set_epoch(3)
        e3 = [y.copy() for _, y in ref]
    with Loader(os.path.join(packed, "train"), workers=2, **kw) as ld:
        got = []
        for i, (_, y) in enumerate(ld):
            got.append(y.copy())
            if i == 1:
                break
        got += [y.copy() for _, y in ld]  # continues after the break, nothing skipped
        assert len(got) == len(e0) and all(np.array_equal(a, b) for a, b in zip(got, e0))
        ld.set_epoch(3)  # the stream had run ahead into epoch 1: it restarts at epoch 3
        assert all(np.array_equal(a, y) for a, (_, y) in zip(e3, ld))
