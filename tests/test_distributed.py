"""engine.distributed without GPUs: launch resolution from flags / torchrun / Slurm variables
(fake environment dicts), and that the module imports without MegEngine."""
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.distributed import (Cluster, check_one_process_per_node, expand_nodelist,
                                is_loopback, resolve_cluster)
from engine.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- Slurm host lists

@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("node-[008-010]", ["node-008", "node-009", "node-010"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("x1,y[9-10],z", ["x1", "y9", "y10", "z"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu[a-b]", "gpu[5-3]", ""])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(UserError):
        expand_nodelist(bad)


def test_loopback_addresses():
    for a in ("localhost", "127.0.0.1", "127.0.1.1", "::1", "LOCALHOST"):
        assert is_loopback(a), a
    for a in ("10.0.0.1", "gpu01", "node-008.cluster", "192.168.1.5"):
        assert not is_loopback(a), a


# ------------------------------------------------------------------------------ resolution

SLURM = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
         "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "123456"}


def test_default_is_one_local_node():
    c = resolve_cluster({})
    assert c == Cluster(1, 0, "localhost", 0, None, "default")
    assert not c.multi_node


def test_slurm():
    c = resolve_cluster(SLURM)
    assert (c.num_nodes, c.node_rank, c.master_addr, c.gpus_per_node, c.source) == \
        (2, 1, "gpu07", 8, "slurm")
    # every node of the job derives the same port from the job id
    assert c.master_port == resolve_cluster({**SLURM, "SLURM_NODEID": "0"}).master_port
    assert 1024 < c.master_port < 65536
    assert resolve_cluster({**SLURM, "SLURM_JOB_ID": "123457"}).master_port != c.master_port


def test_slurm_gpu_count_falls_back_to_visible_devices():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_GPUS_ON_NODE"}
    assert resolve_cluster({**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}).gpus_per_node == 4
    assert resolve_cluster(env).gpus_per_node is None
    # the "8(x2)" form Slurm uses for per-node counts
    assert resolve_cluster({**SLURM, "SLURM_GPUS_ON_NODE": "8(x2)"}).gpus_per_node == 8


def test_torchrun_nnodes_node_rank():
    env = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500", "NNODES": "4", "NODE_RANK": "3"}
    assert resolve_cluster(env) == Cluster(4, 3, "10.1.2.3", 29500, None, "torchrun")


def test_torchrun_world_size_and_rank():
    # torchrun --nnodes 3 --nproc-per-node 1: one process per node, RANK is the node rank
    env = {"MASTER_ADDR": "m", "MASTER_PORT": "1234", "WORLD_SIZE": "3", "RANK": "2",
           "LOCAL_WORLD_SIZE": "1"}
    c = resolve_cluster(env)
    assert (c.num_nodes, c.node_rank) == (3, 2)
    # with several processes per node the node rank is RANK // LOCAL_WORLD_SIZE
    c = resolve_cluster({**env, "WORLD_SIZE": "16", "RANK": "13", "LOCAL_WORLD_SIZE": "8"})
    assert (c.num_nodes, c.node_rank) == (2, 1)
    with pytest.raises(UserError, match="not a multiple"):
        resolve_cluster({**env, "WORLD_SIZE": "10", "LOCAL_WORLD_SIZE": "4"})


def test_torchrun_variables_win_over_slurm():
    env = {**SLURM, "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "4000", "NNODES": "2",
           "NODE_RANK": "0"}
    c = resolve_cluster(env)
    assert (c.source, c.node_rank, c.master_addr, c.master_port) == ("torchrun", 0, "10.9.9.9", 4000)


def test_flags_win():
    c = resolve_cluster(SLURM, num_nodes=3, node_rank=2, master_ip="10.0.0.5", master_port=777,
                        ngpus=4)
    assert c == Cluster(3, 2, "10.0.0.5", 777, 4, "flags")
    # a flag for one field keeps the rest from the environment
    c = resolve_cluster(SLURM, master_port=9999)
    assert (c.source, c.node_rank, c.master_addr, c.master_port) == ("slurm", 1, "gpu07", 9999)
    assert resolve_cluster(SLURM, ngpus=2).gpus_per_node == 2


@pytest.mark.parametrize("env, flags, needle", [
    ({}, dict(num_nodes=2, node_rank=1, master_port=5), "needs the address of node 0"),
    ({}, dict(num_nodes=2, master_ip="localhost", master_port=5), "loopback"),
    ({}, dict(num_nodes=2, master_ip="127.0.0.1", master_port=5), "loopback"),
    ({"MASTER_ADDR": "127.0.1.1", "MASTER_PORT": "5", "NNODES": "2", "NODE_RANK": "1"}, {},
     "loopback"),
    ({}, dict(num_nodes=2, master_ip="10.0.0.1"), "--master-port"),
    ({}, dict(num_nodes=2, node_rank=2, master_ip="10.0.0.1", master_port=5), "out of range"),
    ({"SLURM_NNODES": "two"}, {}, "SLURM_NNODES"),
    ({}, dict(master_port=70000), "TCP port"),
])
def test_bad_layouts_are_user_errors(env, flags, needle):
    with pytest.raises(UserError, match=needle):
        resolve_cluster(env, **flags)


def test_localhost_is_fine_on_one_node():
    assert resolve_cluster({}, num_nodes=1, master_ip="localhost").master_addr == "localhost"


def test_one_process_per_node():
    check_one_process_per_node({})
    check_one_process_per_node({"LOCAL_WORLD_SIZE": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"})
    with pytest.raises(UserError, match="nproc-per-node 1"):
        check_one_process_per_node({"LOCAL_WORLD_SIZE": "8"})
    with pytest.raises(UserError, match="ntasks-per-node=1"):
        check_one_process_per_node({"SLURM_STEP_TASKS_PER_NODE": "8(x2)"})


def test_imports_without_megengine():
    """engine.data and the tools use the resolver: importing it must not import MegEngine."""
    code = ("import sys; import engine.distributed as d; "
            "d.resolve_cluster({'SLURM_NNODES': '1'}); "
            "assert 'megengine' not in sys.modules, 'megengine imported'")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------- eval totals (issue 11.1)

@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    from conftest import make_imagenet

    root = make_imagenet(str(tmp_path_factory.mktemp("ev") / "inet"), classes=3, train=1, val=3)
    return os.path.join(root, "val")  # 9 images


def _eval_as_rank(monkeypatch, val_split, rank, world, others=None):
    """run_eval as `rank` of `world`, with a CPU stand-in for the one all-reduce: it records
    this rank's vector and adds `others` (what the other ranks would contribute)."""
    import megengine as mge
    from engine import distributed
    from engine.data import Loader
    from engine.evaluate import run_eval
    from engine.models import get_model
    from engine.steps import EvalStep

    calls = []

    def fake_all_reduce_sum(values):
        calls.append(np.asarray(values, np.float64))
        return calls[-1] + (0 if others is None else np.asarray(others, np.float64))

    monkeypatch.setattr(distributed, "all_reduce_sum", fake_all_reduce_sum)
    mge.random.seed(0)
    model = get_model("resnet18", num_classes=3)
    model.eval()
    step = EvalStep(model, num_classes=3, trace=False)
    loader = Loader(val_split, batch_size=2, train=False, image_size=32, workers=0, rank=rank,
                    world_size=world)
    try:
        result = run_eval(step, loader)
    finally:
        loader.close()
    return result, calls


@pytest.mark.parametrize("world", [2, 4])
def test_eval_counts_every_image_exactly_once(monkeypatch, val_split, world):
    locals_ = []
    for rank in range(world):
        _, calls = _eval_as_rank(monkeypatch, val_split, rank, world)
        assert len(calls) == 1          # one collective per eval, whatever the batch count
        locals_.append(calls[0])
    total = np.sum(locals_, axis=0)
    assert total[3] == 9                # 9 val images, not 10 or 12 (no wrap-around padding)
    single, _ = _eval_as_rank(monkeypatch, val_split, 0, 1)
    assert single["images"] == 9
    # the summed correct counts equal the single-process ones: the same images, once each
    assert total[1] == pytest.approx(single["top1"] * 9 / 100)
    assert total[2] == pytest.approx(single["top5"] * 9 / 100)


def test_a_rank_without_images_still_joins_the_reduce(monkeypatch, val_split):
    # 9 images on 12 ranks: rank 0 has none, but it must still call the all-reduce once
    result, calls = _eval_as_rank(monkeypatch, val_split, 0, 12, others=[1.0, 1, 1, 9])
    assert len(calls) == 1 and calls[0][3] == 0
    assert result["images"] == 9


# ------------------------------------------------ node rendezvous (issue 11.4 and 11.5)
# MegEngine's rendezvous server is plain XML-RPC and runs on CPU, so these use the real one;
# "nodes" are threads of this process talking to it over 127.0.0.1.

import threading  # noqa: E402

from engine.distributed import (check_node_reports, file_fingerprint, node_handshake,  # noqa: E402
                                node_report, read_rank_error, run_ranks, RankEntry,
                                write_rank_error)


@pytest.fixture
def server_port():
    from megengine.distributed.server import Server

    server = Server(0)
    yield server.py_server_port
    server.proc.terminate()


def handshake_all(port, reports, num_nodes, timeout=60.0):
    """Run node_handshake for each node in `reports` on its own thread; {node: error or None}."""
    out = {}

    def node(k):
        try:
            node_handshake("127.0.0.1", port, k, num_nodes, reports[k], timeout)
            out[k] = None
        except UserError as exc:
            out[k] = str(exc)

    threads = [threading.Thread(target=node, args=(k,)) for k in reports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    return out


def test_nodes_that_agree_start(server_port):
    reports = {k: node_report(num_nodes=3, ngpus=8) for k in range(3)}
    assert handshake_all(server_port, reports, 3) == {0: None, 1: None, 2: None}


def test_a_node_with_another_gpu_count_stops_every_node(server_port):
    reports = {0: node_report(num_nodes=2, ngpus=8), 1: node_report(num_nodes=2, ngpus=4)}
    out = handshake_all(server_port, reports, 2)
    assert out[0] == out[1]
    assert "node 1 runs 4 GPU processes but node 0 runs 8" in out[0]


def test_a_node_missing_the_checkpoint_names_it_on_every_node(server_port, tmp_path):
    ck = tmp_path / "checkpoint.pkl"
    ck.write_bytes(b"weights" * 100)
    missing = "--resume: no such file or folder: /scratch/run/checkpoint.pkl"
    reports = {0: node_report(num_nodes=2, ngpus=8, resume=str(ck)),
               1: node_report(num_nodes=2, ngpus=8, error=missing)}
    out = handshake_all(server_port, reports, 2)
    assert out[0] == out[1] == "node 1: " + missing


def test_a_node_that_never_arrives_is_an_error_not_a_hang(server_port):
    # 3 nodes expected, node 2 never starts: node 0 gives up at the deadline and tells node 1
    reports = {k: node_report(num_nodes=3, ngpus=2) for k in range(2)}
    out = handshake_all(server_port, reports, 3, timeout=3)
    assert "node 2 did not reach the rendezvous" in out[0]
    assert out[1] == out[0]


def test_unreachable_master_is_an_error_not_a_hang():
    with socket_free_port() as port:
        with pytest.raises(UserError, match="could not reach the rendezvous server at "
                                            "127.0.0.1:%d within 2 s" % port):
            node_handshake("127.0.0.1", port, 1, 2, node_report(num_nodes=2, ngpus=1), 2)


class socket_free_port:
    """A local port with nothing listening on it."""

    def __enter__(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc):
        return False


def test_check_node_reports(tmp_path):
    a, b = tmp_path / "a.pkl", tmp_path / "b.pkl"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"y" * 1000)
    assert file_fingerprint(str(a)) != file_fingerprint(str(b))
    ok = node_report(num_nodes=2, ngpus=8, resume=str(a))
    assert check_node_reports({0: ok, 1: dict(ok)}) is None
    assert "checkpoint differs between nodes" in check_node_reports(
        {0: ok, 1: node_report(num_nodes=2, ngpus=8, resume=str(b))})
    assert "same --num-nodes" in check_node_reports(
        {0: ok, 1: dict(ok, num_nodes=3)})
    # errors come first, lowest node first
    assert check_node_reports({0: ok, 1: dict(ok, error="e1"), 2: dict(ok, error="e2")}) == \
        "node 1: e1"


# ------------------------------------------------------ rank errors reach the parent (11.6)

def _fake_launcher(n, die_rank=None, bug=False):
    """A CPU stand-in for MegEngine's launcher (which needs GPUs): fork n processes running the
    entry, poll them, terminate the rest when one fails and raise its AssertionError."""
    import multiprocessing as mp

    def child(entry, rank):
        import engine.distributed as d

        d.get_rank = lambda: rank  # what init_process_group provides in a real rank
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
