"""engine.dist.ranks without GPUs: a rank's error reaches the parent as one line."""
import pytest

from engine.dist.ranks import RankEntry, read_rank_error, run_ranks, write_rank_error
from engine.errors import UserError


def _fake_launcher(n, die_rank=None, bug=False):
    """A CPU stand-in for MegEngine's launcher (which needs GPUs): fork n processes running the
    entry, poll them, terminate the rest when one fails and raise its AssertionError."""
    import multiprocessing as mp

    def child(entry, rank):
        from engine.dist import group

        group.get_rank = lambda: rank  # what init_process_group provides in a real rank
        entry(rank)

    def start(entry):
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=child, args=(entry, r)) for r in range(n)]
        for p in procs:
            p.start()
        while True:
            for r, p in enumerate(procs):
                p.join(0.05)
                if p.exitcode not in (0, None):
                    for q in procs:
                        q.terminate()
                    raise AssertionError("subprocess %d exit with code %d" % (r, p.exitcode))
            if all(p.exitcode == 0 for p in procs):
                return ["result of rank %d" % r for r in range(n)]

    return start


def _work(rank):
    import time as _t

    if rank == 2:
        raise UserError("--data /x/train: shard-00003.lmdb is damaged;\n  repack it")
    _t.sleep(0.2)  # the other ranks are busy (in a real run: waiting in a collective)


def _buggy(rank):
    if rank == 1:
        raise ZeroDivisionError("division by zero in the step")


def test_rank_user_error_reaches_the_parent_as_one_line(capfd):
    with pytest.raises(UserError) as info:
        run_ranks(_fake_launcher(3), _work)
    assert str(info.value) == "rank 2: --data /x/train: shard-00003.lmdb is damaged; repack it"
    assert "Traceback" not in capfd.readouterr().err  # a user error is not a crash


def test_rank_bug_keeps_its_traceback_and_names_the_rank(capfd):
    with pytest.raises(RuntimeError, match="rank 1 failed with ZeroDivisionError: division by "
                                           "zero in the step"):
        run_ranks(_fake_launcher(2), _buggy)
    assert "Traceback" in capfd.readouterr().err


def test_run_ranks_passes_results_through():
    assert run_ranks(_fake_launcher(2), lambda rank: None) == ["result of rank 0",
                                                               "result of rank 1"]


def test_rank_entry_and_error_files(tmp_path):
    entry = RankEntry(lambda: (_ for _ in ()).throw(UserError("bad\nflag")), str(tmp_path))
    with pytest.raises(SystemExit) as info:
        entry()
    assert info.value.code == 2
    assert read_rank_error(str(tmp_path)) == (0, "user", "bad flag")
    # the earliest failure wins, whatever the rank numbers
    write_rank_error(str(tmp_path), 5, "user", "later")
    assert read_rank_error(str(tmp_path))[2] == "bad flag"
    assert read_rank_error(str(tmp_path / "none")) is None
    interrupted = RankEntry(lambda: (_ for _ in ()).throw(KeyboardInterrupt()), str(tmp_path))
    with pytest.raises(SystemExit) as info:
        interrupted()
    assert info.value.code == 130
