"""Trainer: LR schedule, world-size logic, traced == eager, AMP step structure, train() runs,
exact resume, rank-0-only output. Tiny: 32 px images, batches of 2-4, a handful of steps."""
import math
import os

import numpy as np
import pytest

from engine.config import TrainConfig
from engine.dist import resolve_ngpus
from engine.errors import UserError
from engine.metrics import MetricsLog, read_jsonl
from engine.schedules import lr_at, step_milestones
from engine.trainer import loader_kwargs, resolve_data, scaled_lr, train

from helpers import make_imagenet


# ------------------------------------------------------------------------------ pure functions

def test_step_milestones_follow_the_reference_and_scale():
    assert step_milestones(90) == [30, 60, 80]
    assert step_milestones(100) == [30, 60, 80]
    assert step_milestones(9) == pytest.approx([3, 6, 8])
    assert step_milestones(200) == pytest.approx([60, 120, 160])
    # continuous at both ends of the reference range
    assert step_milestones(89) == pytest.approx([30 * 89 / 90, 60 * 89 / 90, 80 * 89 / 90])


def test_lr_step_schedule_per_step():
    kw = dict(base_lr=0.1, steps_per_epoch=10, epochs=90)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(299, **kw) == pytest.approx(0.1)
    assert lr_at(300, **kw) == pytest.approx(0.01)     # epoch 30, exactly at the boundary
    assert lr_at(600, **kw) == pytest.approx(0.001)
    assert lr_at(799, **kw) == pytest.approx(0.001)
    assert lr_at(800, **kw) == pytest.approx(0.0001)
    assert lr_at(899, **kw) == pytest.approx(0.0001)


def test_short_runs_also_decay():
    lrs = [lr_at(s, base_lr=1.0, steps_per_epoch=4, epochs=3) for s in range(12)]
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(1e-3)
    assert sorted(set(np.round(lrs, 6)), reverse=True) == [1.0, 0.1, 0.01, 0.001]


def test_warmup_is_linear_per_step_then_schedule():
    kw = dict(base_lr=0.4, steps_per_epoch=10, epochs=90, warmup_epochs=2)
    warm = [lr_at(s, **kw) for s in range(20)]
    assert warm[0] == pytest.approx(0.4 / 20)          # not 0: the first step does work
    assert np.allclose(np.diff(warm), 0.4 / 20)
    assert lr_at(19, **kw) == pytest.approx(0.4)
    assert lr_at(20, **kw) == pytest.approx(0.4)


def test_cosine_schedule():
    kw = dict(base_lr=1.0, steps_per_epoch=10, epochs=10, schedule="cosine", warmup_epochs=1)
    assert lr_at(9, **kw) == pytest.approx(1.0)        # end of warmup
    assert lr_at(10, **kw) == pytest.approx(1.0)       # cosine starts at the peak
    assert lr_at(55, **kw) == pytest.approx(0.5)       # half way through the cosine part
    assert lr_at(99, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(10, 99))


def test_lr_scales_with_world_size():
    assert scaled_lr(0.0125, 1) == pytest.approx(0.0125)
    assert scaled_lr(0.0125, 8) == pytest.approx(0.1)
    assert scaled_lr(0.0125, 16) == pytest.approx(0.2)   # 2 nodes x 8 GPUs


def test_resume_step_from_both_checkpoint_versions(tmp_path):
    from engine import checkpoint as ckpt

    def resume_step(state, config, classes, world_size, steps_per_epoch):
        """Where a file holding `state` (and the entries a resume loads) resumes this run."""
        path = str(tmp_path / "c.pkl")
        ckpt.dump({"format": ckpt.FORMAT, "state_dict": {}, "optimizer": {}, **state}, path)
        return ckpt.read(path).resume_step(config, classes, world_size, steps_per_epoch)

    cfg = TrainConfig(data="x", batch_size=4)
    classes = ["a", "b"]
    saved = {"arch": "resnet18", "classes": classes, "batch_size": 4, "world_size": 2}
    v2 = {"version": 2, "step": 23, "steps_per_epoch": 10, "config": saved}
    assert resume_step(v2, cfg, classes, world_size=2, steps_per_epoch=10) == 23
    v1 = {"version": 1, "epoch": 2, "step": 23, "loader": {"epoch": 2, "position": 3},
          "config": saved}
    assert resume_step(v1, cfg, classes, world_size=2, steps_per_epoch=10) == 23
    # an epoch boundary is re-counted in this run's steps when the global batch changed ...
    at_end = dict(v2, step=30)
    assert resume_step(at_end, cfg, classes, world_size=4, steps_per_epoch=5) == 15
    v1_end = dict(v1, loader={"epoch": 3, "position": 0})
    assert resume_step(v1_end, cfg, classes, world_size=4, steps_per_epoch=5) == 15
    # ... mid-epoch it may not change, and other runs are refused
    with pytest.raises(UserError, match="mid-epoch with a global batch of 8, this run has 16"):
        resume_step(v2, cfg, classes, world_size=4, steps_per_epoch=5)
    with pytest.raises(UserError, match="resnet18 run but --arch is resnet50"):
        resume_step(v2, TrainConfig(data="x", arch="resnet50"), classes, 2, 10)
    with pytest.raises(UserError, match="trained on 2 classes, --data has 3"):
        resume_step(v2, cfg, classes + ["c"], 2, 10)


def test_logged_loss_is_the_mean_over_ranks_and_finite_steps():
    from engine.metrics import LossMeter, interval_summary

    # two ranks, three steps each; step 2 overflowed (loss inf on rank 0, nan on rank 1) and
    # was skipped on both ranks, as the overflow check runs on the all-reduced gradients
    r0, r1 = LossMeter(), LossMeter()
    for loss0, loss1, skipped in [(2.0, 4.0, False), (float("inf"), float("nan"), True),
                                  (1.0, 3.0, False)]:
        r0.update(loss0, skipped)
        r1.update(loss1, skipped)
    totals = np.add(r0.local(), r1.local())  # what all_reduce_sum returns on every rank
    out = interval_summary(totals, world_size=2)
    assert out == {"loss": pytest.approx(2.5), "skipped": 1}
    assert interval_summary(r0.local(), 1) == {"loss": pytest.approx(1.5), "skipped": 1}
    # an interval with only overflowed steps has no loss (null in JSON), not nan
    m = LossMeter()
    m.update(float("nan"), True)
    assert interval_summary(m.local(), 1) == {"loss": None, "skipped": 1}
    m.reset()
    assert m.local() == [0.0, 0.0, 0.0]


def test_metrics_log_disabled_writes_nothing(tmp_path):
    MetricsLog(str(tmp_path / "sub" / "m.jsonl"), enabled=False).write({"step": 1})
    assert not (tmp_path / "sub").exists()


def test_each_rank_reads_its_own_share():
    cfg = TrainConfig(data="x", batch_size=7, image_size=64, workers=3, seed=5)
    for rank in range(4):
        kw = loader_kwargs(cfg, True, rank, 4)
        assert kw == dict(batch_size=7, train=True, image_size=64, workers=3, seed=5,
                          rank=rank, world_size=4, local_world_size=4, persistent_workers=True)
    val = loader_kwargs(cfg, False, 0, 1)
    assert val["train"] is False and val["persistent_workers"] is False  # released between evals


def test_loaders_are_sized_for_the_ranks_of_their_node():
    """16 ranks on 2 nodes: 8 loaders share each machine, so each gets an eighth of it."""
    cfg = TrainConfig(data="x", num_nodes=2)
    assert loader_kwargs(cfg, True, 11, 16)["local_world_size"] == 8
    assert loader_kwargs(TrainConfig(data="x"), True, 0, 8)["local_world_size"] == 8


def test_resolve_ngpus():
    assert resolve_ngpus(None, 0) == 1           # CPU: one in-process run
    assert resolve_ngpus(1, 0) == 1
    assert resolve_ngpus(None, 8) == 8
    assert resolve_ngpus(2, 8) == 2
    with pytest.raises(UserError, match="CUDA"):
        resolve_ngpus(2, 0)
    with pytest.raises(UserError, match="CUDA"):
        resolve_ngpus(None, 0, num_nodes=2)
    with pytest.raises(UserError, match="only 4 GPUs"):
        resolve_ngpus(8, 4)


def test_resolve_data(tmp_path):
    root = make_imagenet(str(tmp_path / "inet"), classes=2, train=1, val=1)
    assert resolve_data(root) == (os.path.join(root, "train"), os.path.join(root, "val"))
    with pytest.raises(UserError, match="no such folder"):
        resolve_data(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "only_train" / "train")
    with pytest.raises(UserError, match="val"):
        resolve_data(str(tmp_path / "only_train"))


def test_config_node_layout_comes_from_flags_then_env():
    slurm = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[01-02]",
             "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "42"}
    c = TrainConfig(data="d").finalized().with_cluster(slurm)
    assert (c.num_nodes, c.node_rank, c.master_ip, c.ngpus) == (2, 1, "gpu01", 8)
    assert c.master_port == 20042
    c = TrainConfig(data="d", ngpus=4, master_port=3000).finalized().with_cluster(slurm)
    assert (c.ngpus, c.master_port) == (4, 3000)
    c = TrainConfig(data="d").finalized().with_cluster({})
    assert (c.num_nodes, c.node_rank, c.master_ip, c.master_port) == (1, 0, "localhost", 0)
    with pytest.raises(UserError, match="loopback"):
        TrainConfig(data="d", num_nodes=2, node_rank=1, master_ip="localhost",
                    master_port=5000).finalized().with_cluster({})


def test_dtr_runs_eagerly():
    assert TrainConfig(data="d", dtr="2GB", trace=True).finalized().trace is False
    assert TrainConfig(data="d", trace=True).finalized().trace is True


def test_dtr_note_and_help(tmp_path):
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        "train.py")
    out = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "eager" in " ".join(out.split())
    # the note comes before anything else runs (here: the missing data folder)
    p = subprocess.run([sys.executable, tool, "-d", str(tmp_path / "none"), "--dtr", "1GB"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "note: --dtr runs the steps eagerly" in p.stderr


def test_config_validation():
    with pytest.raises(UserError, match="lr-schedule"):
        TrainConfig(data="d", lr_schedule="nosuch").finalized()
    with pytest.raises(UserError, match="batch-size"):
        TrainConfig(data="d", batch_size=0).finalized()
    assert TrainConfig(data="d", arch="resnet50").finalized().save_dir == os.path.join(
        "output", "resnet50")


def test_amp_on_cpu_stops_before_any_work(tmp_path):
    # The data folder does not exist: the AMP message must come first, before any data access.
    cfg = TrainConfig(data=str(tmp_path / "nowhere"), amp=True, save_dir=str(tmp_path / "o"))
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        train(cfg)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ step functions

def _resnet_and_batches(steps=3, n=2, size=32, classes=3):
    import megengine as mge
    from engine.models import get_model

    mge.random.seed(0)
    model = get_model("resnet18", num_classes=classes)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
                rng.integers(0, classes, (n,), dtype=np.int32)) for _ in range(steps)]
    return model, batches


def _run_steps(model, batches, *, trace, amp=False, lrs=None):
    import megengine as mge
    import megengine.optimizer as optim
    from megengine.autodiff import GradManager
    from engine.steps import TrainStep

    gm = GradManager().attach(model.parameters())
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    step = TrainStep(model, gm, opt, trace=trace, amp=amp, label_smoothing=0.1)
    model.train()
    losses = []
    for i, (x, y) in enumerate(batches):
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[i]
        losses.append(float(step(mge.tensor(x), mge.tensor(y)).item()))
    return losses, {k: v.copy() for k, v in model.state_dict().items()}


def test_traced_step_equals_eager():
    model, batches = _resnet_and_batches(steps=3)
    init = {k: v.copy() for k, v in model.state_dict().items()}
    lrs = [0.05, 0.2, 0.01]  # the LR changes between calls are honoured by the traced graph
    eager_losses, eager_params = _run_steps(model, batches, trace=False, lrs=lrs)

    model2, _ = _resnet_and_batches(steps=0)
    model2.load_state_dict(init)
    traced_losses, traced_params = _run_steps(model2, batches, trace=True, lrs=lrs)

    assert len(set(eager_losses)) == 3  # the weights really moved between steps
    np.testing.assert_allclose(traced_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for k in eager_params:
        np.testing.assert_allclose(traced_params[k], eager_params[k], rtol=1e-3, atol=1e-5,
                                   err_msg=k)


def test_amp_step_structure_traced_equals_eager_and_skips_overflow():
    """The AMP path (autocast, scaled backward, overflow skip) on a tiny net.

    MegEngine's CPU float16 is wrong for real networks, so this only checks the mechanics that
    the GPU run relies on: traced == eager, an inf batch skips the update and halves the scale.
    """
    import megengine as mge
    import megengine.functional as F
    import megengine.module as M
    import megengine.optimizer as optim
    from megengine.autodiff import GradManager
    from engine.steps import TrainStep

    class Tiny(M.Module):
        def __init__(self):
            super().__init__()
            self.conv = M.Conv2d(3, 4, 3, padding=1)
            self.bn = M.BatchNorm2d(4)
            self.fc = M.Linear(4, 3)

        def forward(self, x):
            return self.fc(F.mean(F.relu(self.bn(self.conv(x))), axis=[2, 3]))

    rng = np.random.default_rng(1)
    xs = [rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8) for _ in range(4)]
    ys = [np.array([0, 2], np.int32)] * 4

    def run(trace):
        mge.random.seed(0)
        net = Tiny()
        gm = GradManager().attach(net.parameters())
        opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        step = TrainStep(net, gm, opt, trace=trace, amp=True)
        out = []
        for i in range(4):
            if i == 2:  # a scale so large that the float16 gradients overflow
                step.scaler.scale_factor = 1e38
            if i == 3:
                step.scaler.scale_factor = 16.0
            before = net.fc.weight.numpy().copy()
            loss = step(mge.tensor(xs[i]), mge.tensor(ys[i]))
            out.append((float(loss.item()), step.last_step_skipped, step.scaler.scale_factor,
                        np.array_equal(before, net.fc.weight.numpy())))
        return out, net.fc.weight.numpy()

    eager, w_eager = run(False)
    assert [o[1] for o in eager] == [False, False, True, False]
    assert [o[3] for o in eager] == [False, False, True, False]  # skipped = weights unchanged
    assert eager[2][2] == 0.5e38                                  # and the scale backed off
    traced, w_traced = run(True)
    assert [o[1:] for o in traced] == [o[1:] for o in eager]
    np.testing.assert_allclose([o[0] for o in traced], [o[0] for o in eager], rtol=1e-3)
    np.testing.assert_allclose(w_traced, w_eager, rtol=1e-3, atol=1e-5)


def test_amp_scaler_starts_at_2_to_the_16():
    """As PyTorch and basecls; MegEngine's own default is 16 (underflowing small gradients)."""
    import megengine.module as M
    import megengine.optimizer as optim
    from megengine.autodiff import GradManager
    from engine.steps import TrainStep, make_grad_scaler

    assert make_grad_scaler().scale_factor == 65536.0
    net = M.Linear(2, 2)
    gm = GradManager().attach(net.parameters())
    step = TrainStep(net, gm, optim.SGD(net.parameters(), lr=0.1), trace=False, amp=True)
    assert step.scaler.scale_factor == 65536.0


# ---------------------------------------------------------------------------- train() runs

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # 3 classes x 6 train images, batch 4 -> 4 steps per epoch; 2 val images per class.
    return make_imagenet(str(tmp_path_factory.mktemp("d") / "inet"), classes=3, train=6, val=2)


def _cfg(data_root, save_dir, **kw):
    base = dict(data=data_root, batch_size=4, image_size=32, workers=0, save_dir=str(save_dir),
                print_freq=1, progress=False, epochs=2)
    base.update(kw)
    return TrainConfig(**base)


def test_two_step_cpu_training_smoke(data_root, tmp_path):
    summary = train(_cfg(data_root, tmp_path / "run", max_steps=2))
    assert summary.steps == 2 and summary.epoch == 0
    assert np.isfinite(summary.loss)
    assert 0 <= summary.top1 <= 100 and summary.top1 <= summary.top5
    assert summary.num_classes == 3 and summary.world_size == 1
    assert summary.checkpoint == str(tmp_path / "run" / "checkpoint.pkl")
    for name in ("checkpoint.pkl", "metrics.jsonl", "curves.png", "config.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    records = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2]
    for r in train_recs:
        assert set(r) >= {"step", "epoch", "loss", "skipped", "lr", "img_s", "data_wait"}
        assert r["skipped"] == 0
        assert 0 <= r["data_wait"] <= 1 and r["img_s"] > 0
    ev = [r for r in records if r["kind"] == "eval"]
    assert len(ev) == 1 and {"top1", "top5"} <= set(ev[0])

    from engine.models.weights import read_file

    ck = read_file(summary.checkpoint)
    assert ck["version"] == 2 and (ck["step"], ck["steps_per_epoch"]) == (2, 4)
    assert ck["config"]["arch"] == "resnet18" and ck["config"]["num_classes"] == 3
    assert ck["config"]["image_size"] == 32 and len(ck["config"]["classes"]) == 3
    assert {"state_dict", "optimizer", "scaler"} <= set(ck)


def _train_losses(save_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(save_dir, "metrics.jsonl"))
            if r["kind"] == "train"}


@pytest.mark.slow
def test_resume_mid_epoch_and_at_epoch_end_equals_straight_run(data_root, tmp_path):
    from engine.models.weights import read_file

    # 6 steps = 1.5 epochs straight ...
    straight = train(_cfg(data_root, tmp_path / "a", max_steps=6, evaluate=False, trace=False))
    # ... vs stop at step 3 (mid-epoch 0), resume to 4 (epoch end), resume to 6.
    d = str(tmp_path / "b")
    train(_cfg(data_root, d, max_steps=3, evaluate=False, trace=False))
    assert read_file(os.path.join(d, "checkpoint.pkl"))["step"] == 3
    train(_cfg(data_root, d, max_steps=4, evaluate=False, trace=False, resume=d))
    ck = read_file(os.path.join(d, "checkpoint.pkl"))
    assert ck["step"] == 4 and ck["steps_per_epoch"] == 4
    resumed = train(_cfg(data_root, d, max_steps=6, evaluate=False, trace=False,
                         resume=os.path.join(d, "checkpoint.pkl")))

    a, b = _train_losses(straight.save_dir), _train_losses(d)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    pa = read_file(straight.checkpoint)["state_dict"]
    pb = read_file(resumed.checkpoint)["state_dict"]
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_resume_refuses_other_arch_and_missing_checkpoint(data_root, tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        train(_cfg(data_root, tmp_path / "x", resume=str(tmp_path)))
    d = tmp_path / "r"
    train(_cfg(data_root, d, max_steps=1, evaluate=False, trace=False))
    with pytest.raises(UserError, match="resnet18 run but --arch is resnet34"):
        train(_cfg(data_root, d, arch="resnet34", resume=str(d), evaluate=False))


def test_non_main_rank_writes_nothing(data_root, tmp_path, monkeypatch):
    """The loop as rank 1 of 2 (communication stubbed out: it needs GPUs): it reads its half of
    the data, scales the LR by the world size, trains, and never touches the save dir."""
    from engine import dist

    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "allreduce_callback", lambda: None)
    monkeypatch.setattr(dist, "broadcast_module", lambda module: None)
    events = []

    def buffers(module):  # stands in for the broadcast of rank 0's BN statistics
        events.append("broadcast_buffers")

    def reduce(values):
        events.append("all_reduce_sum/%d" % len(values))
        return np.asarray(values, np.float64)

    monkeypatch.setattr(dist, "broadcast_buffers", buffers)
    monkeypatch.setattr(dist, "all_reduce_sum", reduce)
    summary = train(_cfg(data_root, tmp_path / "rank1", max_steps=1, batch_size=2,
                         trace=False, learning_rate=0.01))
    # each eval (its one 5-number reduce: loss, top-1, top-5, images, skipped) runs on rank 0's BN statistics, broadcast just before
    assert events.count("all_reduce_sum/3") == 1  # the one logged interval's loss, all ranks
    evals = [i for i, e in enumerate(events) if e == "all_reduce_sum/5"]
    assert len(evals) == 1 and events[evals[0] - 1] == "broadcast_buffers"
    assert summary.steps == 1 and summary.checkpoint is None
    assert summary.world_size == 2 and summary.lr == pytest.approx(0.02)
    assert summary.top1 is not None  # rank 1 evaluates its shard too (sums are all-reduced)
    assert not (tmp_path / "rank1").exists()


def test_save_every_n_steps_and_at_stop(data_root, tmp_path, monkeypatch):
    from engine import checkpoint as ckpt

    saved = []
    real = ckpt.write

    def recording(checkpoint, path):
        saved.append(checkpoint.step)
        return real(checkpoint, path)

    monkeypatch.setattr(ckpt, "write", recording)
    train(_cfg(data_root, tmp_path / "s", max_steps=5, save_every=2, evaluate=False,
               trace=False))
    # step 2: --save-every; step 4: epoch end, also a multiple of 2 but not saved twice;
    # step 5: the stop.
    assert saved == [2, 4, 5]


def test_traced_resume_mid_epoch_equals_the_straight_run(data_root, tmp_path):
    """With trace=True (the default), in the default tier: 3 steps straight vs 2 + resume."""
    from engine.models.weights import read_file

    straight = train(_cfg(data_root, tmp_path / "a", max_steps=3, evaluate=False))
    d = str(tmp_path / "b")
    train(_cfg(data_root, d, max_steps=2, evaluate=False))
    resumed = train(_cfg(data_root, d, max_steps=3, evaluate=False, resume=d))
    a, b = _train_losses(straight.save_dir), _train_losses(d)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=1e-5)
    pa = read_file(straight.checkpoint)["state_dict"]
    pb = read_file(resumed.checkpoint)["state_dict"]
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_version_1_checkpoint_still_resumes(data_root, tmp_path):
    """Checkpoints of the first format stored the loader's (epoch, position), not the step."""
    from engine.checkpoint import dump
    from engine.models.weights import read_file

    d = tmp_path / "v1"
    train(_cfg(data_root, d, max_steps=2, evaluate=False, trace=False))
    ck = read_file(str(d / "checkpoint.pkl"))
    old = {k: v for k, v in ck.items() if k not in ("step", "steps_per_epoch")}
    old.update(version=1, epoch=0, step=2, loader={"epoch": 0, "position": 2})
    dump(old, str(d / "checkpoint.pkl"))
    out = train(_cfg(data_root, d, max_steps=3, evaluate=False, trace=False, resume=str(d)))
    assert out.steps == 3 and [r["step"] for r in read_jsonl(str(d / "metrics.jsonl"))
                                  if r["kind"] == "train"] == [1, 2, 3]
    newer = dict(read_file(str(d / "checkpoint.pkl")), version=99)
    dump(newer, str(d / "checkpoint.pkl"))
    with pytest.raises(UserError, match="version 99 was written by a newer engine"):
        train(_cfg(data_root, d, max_steps=4, evaluate=False, trace=False, resume=str(d)))
