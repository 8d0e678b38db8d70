"""Long runs at their edges: a save dir is a run (continue, refuse, replace), SIGTERM / SIGUSR1 /
Ctrl-C stop after a step with a checkpoint and a rerun continues bit for bit, a second signal
leaves the previous checkpoint intact, a diverged run stops with one line and never writes
non-finite weights, the EMA starts from the resumed weights, checkpoints roll and keep the best,
metrics.jsonl is only appended and read back one record per step, a full disk while logging or
plotting is a warning, and a batch log says what runs.

Tiny: 3 classes x 2 train images of 32 px, batch 2 (3 steps per epoch), ResNet-18, eager unless
a test says otherwise. The random-step trials, trace mode and three requeues in a row are slow.
"""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_imagenet

from engine import checkpoint as ckpt
from engine import run, stop
from engine.config import TrainConfig
from engine.errors import UserError
from engine.metrics import read_jsonl, read_metrics
from engine.models.weights import read_file
from engine.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "train.py")
STEPS = 4  # of 6 (2 epochs of 3 steps): the run ends mid-epoch, past an epoch boundary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("d") / "inet"), classes=3, train=2, val=1)


def _cfg(data, save, **kw):
    base = dict(data=data, batch_size=2, image_size=32, workers=0, save_dir=str(save),
                print_freq=1, progress=False, epochs=2, evaluate=False, trace=False,
                save_every_minutes=0, max_steps=STEPS)
    base.update(kw)
    return TrainConfig(**base)


def _args(data, save, *extra):
    args = ["-d", data, "--save", save, "-b", 2, "--image-size", 32, "-j", 0, "--no-progress",
            "-p", 1, "--epochs", 2, "--no-eval", "--save-every-minutes", 0,
            "--max-steps", STEPS, *extra]
    return [sys.executable, TOOL, *map(str, args)]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """An uninterrupted eager run of STEPS steps: the reference every resumed run must equal."""
    save = tmp_path_factory.mktemp("straight") / "run"
    result = train(_cfg(data, save))
    return str(save), result


def assert_same_state(a_path, b_path):
    """Model, optimizer and EMA states bit for bit, and the same position."""
    a, b = read_file(a_path), read_file(b_path)
    assert (a["step"], a["steps_per_epoch"]) == (b["step"], b["steps_per_epoch"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert np.array_equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert len(sa) == len(sb)
    for (ka, va), (kb, vb) in zip(sorted(sa.items()), sorted(sb.items())):
        for name in va:
            assert np.array_equal(va[name], vb[name]), (ka, name)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    if a.get("ema") or b.get("ema"):
        assert a["ema"]["updates"] == b["ema"]["updates"]
        for k in a["ema"]["state_dict"]:
            assert np.array_equal(a["ema"]["state_dict"][k], b["ema"]["state_dict"][k]), k


def snapshot(folder):
    """Every file under `folder`: relative path -> (size, mtime, sha1)."""
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns,
                                               hashlib.sha1(open(p, "rb").read()).hexdigest())
    return out


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run_until(cmd, pattern, signals=(signal.SIGTERM,), timeout=600, **kw):
    """Start `cmd`, and once a stdout line matches `pattern` send it `signals`; returns
    (returncode, stdout, stderr). A second signal is sent once the run has printed that it
    took the first: two signals sent back to back can reach Python's handler as one (CPython
    runs a handler once for every signal number that fired since it last looked), as no user
    could press Ctrl-C twice."""
    import threading

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=_env(), **kw)
    send = os.killpg if kw.get("start_new_session") else os.kill
    out, err, deadline = [], [], time.monotonic() + timeout
    taken = threading.Event()

    def read_err():
        for line in p.stderr:
            err.append(line)
            if "stopping after the current step" in line:
                taken.set()

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    try:
        for line in p.stdout:
            out.append(line)
            if re.search(pattern, line):
                for i, sig in enumerate(signals):
                    if i:
                        assert taken.wait(60), "".join(err)
                    send(p.pid, sig)
                break
            assert time.monotonic() < deadline, "".join(out)
        rest = []
        tail = threading.Thread(target=lambda: rest.append(p.stdout.read()), daemon=True)
        tail.start()
        p.wait(timeout)  # a hung run is killed below, never waited for without end
        tail.join(timeout)
        reader.join(timeout)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, "".join(out + rest), "".join(err)


def _tool(cmd, timeout=600):
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _lines(err):
    """stderr without MegEngine's own chatter and Python's warnings about numpy."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith(
        ("info:", "debug:", "  setattr", "  return self", "/"))
        and "UserWarning" not in line]


# ------------------------------------------------------------------- what defines a run

def test_every_setting_is_either_run_defining_or_may_change():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defining = set(run.RUN_DEFINING)
    assert not defining & run.MAY_CHANGE
    assert fields == defining | run.MAY_CHANGE, "classify: %s" % (
        fields ^ (defining | run.MAY_CHANGE))
    assert {d[0] for d in run.DERIVED.values()} <= fields


def test_allow_changes_takes_option_spellings_and_refuses_unknown_names():
    assert run.parse_allowed("lr,--image-size, seed") == (False, ["learning_rate", "image_size",
                                                                  "seed"])
    assert run.parse_allowed("all") == (True, [])
    with pytest.raises(UserError, match="'workers' is not a setting that defines a run"):
        run.parse_allowed("workers")


def test_a_start_with_other_settings_is_refused_and_changes_nothing(straight, data, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(straight[0], save)
    before = snapshot(save)
    other = dict(batch_size=3, image_size=64, lr_schedule="cosine", seed=1)
    for resume in (None, "auto"):
        with pytest.raises(UserError) as info:
            train(_cfg(data, save, resume=resume, **other))
        msg = str(info.value)
        assert "\n" not in msg
        for part in ("global_batch: 2 in the run, 3 here", "image_size: 32 in the run, 64 here",
                     "lr_schedule: 'step' in the run, 'cosine' here", "seed: 0 in the run, 1 here",
                     "checkpoint.pkl, step %d" % STEPS, "--replace"):
            assert part in msg, (part, msg)
        named = re.search(r"--allow-changes (\S+)", msg).group(1).split(",")
        assert sorted(named) == ["batch_size", "image_size", "lr_schedule", "seed"]
        assert snapshot(save) == before  # nothing on disk changed, not even a temp file
    # allowing some names refuses the others only
    with pytest.raises(UserError) as info:
        train(_cfg(data, save, allow_changes="lr_schedule,image_size", **other))
    assert "lr_schedule" not in str(info.value) and "seed: 0 in the run, 1 here" in str(info.value)
    assert snapshot(save) == before
    # what may change does not stop a run from continuing (decided before any step is made)
    start = run.plan(_cfg(data, save, epochs=3, max_steps=None, print_freq=7, workers=2,
                          trace=True).finalized(), world_size=1,
                     classes=read_file(straight[1].checkpoint)["config"]["classes"],
                     train_images=6)
    assert start.checkpoint == os.path.join(str(save), "checkpoint.pkl") and start.step == STEPS
    assert any("--epochs 3 (the run was started for 2)" in n for n in start.notes)
    # the per-GPU batch and LR may change with the world size when the global ones do not
    moved = _cfg(data, save, batch_size=1, learning_rate=0.00625).finalized()
    assert run.plan(moved, world_size=2, classes=start_classes(straight),
                    train_images=6).checkpoint is not None
    # a --resume PATH that holds nothing is still an error
    with pytest.raises(UserError, match="nothing to resume"):
        train(_cfg(data, tmp_path / "new", resume=str(tmp_path)))


def start_classes(straight):
    return read_file(straight[1].checkpoint)["config"]["classes"]


def test_replace_moves_the_old_run_aside_and_deletes_nothing(straight, data, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(straight[0], save)
    before = snapshot(save)
    out = train(_cfg(data, save, replace=True, max_steps=1, lr_schedule="cosine"))
    assert out.steps == 1 and out.resumed_from is None
    moved = [d for d in os.listdir(save) if d.startswith("replaced-")]
    assert len(moved) == 1
    kept = snapshot(save / moved[0])
    assert {k: v[2] for k, v in kept.items()} == {k: v[2] for k, v in before.items()}
    assert read_file(str(save / "checkpoint.pkl"))["step"] == 1
    with pytest.raises(UserError, match="--replace starts a new run"):
        train(_cfg(data, save, replace=True, resume=str(save)))


# --------------------------------------------------------------------- signals and resume

def test_sigterm_saves_the_step_and_the_same_command_continues_exactly(straight, data, tmp_path):
    """The tool as a batch script runs it: SIGTERM after step 2 is logged -> exit 75 with a
    checkpoint of the step it stopped at; the same command continues to a state bit for bit
    equal to the straight run's; metrics.jsonl then holds every step once. With --no-progress
    the log says what runs and every step's loss, LR, img/s, data-wait and ETA."""
    save = tmp_path / "run"
    cmd = _args(data, save)
    rc, out, err = _run_until(cmd, r"step 2/%d" % STEPS)
    assert rc == stop.EXIT_STOPPED, err
    lines = _lines(err)
    assert "Traceback" not in err and len(lines) == 2, lines
    assert lines[0].startswith("SIGTERM: stopping after the current step")
    done = read_file(str(save / "checkpoint.pkl"))["step"]
    assert done in (2, 3)
    assert lines[1] == ("stopped by SIGTERM after step %d: saved %s; rerun the same command to "
                        "continue (exit status 75)" % (done, save / "checkpoint.pkl"))
    # the batch log, with --no-progress
    assert re.search(r"^run: a new run in %s$" % re.escape(str(save)), out, re.M)
    assert re.search(r"^world: 1 rank = 1 node x 1 (GPU|CPU process); global batch 2 \(2 per "
                     r"rank\); LR 0.0125 after scaling \(0.0125 per rank x 1\), step schedule$",
                     out, re.M), out
    assert re.search(r"^steps: 3 per epoch, 4 in total \(2 epochs, --max-steps 4\), 4 to go$",
                     out, re.M), out
    assert re.search(r"^data: .*: 6 train images, no eval; 0 workers per loader \(1 ranks per "
                     r"node\), 0.0 MB shared ring per loader", out, re.M), out
    assert re.search(r"^checkpoints: at each epoch end and on SIGTERM/SIGUSR1 \(exit 75\) or "
                     r"Ctrl-C \(exit 130\); checkpoint.pkl is the newest, the last 3 kept", out,
                     re.M), out
    step_line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  epoch 1/2  step (\d)/4  loss "
                           r"\d+\.\d{4}  lr 0.00?125  \d+\.\d img/s  data-wait \d+%  ETA "
                           r"\d+:\d\d:\d\d$", re.M)
    assert [int(s) for s in step_line.findall(out)] == list(range(1, done + 1)), out

    rc, out, err = _tool(cmd)
    assert rc == 0, err
    assert "run: continuing the run in %s from %s: step %d" % (
        save, save / "checkpoint.pkl", done) in out
    assert_same_state(str(save / "checkpoint.pkl"), straight[1].checkpoint)
    records = read_metrics(str(save / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] in ("start", "resume", "stop")] \
        == [("start", 0), ("stop", done), ("resume", done)]
    assert all(isinstance(r["time"], float) for r in read_jsonl(str(save / "metrics.jsonl")))


def test_a_second_signal_during_the_save_leaves_the_previous_checkpoint(data, tmp_path,
                                                                        monkeypatch):
    """Step 1 is saved (--save-every 1); in the middle of writing step 2's checkpoint a first and
    then a second SIGTERM arrive: the run stops at once (StopNow, status 143), the write's temp
    file is gone and checkpoint.pkl is step 1's, readable."""
    save = tmp_path / "run"
    real = ckpt.atomic_write
    calls = []

    def interrupted_write(path, write, durable=True):
        if not path.endswith(ckpt.FILE_NAME):
            return real(path, write, durable)
        calls.append(path)

        def half_then_signals(f):
            if len(calls) == 2:
                f.write(b"\x80\x04partial")
                os.kill(os.getpid(), signal.SIGTERM)  # the first: stop after this step
                os.kill(os.getpid(), signal.SIGTERM)  # the second, during the save: now
                time.sleep(0.5)
            write(f)
        return real(path, half_then_signals, durable)

    monkeypatch.setattr(ckpt, "atomic_write", interrupted_write)
    with pytest.raises(stop.StopNow) as info:
        train(_cfg(data, save, save_every=1))
    assert info.value.signum == signal.SIGTERM and info.value.status == 143
    assert len(calls) == 2
    assert read_file(str(save / "checkpoint.pkl"))["step"] == 1
    assert not [f for f in os.listdir(save) if f.startswith(".tmp-")]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run's handlers are gone


def test_ranks_agree_to_stop_when_another_rank_got_the_signal(data, tmp_path, monkeypatch):
    """Rank 0 of 2 (the second rank stands behind the all-reduce, as in test_trainer): the other
    rank's SIGUSR1 arrives through the sum at the first log interval and this rank stops there
    too, saving its step."""
    from engine import dist

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "allreduce_callback", lambda: None)
    monkeypatch.setattr(dist, "broadcast_module", lambda module: None)
    monkeypatch.setattr(dist, "broadcast_buffers", lambda module: None)

    flags = []

    def reduce(values):  # the other rank: the same losses, and at step 2 a stop request
        values = np.asarray(values, np.float64)
        if len(values) == 3:
            return values * 2
        flags.append(values)
        return values + np.array([1.0 if len(flags) == 2 else 0.0, 0.0])

    monkeypatch.setattr(dist, "all_reduce_sum", reduce)
    # 6 images, 2 per rank: one step per epoch
    out = train(_cfg(data, tmp_path / "run", epochs=4))
    assert [f[0] for f in flags] == [0.0, 0.0]  # this rank got no signal itself
    assert (out.steps, out.stopped, out.exit_status) == (2, "SIGTERM", stop.EXIT_STOPPED)
    assert read_file(str(tmp_path / "run" / "checkpoint.pkl"))["step"] == 2
    assert stop.agreed() == signal.SIGTERM


def test_stop_codes_add_up_over_ranks():
    for world in (1, 2, 8):
        assert stop.decode(0.0, world) == 0
        assert stop.decode(1.0 * world, world) == signal.SIGTERM  # every rank: SIGTERM/USR1
        assert stop.decode(world - 1 + world + 1.0, world) == signal.SIGINT  # one Ctrl-C
    assert stop.exit_status(signal.SIGTERM) == stop.exit_status(signal.SIGUSR1) == 75
    assert stop.exit_status(signal.SIGINT) == 130 and stop.exit_status(0) == 0


# ------------------------------------------------------------------------------ divergence

def test_a_far_too_large_lr_stops_with_one_line_and_every_checkpoint_is_finite(data, tmp_path):
    save = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train(_cfg(data, save, learning_rate=1e6, save_every=1, max_steps=6))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("training diverged: ")
    assert re.search(r"at step \d", msg) and "the last finite loss was" in msg, msg
    assert "a lower --lr (this run's is 1e+06) and --allow-changes learning_rate" in msg
    files = ckpt.files_in(str(save))
    assert files and os.path.join(str(save), "checkpoint.pkl") in files
    for path in files:  # every save was attempted; none wrote a non-finite number
        state = read_file(path)
        for k, v in state["state_dict"].items():
            assert np.isfinite(v).all(), (path, k)
        for v in state["optimizer"]["state"].values():
            assert all(np.isfinite(a).all() for a in v.values()), path
    good = read_file(os.path.join(str(save), "checkpoint.pkl"))["step"]
    assert "(step %d) is the last good checkpoint" % good in msg


@pytest.mark.slow
def test_a_diverged_run_continues_from_its_last_good_checkpoint_with_a_lower_lr(tmp_path):
    """A sane run saves step 2; it continues with a far too large LR (an allowed change) and
    diverges before the next save; the message's advice, a lower LR, continues from step 2."""
    data = make_imagenet(str(tmp_path / "inet"), classes=3, train=4, val=1)  # 6 steps/epoch
    save = tmp_path / "run"
    train(_cfg(data, save, max_steps=2))
    with pytest.raises(UserError, match="training diverged") as info:
        train(_cfg(data, save, learning_rate=1e6, allow_changes="learning_rate", max_steps=6))
    assert "(step 2) is the last good checkpoint" in str(info.value)
    assert read_file(str(save / "checkpoint.pkl"))["step"] == 2
    out = train(_cfg(data, save, learning_rate=0.0125, allow_changes="learning_rate",
                     max_steps=6))
    assert out.resumed_from == str(save / "checkpoint.pkl") and out.steps == 6
    assert np.isfinite(out.loss)


# ------------------------------------------------------------------------------ EMA, resume

def test_the_ema_starts_from_the_resumed_weights_and_is_never_dropped_silently(straight, data,
                                                                               tmp_path):
    save = tmp_path / "run"
    shutil.copytree(straight[0], save)
    with pytest.raises(UserError) as info:
        train(_cfg(data, save, ema_decay=0.9, max_steps=STEPS + 1))
    assert "ema_decay: none in the run, 0.9 here" in str(info.value)
    assert "starts one from the resumed weights" in str(info.value)
    out = train(_cfg(data, save, ema_decay=0.9, allow_changes="ema_decay", max_steps=STEPS + 1))
    assert out.resumed_from is not None
    w_resumed = read_file(straight[1].checkpoint)["state_dict"]
    ck = read_file(str(save / "checkpoint.pkl"))
    assert ck["ema"]["updates"] == 1
    d = 1 / 10  # the warmed-up decay of the first update: min(0.9, (1 + 0) / (10 + 0))
    params = [k for k in ck["state_dict"] if not k.endswith(("running_mean", "running_var"))]
    for k in params:
        np.testing.assert_allclose(ck["ema"]["state_dict"][k],
                                   d * w_resumed[k] + (1 - d) * ck["state_dict"][k],
                                   rtol=1e-5, atol=1e-7, err_msg=k)
    # a run that keeps an EMA does not lose it to a command that forgets the flag
    with pytest.raises(UserError) as info:
        train(_cfg(data, save, max_steps=STEPS + 2))
    assert "ema_decay: 0.9 in the run, none here" in str(info.value)
    assert "pass --ema-decay 0.9 to keep it" in str(info.value)


# ------------------------------------------------------------------------------ checkpoints

def _fake(step, value=1.0):
    return ckpt.Checkpoint(step=step, steps_per_epoch=10, model={"w": np.full(3, value, np.float32)},
                           optimizer={"state": {}, "param_groups": []},
                           config={"arch": "resnet18"})


def test_checkpoints_roll_keep_the_best_and_never_write_non_finite_weights(tmp_path):
    d = str(tmp_path)
    for step in (1, 2, 3, 4):
        ckpt.save(_fake(step), d, keep=2, best=step == 2)
        time.sleep(0.01)
    names = sorted(os.listdir(d))
    assert names == ["best.pkl", "checkpoint-00000003.pkl", "checkpoint-00000004.pkl",
                     "checkpoint.pkl"]
    assert ckpt.read(os.path.join(d, "checkpoint.pkl")).step == 4
    assert ckpt.read(os.path.join(d, "best.pkl")).step == 2
    assert os.stat(os.path.join(d, "checkpoint.pkl")).st_ino == \
        os.stat(os.path.join(d, "checkpoint-00000004.pkl")).st_ino  # a link, not a copy
    before = snapshot(d)
    with pytest.raises(ckpt.NonFiniteState, match="state_dict.w holds nan or inf"):
        ckpt.save(_fake(5, float("nan")), d, keep=2)
    assert snapshot(d) == before
    # resumed from an older checkpoint: the window keeps the newest written, whatever its step
    ckpt.save(_fake(2), d, keep=2)
    assert sorted(n for n in os.listdir(d) if n.startswith("checkpoint-")) == \
        ["checkpoint-00000002.pkl", "checkpoint-00000004.pkl"]
    assert ckpt.read(os.path.join(d, "checkpoint.pkl")).step == 2
    ckpt.save(_fake(3), d, keep=0)
    assert not [n for n in os.listdir(d) if n.startswith("checkpoint-")]


def test_time_based_saves_and_the_window_in_a_run(data, tmp_path):
    save = tmp_path / "run"
    train(_cfg(data, save, save_every_minutes=1e-9, keep_checkpoints=2, max_steps=3,
               evaluate=True))
    names = sorted(os.listdir(save))
    assert "checkpoint-00000002.pkl" in names and "checkpoint-00000003.pkl" in names
    assert "checkpoint-00000001.pkl" not in names  # saved every step, two kept
    assert "best.pkl" in names  # the epoch end's eval (step 3) is the best so far
    assert read_file(str(save / "best.pkl"))["step"] == 3


# --------------------------------------------------------------------------------- metrics

def test_a_disk_that_refuses_the_log_and_the_picture_costs_neither_the_run(data, tmp_path, capfd):
    """Folders in the place of metrics.jsonl and curves.png: the OS refuses those writes as it
    refuses them on a full disk (the test above has the real ENOSPC); the run ends normally."""
    save = tmp_path / "run"
    os.makedirs(save / "metrics.jsonl")
    os.makedirs(save / "curves.png")
    out = train(_cfg(data, save, max_steps=1))
    assert out.steps == 1 and out.checkpoint
    err = capfd.readouterr().err
    assert "Traceback" not in err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2, err
    assert "cannot write %s" % (save / "metrics.jsonl") in warned[0]
    assert "training goes on" in warned[0]
    assert "curves.png" in warned[1] and "training goes on without the picture" in warned[1]


# ---------------------------------------------------------------------------- slow trials

TOTAL = 9  # 3 epochs: a run stopped three times still has steps left


def _long(data, save, trace, *extra):
    cmd = _args(data, save, "--trace" if trace else "--no-trace", "--epochs", 3, *extra)
    cmd[cmd.index("--max-steps") + 1] = str(TOTAL)
    return cmd


def _segments(data, save, trace, signals):
    """Stop the tool after the first logged step of each run with each of `signals` (a
    requeue each), then let it finish."""
    cmd = _long(data, save, trace)
    for sig in signals:
        rc, out, err = _run_until(cmd, r"  step \d+/%d  " % TOTAL, signals=(sig,))
        assert rc == stop.exit_status(sig), err
    rc, out, err = _tool(cmd)
    assert rc == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("trace", [False, True], ids=["eager", "trace"])
def test_stops_at_random_steps_and_three_requeues_equal_a_straight_run(data, tmp_path, trace):
    import random

    straight = tmp_path / "straight"
    assert _tool(_long(data, straight, trace))[0] == 0
    rng = random.Random(19)
    for trial in range(3):
        save = tmp_path / ("t%d" % trial)
        cmd = _long(data, save, trace)
        at = rng.randint(1, TOTAL - 2)
        rc, out, err = _run_until(cmd, r"  step %d/%d  " % (at, TOTAL))
        assert rc == stop.EXIT_STOPPED, err
        assert read_file(str(save / "checkpoint.pkl"))["step"] in (at, at + 1)
        assert _tool(cmd)[0] == 0
        assert_same_state(str(save / "checkpoint.pkl"), str(straight / "checkpoint.pkl"))
        steps = [r["step"] for r in read_metrics(str(save / "metrics.jsonl"))
                 if r["kind"] == "train"]
        assert steps == list(range(1, TOTAL + 1))
    # three requeues in a row, one of them by SIGUSR1 (Slurm's --signal=USR1@...)
    save = tmp_path / "requeued"
    _segments(data, save, trace, [signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM])
    assert_same_state(str(save / "checkpoint.pkl"), str(straight / "checkpoint.pkl"))
    records = read_metrics(str(save / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, TOTAL + 1))
    assert len([r for r in records if r["kind"] == "resume"]) == 3


@pytest.mark.slow
def test_ctrl_c_saves_and_says_how_to_continue_and_a_second_signal_stops_at_once(data,
                                                                                 tmp_path):
    save = tmp_path / "run"
    cmd = _long(data, save, False)
    rc, out, err = _run_until(cmd, r"  step 1/%d  " % TOTAL, signals=(signal.SIGINT,),
                              start_new_session=True)  # the whole group, as a terminal does
    assert rc == 130, err
    done = read_file(str(save / "checkpoint.pkl"))["step"]
    assert _lines(err)[-1] == ("interrupted (Ctrl-C) after step %d: saved %s; rerun the same "
                               "command to continue (exit status 130)"
                               % (done, save / "checkpoint.pkl"))
    # two at once: out at once with 128 + SIGTERM, the checkpoint of before intact
    before = (save / "checkpoint.pkl").read_bytes()
    rc, out, err = _run_until(cmd, r"  step \d+/%d  " % TOTAL,
                              signals=(signal.SIGTERM, signal.SIGTERM))
    assert rc == 143, err
    assert _lines(err)[-1] == ("stopped at once by a second SIGTERM: nothing more was saved; "
                               "the last checkpoint, %s, is intact: rerun the same command to "
                               "continue" % (save / "checkpoint.pkl"))
    assert (save / "checkpoint.pkl").read_bytes() == before
    assert not [f for f in os.listdir(save) if f.startswith(".tmp-")]
