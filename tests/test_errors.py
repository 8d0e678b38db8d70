"""engine.errors.describe_exit: one sentence for how a child process ended, as the loader's and
the packer's messages give it."""
import multiprocessing as mp
import os
import signal

from engine.errors import describe_exit


def _sleep():
    import time

    time.sleep(60)


def test_a_real_sigkill_reads_as_killed_with_the_usual_cause():
    proc = mp.get_context("fork").Process(target=_sleep)
    proc.start()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    msg = describe_exit(proc.exitcode)
    assert msg.startswith("was killed by signal 9 and exited unexpectedly with code -9 "
                          "(SIGKILL: usually the out-of-memory killer")


def test_other_endings():
    assert describe_exit(3) == "exited unexpectedly with code 3"
    assert describe_exit(-signal.SIGBUS).endswith("check the data with tools/verify_pack.py)")
    assert describe_exit(-signal.SIGUSR1) == ("was killed by signal %d and exited unexpectedly "
                                              "with code -%d (SIGUSR1)"
                                              % (signal.SIGUSR1, signal.SIGUSR1))
    assert describe_exit(-99) == "was killed by signal 99 and exited unexpectedly with code -99"
    assert describe_exit(None) == "stopped answering but has not exited"
