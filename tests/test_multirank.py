"""Multi-rank training for real on CPU: ranks forked by the engine's launch path, collectives
through the test-only CPU backend (engine.dist.cpu_backend), nodes as separate processes that
meet at MegEngine's real rendezvous server, and failures that must stop every node.

Every run is a subprocess (tests/multirank_node.py: the train tool with hooks that dump each
rank's weights and can make a rank raise), so a hang is a timeout here, never a stuck suite.
Multi-node runs use this machine's own non-loopback address (the loopback one is refused for
multi-node runs, as for users). Tolerances: ranks of one run agree bit for bit; a multi-rank
run and its one-rank reference agree to 1e-4 relative and 1e-5 absolute (the same sums in
another order: 2 ranks came out bit-identical here, 4 ranks within 1.2e-7); a resumed run
equals the straight one to the same tolerance.

The 4-rank comparison trains at 64 px with LR 0.001: with 2 images per rank, BatchNorm
normalises over 2 values at 32 px in the last stage, and at a higher LR that amplifies the
last bit of a sum into differences of order 1 within 3 steps (arithmetic chaos, which would
test nothing about the engine).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NODE = os.path.join(HERE, "multirank_node.py")
RTOL, ATOL = 1e-4, 1e-5
STABLE = ("--image-size", 64, "--lr", 0.001)  # the weight comparisons' settings (see above)
EXIT_S = 30.0  # every node must be gone this long after a failure


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env["ENGINE_TEST_ONLY_CPU_COLLECTIVES"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the backend refuses to run where GPUs are visible
    for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "NNODES",
              "NODE_RANK", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NODEID",
              "SLURM_STEP_TASKS_PER_NODE", "ENGINE_TEST_FAIL"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def routed_address() -> str:
    """This machine's address on the interface that routes outwards (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("203.0.113.1", 9))  # TEST-NET-3: only the routing table is consulted
        addr = s.getsockname()[0]
    except OSError:
        pytest.skip("no route out of this machine, so no non-loopback address to meet at")
    finally:
        s.close()
    if addr.startswith("127."):
        pytest.skip("the routed address is a loopback one")
    return addr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from helpers import make_imagenet

    # 24 train images: 12 per rank for 2 ranks, 6 for 4, 8 for 3 (no wrap-around, so the
    # ranks' batches together are exactly the one-rank global batch); 8 val images, which no
    # rank count here divides evenly except 2 and 4.
    return make_imagenet(str(tmp_path_factory.mktemp("mr") / "inet"), classes=4, train=6, val=2)


def _args(data, save, *extra):
    return ["--data", data, "--save-dir", str(save), "-b", "2", "--image-size", "32",
            "--workers", "0", "--no-progress", *map(str, extra)]


class Node:
    """One node: the train tool in its own session (so all its processes can be signalled)."""

    def __init__(self, dump, args, env):
        self.dump = str(dump)
        self.err_path = os.path.join(self.dump, "node-%d.err" % time.monotonic_ns())
        os.makedirs(self.dump, exist_ok=True)
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, NODE, self.dump, *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.err,
                                     start_new_session=True, cwd=ROOT)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        finally:
            self.err.close()

    def signal(self, sig):
        os.killpg(self.proc.pid, sig)

    @property
    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def errors(self):
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def leftovers(self):
        """Processes still in this node's session (its ranks, loaders, server)."""
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/stat" % pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid and fields[0] != "Z":  # session id
                left.append(int(pid))
        return left

    def kill(self):
        try:
            self.signal(signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_run(tmp_path, data, save, num_nodes, ngpus, *extra, env=None):
    """`num_nodes` node processes of `ngpus` ranks each; nodes meet at this machine's
    routed address with torchrun-style variables."""
    dump = tmp_path / "dump"
    if num_nodes == 1:
        return [Node(dump, _args(data, save, "--ngpus", ngpus, *extra), _env(**(env or {})))]
    addr, port = routed_address(), free_port()
    return [Node(dump, _args(data, save, "--ngpus", ngpus, *extra),
                 _env(MASTER_ADDR=addr, MASTER_PORT=port, WORLD_SIZE=num_nodes, RANK=k,
                      **(env or {})))
            for k in range(num_nodes)]


def finish(nodes, timeout=240):
    try:
        codes = [n.wait(timeout) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    for n, code in zip(nodes, codes):
        assert code == 0, n.stderr[-3000:]


def rank_params(dump, world):
    out = []
    for r in range(world):
        with np.load(os.path.join(str(dump), "rank-%d.npz" % r)) as f:
            out.append({k: f[k] for k in f.files})
    return out


def assert_same_on_every_rank(params):
    for r, p in enumerate(params[1:], 1):
        assert p.keys() == params[0].keys()
        for k in p:
            assert np.array_equal(p[k], params[0][k]), "rank %d differs from rank 0 in %s" % (r, k)


def one_rank_reference(data, world, steps, per_rank_batch=2, lr=0.001, size=64):
    """The same run in this process: one rank, the global batch of `world` ranks, each step's
    gradient the mean of the ranks' shares' gradients (BatchNorm normalises each share on its
    own, as on each rank), the LR of the `world`-rank run."""
    import megengine as mge
    import megengine.functional as F

    from engine import loop, trainer
    from engine.config import TrainConfig
    from engine.data import Loader
    from engine.steps import Normalize

    cfg = TrainConfig(data=data, batch_size=per_rank_batch, image_size=size, workers=0,
                      learning_rate=lr, evaluate=False, trace=False).finalized()
    train_dir, _ = trainer.resolve_data(data)
    whole = TrainConfig(data=data, batch_size=per_rank_batch * world, image_size=size, workers=0,
                        evaluate=False, trace=False).finalized()
    loader = Loader(train_dir, **trainer.loader_kwargs(whole, True, 0, 1))
    mge.random.seed(cfg.seed)
    # With the default step schedule the LR stays at its base value over these first steps.
    model, gm, opt, _ = loop._model_and_optimizer(cfg, len(loader.classes), world)
    model.train()
    normalize = Normalize()
    batches = loader.stream(0)
    try:
        for _ in range(steps):
            images, labels = next(batches)
            with gm:
                # The Sampler deals the global batch round-robin: rank r has positions r::world.
                losses = [F.nn.cross_entropy(model(normalize(mge.tensor(images[r::world]))),
                                             mge.tensor(labels[r::world]))
                          for r in range(world)]
                gm.backward(sum(losses) / world)
            opt.step().clear_grad()
    finally:
        loader.close()
    return {k: p.numpy() for k, p in model.named_parameters()}


def assert_close(params, reference):
    assert params.keys() == reference.keys()
    for k in reference:
        np.testing.assert_allclose(params[k], reference[k], rtol=RTOL, atol=ATOL, err_msg=k)


# ------------------------------------------------------------------------------- training

def test_two_ranks_agree_and_match_one_rank_with_the_global_batch(data, tmp_path):
    # Two shares' mean is exact in float32 ((a + b) / 2 == a / 2 + b / 2), so the 32 px
    # defaults are no chaos risk here.
    nodes = start_run(tmp_path, data, tmp_path / "run", 1, 2, "--max-steps", 2, "--no-eval")
    finish(nodes)
    assert "test-only CPU backend" in nodes[0].stderr  # the switch says so, and runs eagerly
    params = rank_params(tmp_path / "dump", 2)
    assert_same_on_every_rank(params)
    assert_close(params[0], one_rank_reference(data, world=2, steps=2, lr=0.0125, size=32))


@pytest.mark.slow
def test_two_nodes_of_two_ranks_agree_and_match_one_rank(data, tmp_path):
    nodes = start_run(tmp_path, data, tmp_path / "run", 2, 2, "--max-steps", 3, "--no-eval", *STABLE)
    finish(nodes)
    params = rank_params(tmp_path / "dump", 4)
    assert_same_on_every_rank(params)
    assert_close(params[0], one_rank_reference(data, world=4, steps=3))


@pytest.mark.slow
def test_eval_over_three_ranks_counts_every_image_once(data, tmp_path):
    from engine.evaluate import TestConfig, test

    save = tmp_path / "run"
    finish(start_run(tmp_path, data, save, 1, 3, "--max-steps", 1))
    with open(save / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r.get("kind") == "eval"]
    assert len(evals) == 1 and evals[0]["images"] == 8  # 2 + 3 + 3, each image once
    # The same checkpoint scored by one process, and by the test tool on 3 ranks.
    ckpt = str(save / "checkpoint.pkl")
    one = test(TestConfig(data=data, model=ckpt, batch_size=2, workers=0, image_size=32,
                          progress=False, trace=False))
    assert one.images == 8
    assert evals[0]["top1"] == pytest.approx(one.top1)
    assert evals[0]["loss"] == pytest.approx(one.loss, rel=1e-4)
    out = subprocess.run([sys.executable, "-m", "engine.tools.test", "--data", data,
                          "--model", ckpt, "--ngpus", "3", "-b", "2", "--workers", "0",
                          "--no-progress", "--image-size", "32"],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 8 images: top1 %.3f" % one.top1 in out.stdout


@pytest.mark.slow
def test_two_ranks_resumed_mid_epoch_equal_the_straight_run(data, tmp_path):
    # 6 steps per epoch (12 images per rank, 2 per batch): stop at step 3, resume to 5.
    straight = tmp_path / "straight"
    finish(start_run(straight, data, straight / "run", 1, 2, "--max-steps", 5, "--no-eval"))
    resumed = tmp_path / "resumed"
    finish(start_run(resumed, data, resumed / "run", 1, 2, "--max-steps", 3, "--no-eval"))
    finish(start_run(resumed, data, resumed / "run", 1, 2, "--max-steps", 5, "--no-eval",
                     "--resume", resumed / "run"))
    a, b = rank_params(straight / "dump", 2), rank_params(resumed / "dump", 2)
    assert_same_on_every_rank(b)
    assert_close(b[0], a[0])


# -------------------------------------------------------------------- stops and requeues

def _checkpoint_step(save):
    from engine.models.weights import read_file

    return read_file(str(save / "checkpoint.pkl"))["step"]


@pytest.fixture(scope="module")
def straight_2x7(data, tmp_path_factory):
    """2 ranks, 7 steps (6 per epoch: the stop, the resume and the epoch end all fall inside)."""
    run = tmp_path_factory.mktemp("straight_2x7")
    finish(start_run(run, data, run / "run", 1, 2, "--max-steps", 7, "--no-eval"))
    return rank_params(run / "dump", 2)


def assert_same(params, reference):
    assert params.keys() == reference.keys()
    for k in reference:
        assert np.array_equal(params[k], reference[k]), k


def test_sigterm_to_every_process_of_two_ranks_saves_once_and_a_rerun_continues_exactly(
        data, tmp_path, straight_2x7):
    """What Slurm does at the time limit: SIGTERM to every process of the job step (the
    launcher, both ranks, their loader workers). The workers leave the signal to the run, which
    needs their batches until the ranks agree on a step (a worker that died of it would end the
    run with an error); rank 0 saves that step, the node exits 75 leaving nothing behind; the
    same command continues to the straight run's weights, bit for bit, on both ranks (the
    batches do not depend on the worker count)."""
    stopped = tmp_path / "stopped"
    nodes = start_run(stopped, data, stopped / "run", 1, 2, "--max-steps", 7, "--no-eval",
                      "--workers", 1)
    wait_for_steps(stopped / "dump", [0, 1], step=1)
    nodes[0].signal(signal.SIGTERM)
    try:
        assert nodes[0].wait(120) == 75, nodes[0].stderr[-3000:]
        time.sleep(1.0)
        assert nodes[0].leftovers() == []
    finally:
        nodes[0].kill()
    err = nodes[0].stderr
    assert "Traceback" not in err and "error:" not in err, err[-3000:]
    step = _checkpoint_step(stopped / "run")
    assert 1 <= step < 7  # stopped early: at a log step or the epoch end (step 6)
    assert "stopped by SIGTERM after step %d: saved %s" % (step, stopped / "run" /
                                                           "checkpoint.pkl") in err

    again = tmp_path / "again"
    finish(start_run(again, data, stopped / "run", 1, 2, "--max-steps", 7, "--no-eval",
                     "--workers", 1))
    params = rank_params(again / "dump", 2)
    assert_same_on_every_rank(params)
    assert_same(params[0], straight_2x7[0])
    assert _checkpoint_step(stopped / "run") == 7


@pytest.mark.slow
def test_sigusr1_to_one_node_stops_both_nodes_at_one_step_and_both_continue_exactly(
        data, tmp_path, straight_2x7):
    """Slurm's --signal=B:USR1@120 reaching only node 1's launcher (its batch step): both nodes
    stop after the same step, node 0 saves it and exits 75, node 1 exits 0; the same commands
    then continue both nodes to the straight run's weights (2 nodes x 1 rank = the same 2
    ranks)."""
    stopped = tmp_path / "stopped"
    nodes = start_run(stopped, data, stopped / "run", 2, 1, "--max-steps", 7, "--no-eval")
    wait_for_steps(stopped / "dump", [0, 1], step=1)
    os.kill(nodes[1].proc.pid, signal.SIGUSR1)
    try:
        codes = [n.wait(120) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert codes == [75, 0], [n.stderr[-2000:] for n in nodes]
    assert 1 <= _checkpoint_step(stopped / "run") < 7
    again = tmp_path / "again"
    finish(start_run(again, data, stopped / "run", 2, 1, "--max-steps", 7, "--no-eval"))
    params = rank_params(again / "dump", 2)
    assert_same_on_every_rank(params)
    assert_same(params[0], straight_2x7[0])


# ---------------------------------------------------------------------------- failures

def wait_for_steps(dump, ranks, step=1, timeout=180):
    """{rank: pid} once every rank in `ranks` has started `step` (training under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for r in ranks:
            try:
                with open(os.path.join(str(dump), "rank-%d.step" % r)) as f:
                    pid, at = map(int, f.read().split())
            except (OSError, ValueError):
                break
            if at < step:
                break
            found[r] = pid
        if len(found) == len(ranks):
            return found
        time.sleep(0.2)
    raise AssertionError("training did not reach step %d on ranks %s" % (step, ranks))


def assert_all_stop(nodes, contains, after, timeout=EXIT_S):
    """Every node exits non-zero within `timeout` s of `after`, printing one error line that
    contains `contains`, and leaves no process behind."""
    try:
        for n in nodes:
            left = max(1.0, after + timeout - time.monotonic())
            try:
                code = n.wait(left)
            except subprocess.TimeoutExpired:
                raise AssertionError("a node was still running %.0f s after the failure:\n%s"
                                     % (timeout, n.stderr[-3000:])) from None
            assert code == 2, n.stderr[-3000:]
            errors = n.errors()
            assert len(errors) == 1 and contains in errors[0], n.stderr[-3000:]
        time.sleep(1.0)
        for n in nodes:
            assert n.leftovers() == [], "processes left behind: %s" % n.leftovers()
    finally:
        for n in nodes:
            n.kill()


def test_a_killed_rank_stops_its_node(data, tmp_path):
    nodes = start_run(tmp_path, data, tmp_path / "run", 1, 2, "--max-steps", 500, "--no-eval")
    pids = wait_for_steps(tmp_path / "dump", [0, 1])
    os.kill(pids[1], signal.SIGKILL)
    assert_all_stop(nodes, "rank 1 was killed by signal 9", time.monotonic())


@pytest.mark.slow
def test_a_killed_rank_stops_every_node(data, tmp_path):
    nodes = start_run(tmp_path, data, tmp_path / "run", 2, 2, "--max-steps", 500, "--no-eval")
    pids = wait_for_steps(tmp_path / "dump", [0, 1, 2, 3])
    os.kill(pids[3], signal.SIGKILL)
    assert_all_stop(nodes, "rank 3 (node 1) was killed by signal 9", time.monotonic())


@pytest.mark.slow
def test_a_rank_that_raises_stops_every_node(data, tmp_path):
    nodes = start_run(tmp_path, data, tmp_path / "run", 2, 1, "--max-steps", 500, "--no-eval",
                      env={"ENGINE_TEST_FAIL": "1:2:user"})
    wait_for_steps(tmp_path / "dump", [1], step=2)
    assert_all_stop(nodes, "rank 1 (node 1): cannot write /scratch/run/checkpoint.pkl: the disk "
                           "is full", time.monotonic())


@pytest.mark.slow
@pytest.mark.parametrize("gone", [1, 0])
def test_a_node_killed_whole_stops_the_others(data, tmp_path, gone):
    # The default heartbeat timeout, as a user gets it.
    nodes = start_run(tmp_path, data, tmp_path / "run", 2, 1, "--max-steps", 500, "--no-eval")
    wait_for_steps(tmp_path / "dump", [0, 1])
    nodes[gone].signal(signal.SIGKILL)
    t = time.monotonic()
    nodes[gone].wait(10)
    expected = ("node 1 stopped answering: no heartbeat for 15 s" if gone == 1
                else "node 0 is gone: its rendezvous server at")
    assert_all_stop([nodes[1 - gone]], expected, t)


@pytest.mark.slow
@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_node_is_named_after_the_heartbeat_timeout(data, tmp_path, stopped):
    nodes = start_run(tmp_path, data, tmp_path / "run", 2, 1, "--max-steps", 500, "--no-eval",
                      "--heartbeat-timeout", 6)
    wait_for_steps(tmp_path / "dump", [0, 1])
    nodes[stopped].signal(signal.SIGSTOP)
    t = time.monotonic()
    other = nodes[1 - stopped]
    try:
        assert_all_stop([other], "node %d stopped answering: no heartbeat for 6 s" % stopped, t,
                        timeout=6 + 20)
        assert time.monotonic() - t >= 5.5  # not before the timeout
    finally:
        nodes[stopped].signal(signal.SIGCONT)
    # Woken up, the stopped node finds the run over and exits too.
    assert_all_stop([nodes[stopped]], "node", time.monotonic())


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_with_one_line(data, tmp_path):
    nodes = start_run(tmp_path, data, tmp_path / "run", 1, 2, "--max-steps", 500, "--no-eval")
    wait_for_steps(tmp_path / "dump", [0, 1])
    nodes[0].signal(signal.SIGINT)  # the terminal's Ctrl-C: the whole process group
    try:
        assert nodes[0].wait(EXIT_S) == 130, nodes[0].stderr[-3000:]
        assert "rerun the same command to continue (exit status 130)" in nodes[0].stderr
        assert "Traceback" not in nodes[0].stderr
        time.sleep(1.0)
        assert nodes[0].leftovers() == []
    finally:
        nodes[0].kill()


def test_the_switch_is_refused_where_gpus_are_visible():
    from engine.dist import cpu_backend
    from engine.errors import UserError

    with pytest.raises(UserError, match="ENGINE_TEST_ONLY_CPU_COLLECTIVES is set, but 2 GPU"):
        cpu_backend.check_cpu_only(2)
    cpu_backend.check_cpu_only(0)
    assert not cpu_backend.enabled({})
    assert not cpu_backend.enabled({cpu_backend.SWITCH: "0"})
    assert cpu_backend.enabled({cpu_backend.SWITCH: "1"})
