"""The packer's worker pool: a worker takes the next shard when its job is done, and a worker
lost at any job is still an error naming that job's shard."""
import multiprocessing as mp
import os
import signal

import pytest

from engine.data import pool
from engine.data.plan import PackError


def _pid(job, records_done):
    records_done()
    return {"k": job["k"], "pid": os.getpid()}


def _dies_at_3(job, records_done):
    if job["k"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"k": job["k"]}


def _refuses_2(job, records_done):
    if job["k"] == 2:
        raise PackError("job 2 refused")
    return {"k": job["k"]}


def _jobs(tmp_path, n):
    return [{"k": k, "dst": str(tmp_path)} for k in range(n)]


def _counter():
    return mp.get_context("fork").Value("q", 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_take_the_next_shard(tmp_path, workers):
    markers = pool.run(_pid, _jobs(tmp_path, 12), workers, _counter(), lambda: None)
    assert sorted(markers) == list(range(12)) and all(m["k"] == k for k, m in markers.items())
    # at most 2 * workers processes (workers decoding, as many finishing), each reused
    assert len({m["pid"] for m in markers.values()}) <= 2 * workers
    assert os.getpid() not in {m["pid"] for m in markers.values()}


def test_a_reused_worker_killed_names_its_shard(tmp_path):
    with pytest.raises(PackError) as err:
        pool.run(_dies_at_3, _jobs(tmp_path, 6), 1, _counter(), lambda: None)
    text = str(err.value)
    assert "the worker packing %s/shard-00003.lmdb" % tmp_path.name in text
    assert "killed by signal 9" in text and "Rerun" in text


def test_a_reused_worker_refusing_a_job_is_that_error(tmp_path):
    with pytest.raises(PackError, match="job 2 refused"):
        pool.run(_refuses_2, _jobs(tmp_path, 5), 2, _counter(), lambda: None)
