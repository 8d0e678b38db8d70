"""The packer's worker pool: a worker takes the next shard when its job is done, a worker
lost at any job is still an error naming that job's shard, and one lost while idle names none."""
import multiprocessing as mp
import os
import signal
import threading
import time

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


def _quick_or_waits(job, records_done):
    """Job 0 returns at once (its worker then sits idle); job 1 waits until told to go."""
    with open(os.path.join(job["dst"], "pid-%d" % job["k"]), "w") as f:
        f.write(str(os.getpid()))
    go = os.path.join(job["dst"], "go")
    end = time.monotonic() + 60
    while job["k"] == 1 and not os.path.exists(go) and time.monotonic() < end:
        time.sleep(0.01)
    return {"k": job["k"]}


def test_an_idle_worker_killed_does_not_name_its_finished_shard_as_lost(tmp_path):
    """Two workers, two jobs: job 0's worker finishes and sits idle while job 1 runs; killed
    then, it lost nothing, and the error must not send the user after shard 0."""
    def kill_the_idle_one():
        pid_file = tmp_path / "pid-0"
        end = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(1.0)  # job 0 returned right after writing its pid; its "ok" is in by now
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_idle_one)
    killer.start()
    try:
        with pytest.raises(PackError) as err:
            pool.run(_quick_or_waits, _jobs(tmp_path, 2), 2, _counter(), lambda: None)
    finally:
        (tmp_path / "go").touch()
        killer.join()
    text = str(err.value)
    assert text.startswith("an idle packing worker (its last shard, %s/shard-00000.lmdb, is "
                           "finished and kept)" % tmp_path.name), text
    assert "the worker packing" not in text
    assert "killed by signal 9" in text and "Rerun the same command to resume" in text
