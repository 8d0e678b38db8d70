"""engine.dist.cluster and engine.dist.env without GPUs: launch resolution from flags /
torchrun / Slurm variables (fake environment dicts), and that the package imports without
MegEngine."""
import os
import subprocess
import sys

import pytest

from engine.dist.cluster import Cluster, check_one_process_per_node, expand_nodelist, is_loopback, resolve_cluster
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
    code = ("import sys; import engine.dist as d; "
            "d.resolve_cluster({'SLURM_NNODES': '1'}); "
            "assert 'megengine' not in sys.modules, 'megengine imported'")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
