"""One rank's training run: `run_rank(cfg, sources, start) -> TrainResult`.

Read `run_rank` top to bottom: it is the whole algorithm (build the parts, then
`for step in range(first, total)` with the per-step LR, the stop and divergence checks, and the
eval and checkpoints at the boundaries). One global step is the only position; the epoch, the
LR, the image size and the mixing plan are functions of it, so a resumed run computes what the
uninterrupted one does. What it leans on is here too: `build` (data, model, optimizer, the
resume or the fine-tuning weights, the EMA, the compiled steps), `Checkpoints` (rank 0's saves:
when one is due, never a state that is not finite, the way back a divergence names) and
`evaluate`. engine.trainer checks everything it can in the parent and launches this on every rank.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from engine import dist
from engine.config import TrainConfig
from engine.errors import UserError, disk_error_message
from engine.schedules import lr_at

# A streak of AMP steps whose gradients all overflowed: the loss scale has halved this many times
# in a row (2**16 -> 2**-34), so the model no longer trains; the run has diverged.
MAX_OVERFLOW_STREAK = 50


def scaled_lr(per_gpu_lr: float, world_size: int) -> float:
    """The linear scaling rule used by the official train.py: lr x number of GPUs."""
    return per_gpu_lr * world_size


def loader_kwargs(config: TrainConfig, train: bool, rank: int, world_size: int) -> Dict[str, Any]:
    """Loader(...) arguments for the train or val split on one rank.

    The one place that says how the trainer drives the loader. The loaders of a node's ranks
    share its cores, so each sizes its workers for world_size / num_nodes loaders per machine;
    the val loader starts its workers for each eval and releases them after."""
    sizes: Dict[str, Any] = (
        dict(image_size=config.train_size_at, max_image_size=config.max_train_size)
        if train and config.progressive else
        dict(image_size=config.image_size) if train else
        dict(image_size=config.eval_size, crop_ratio=config.val_resize_ratio,
             skip_undecodable=True))  # eval scores each image once: no stand-ins
    return dict(
        batch_size=config.batch_size,
        train=train,
        **sizes,
        workers=config.workers,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        local_world_size=max(1, world_size // (config.num_nodes or 1)),
        persistent_workers=train,
    )


@dataclasses.dataclass
class TrainResult:
    """How a run ended, as one rank saw it (the accuracies are over the whole val set)."""

    save_dir: str
    checkpoint: Optional[str]   # the last one written (None on ranks that write none)
    epoch: int                  # the epoch a resume would continue in
    steps: int                  # global steps done
    loss: Optional[float]       # mean of the last logged interval
    top1: Optional[float]       # the last evaluation's, percent (None without one)
    top5: Optional[float]
    best_top1: Optional[float]
    img_s: Optional[float]      # mean of the logged intervals (None before the first)
    seconds: float
    world_size: int
    num_classes: int
    lr: float                   # the run's base LR (per-GPU LR x world size)
    stopped: Optional[str] = None  # the signal that stopped the run early (None: it ran out)
    exit_status: int = 0        # what tools/train.py exits with (engine.stop's table)
    resumed_from: Optional[str] = None  # the checkpoint this run continued from


class DivergedError(UserError):
    """The loss or the weights stopped being finite, or AMP overflowed too long."""


def run_rank(cfg: TrainConfig, sources: Sequence[Any], start: Any = None) -> TrainResult:
    """One rank's run, from `start` (an engine.run.RunStart; None: a new run) to the end of the
    schedule or an agreed stop."""
    import megengine as mge

    from engine import run, stop

    stop.in_rank()
    start = start if start is not None else run.RunStart()
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0  # only global rank 0 writes files: N ranks writing one would corrupt it
    # The same seed on every rank (init_process_group reseeds with time+rank), so every rank
    # builds the same initial weights even before the broadcast.
    mge.random.seed(cfg.seed)
    p = build(cfg, sources, start, rank, world)
    if main:
        run.prepare_save_dir(cfg, p.run_config, start)
    log = _open_log(cfg, p, start, main, world)
    saves = Checkpoints(cfg, p, log, start, main)
    if p.first < p.total:
        _fail_early(cfg, p, main)
    png, title = os.path.join(cfg.out_dir, "curves.png"), "%s on %s" % (
        cfg.arch, cfg.data or cfg.train_data)
    last_eval, checkpoint_path, stopped, streak = None, None, 0, 0
    t_start = t_epoch = time.perf_counter()
    eval_seconds = 0.0
    batches = p.train_loader.stream(p.first)
    p.model.train()
    step = p.first
    for step in range(p.first, p.total):
        log.before_data()
        images, labels = next(batches)
        log.after_data(len(labels))
        lr = lr_at(step, base_lr=p.base_lr, steps_per_epoch=p.steps_per_epoch,
                   epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, schedule=cfg.lr_schedule)
        for group in p.opt.param_groups:
            group["lr"] = lr  # honoured by the traced graph too (it reads the group each call)
        mix = _mix_inputs(cfg, step, rank, images.shape) if p.mixing else None
        log.add(p.train_step(mge.tensor(images), mge.tensor(labels), mix),
                p.train_step.last_step_skipped, step)
        streak = streak + 1 if p.train_step.last_step_skipped else 0
        if streak >= MAX_OVERFLOW_STREAK:  # every rank sees the same overflows: all stop here
            raise saves.diverged("the gradients overflowed in %d AMP steps in a row (steps "
                                 "%d-%d; the loss scale fell to %g)"
                                 % (streak, step + 2 - streak, step + 1,
                                    getattr(p.train_step.scaler, "scale_factor", 0.0)))
        done = step + 1
        epoch_end, last = done % p.steps_per_epoch == 0, done == p.total
        agreed = 0
        if done % cfg.print_freq == 0 or epoch_end or last:
            interval = log.interval(done, step // p.steps_per_epoch, lr, stop=stop.code(world))
            if interval.nonfinite and not cfg.amp:  # summed over the ranks: all stop here
                where = log.first_nonfinite
                raise saves.diverged(
                    "the loss is %s at step %d" % (where[1], where[0] + 1) if where
                    else "the loss is not finite on another rank by step %d" % done)
            agreed = stop.decode(interval.stop, world)
        if world == 1 and not agreed:
            agreed = stop.requested()  # one process needs no agreement: stop after this step
        stopping = bool(agreed) and not last
        is_best = False
        if (epoch_end or last) and not stopping:  # a stop saves first: the time may be short
            t_eval = time.perf_counter()
            results = evaluate(p, log, done)
            eval_seconds += time.perf_counter() - t_eval
            if results is not None:
                last_eval, is_best = results[""], p.best.add(results)
        if saves.due(done, epoch_end or last or stopping):
            checkpoint_path = saves.save(done, is_best) or checkpoint_path
        if epoch_end:
            log.epoch_done(step // p.steps_per_epoch, time.perf_counter() - t_epoch, eval_seconds)
            t_epoch, eval_seconds = time.perf_counter(), 0.0
        if main and (epoch_end or last):
            _plot(log, png, title)
        if stopping:
            stopped = agreed
            stop.note_agreed(agreed)
            log.event("stop", done, signal=stop.name(agreed), checkpoint=saves.newest)
            if epoch_end and p.val_loader is not None:
                log.say("the eval of epoch %d is left out to stop quickly (tools/test.py scores "
                        "%s)" % (step // p.steps_per_epoch, saves.newest))
            break
    log.close()
    p.train_loader.close()
    if p.val_loader is not None:
        p.val_loader.close()
    done = step + 1 if stopped else max(p.first, p.total)
    return TrainResult(
        save_dir=cfg.out_dir, checkpoint=checkpoint_path or (saves.newest if main else None),
        epoch=done // p.steps_per_epoch, steps=done,
        loss=log.last_loss, top1=last_eval["top1"] if last_eval else None,
        top5=last_eval["top5"] if last_eval else None, best_top1=p.best.top1,
        img_s=log.mean_img_s(), seconds=time.perf_counter() - t_start, world_size=world,
        num_classes=len(p.classes), lr=p.base_lr,
        stopped=stop.name(stopped) if stopped else None,
        exit_status=stop.exit_status(stopped), resumed_from=start.checkpoint)


# --------------------------------------------------------------------------------------------
# The parts of a run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Best:
    """The best val top-1 so far: of the live weights (what the run reports), and of what
    best.pkl follows (the EMA's score when the run keeps one, as timm does: what it delivers)."""

    top1: Optional[float] = None
    score: Optional[float] = None

    def add(self, results: Mapping[str, Mapping[str, float]]) -> bool:
        """Take one eval's results ({"": live, "ema": ...}); True when best.pkl should follow."""
        live = results[""]["top1"]
        if self.top1 is None or live > self.top1:
            self.top1 = live
        score = results["ema" if "ema" in results else ""]["top1"]
        if self.score is None or score > self.score:
            self.score = score
            return True
        return False


@dataclasses.dataclass
class Parts:
    """What a rank trains with, as `build` made it."""

    train_loader: Any
    val_loader: Any              # None without eval
    classes: List[str]
    steps_per_epoch: int
    first: int                   # the global step the run starts at (a resume's step, else 0)
    total: int                   # the global step it ends at
    base_lr: float
    model: Any
    opt: Any
    scaler: Any                  # the AMP loss scaler, or None
    ema: Any                     # engine.ema.ModelEMA, or None
    train_step: Any
    evals: Dict[str, Tuple[Any, Any]]  # "" (live weights) / "ema" -> (module, EvalStep)
    run_config: Dict[str, Any]
    best: Best
    mixing: bool


def build(cfg: TrainConfig, sources: Sequence[Any], start: Any, rank: int, world: int) -> Parts:
    """This rank's loaders, model, optimizer and steps, with the state `start` continues from
    (or the fine-tuning weights of a new run)."""
    from engine import checkpoint as ckpt
    from engine import steps

    train_loader, val_loader = _loaders(cfg, sources, rank, world)
    steps_per_epoch, classes = len(train_loader), list(train_loader.classes)
    model, gm, opt, scaler = _model_and_optimizer(cfg, len(classes), world)
    first, best, saved_ema = 0, Best(), None
    if start.checkpoint:
        saved = ckpt.read(start.checkpoint, trusted=cfg.trust_pickle or None)
        first = saved.resume_step(cfg, classes, world, steps_per_epoch)
        saved.restore(model, opt, scaler)
        best = Best(saved.metrics.get("best_top1"), (saved.metrics.get("best") or {}).get("top1"))
        saved_ema = saved.ema
    else:
        from engine.finetune import start_from

        start_from(model, cfg, classes)  # --pretrained / --weights (fine-tuning), else nothing
    # The average starts from the weights the run continues with: made after they are loaded.
    ema = _make_ema(cfg, model, saved_ema)
    total = cfg.epochs * steps_per_epoch
    total = total if cfg.max_steps is None else min(total, cfg.max_steps)
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
    train_step = steps.TrainStep(
        model, gm, opt, trace=cfg.trace, amp=cfg.amp, scaler=scaler,
        label_smoothing=cfg.label_smoothing, mix=mixing, num_classes=len(classes),
        dtr_bytes=steps.dtr_threshold(cfg.dtr) if cfg.dtr else None, ema=ema)
    evals = {"": (model, steps.EvalStep(model, num_classes=len(classes),
                                                  trace=cfg.trace, amp=cfg.amp))}
    if ema is not None:  # the averaged weights are scored beside the live ones
        evals["ema"] = (ema.module, steps.EvalStep(
            ema.module, num_classes=len(classes), trace=cfg.trace, amp=cfg.amp))
    return Parts(train_loader=train_loader, val_loader=val_loader, classes=classes,
                 steps_per_epoch=steps_per_epoch, first=first, total=total,
                 base_lr=scaled_lr(cfg.learning_rate, world), model=model, opt=opt,
                 scaler=scaler, ema=ema, train_step=train_step, evals=evals,
                 run_config=ckpt.run_config(cfg, classes, world,
                                            train_images=train_loader.num_samples),
                 best=best, mixing=mixing)


class Checkpoints:
    """Rank 0's checkpoints of a run: when one is due, writing it (never a state whose loss or
    weights are not finite), and the way back that a divergence's error names. Other ranks
    write nothing and pay for no device-to-host copy."""

    def __init__(self, cfg: TrainConfig, parts: Parts, log: Any, start: Any, main: bool):
        self.cfg, self.p, self.log, self.main = cfg, parts, log, main
        self.last_step: Optional[int] = parts.first if start.checkpoint else None
        self.newest: Optional[str] = start.checkpoint
        self.every_s = 60.0 * cfg.save_every_minutes
        self.t_saved = time.monotonic()

    def due(self, done: int, boundary: bool) -> bool:
        """At an epoch end, the last step or a stop (`boundary`), every --save-every steps and
        every --save-every-minutes (timed by rank 0, which alone writes)."""
        timed = self.main and self.every_s > 0 and time.monotonic() - self.t_saved >= self.every_s
        return boundary or timed or bool(self.cfg.save_every and done % self.cfg.save_every == 0)

    def save(self, step: int, best: bool = False) -> Optional[str]:
        """Rank 0: checkpoint step `step` (and best.pkl with `best`); the path, or None."""
        from engine import checkpoint as ckpt

        if not self.main or step == self.last_step:
            return None
        log, p = self.log, self.p
        log.read_pending()
        if log.first_nonfinite is not None and not self.cfg.amp:
            raise self.diverged("the loss is %s at step %d"
                                % (log.first_nonfinite[1], log.first_nonfinite[0] + 1))
        try:
            path = ckpt.save(ckpt.Checkpoint(
                step=step, steps_per_epoch=p.steps_per_epoch, model=p.model.state_dict(),
                optimizer=p.opt.state_dict(),
                scaler=p.scaler.state_dict() if p.scaler is not None else None,
                ema=p.ema.state_dict() if p.ema is not None else None, config=p.run_config,
                metrics={"best_top1": p.best.top1,
                         "best": {"top1": p.best.score, "of": "ema" if p.ema else "live"}}),
                self.cfg.out_dir, keep=self.cfg.keep_checkpoints, best=best)
        except ckpt.NonFiniteState as exc:
            raise self.diverged("the weights of step %d are not finite (%s holds nan or inf)"
                                % (step, exc.where)) from None
        self.last_step, self.newest, self.t_saved = step, path, time.monotonic()
        return path

    def diverged(self, what: str) -> DivergedError:
        """The one-line error of a diverged run: what went wrong, where, and the way back."""
        finite, lr = self.log.last_finite, self.cfg.learning_rate
        last = ("; the last finite loss was %.6g, at step %d" % (finite[1], finite[0] + 1)
                if finite else "")
        if self.newest:
            way = ("nothing after step %s was saved, so %s (step %s) is the last good "
                   "checkpoint; to continue from it, rerun this command with a lower --lr (this "
                   "run's is %g) and --allow-changes learning_rate"
                   % (self.last_step, self.newest, self.last_step, lr))
        else:
            way = ("no checkpoint was saved before it; rerun this command with a lower --lr "
                   "(this run's is %g) and --replace to start the run again" % lr)
        return DivergedError("training diverged: %s%s. %s" % (what, last, way))


def evaluate(p: Parts, log: Any, step: int) -> Optional[Dict[str, Dict[str, float]]]:
    """Score the live weights (and the EMA) on the whole val set; None without eval."""
    if p.val_loader is None:
        return None
    from engine.evaluate import run_eval

    results = {}
    for name, (net, eval_step) in p.evals.items():
        dist.broadcast_buffers(net)  # every rank scores rank 0's BN statistics
        net.eval()
        results[name] = run_eval(eval_step, p.val_loader)
        log.eval(step, (step - 1) // p.steps_per_epoch, results[name], name)
    p.model.train()
    return results


def _fail_early(cfg: TrainConfig, p: Parts, main: bool) -> None:
    """The largest sizes now, not hours in at the end of a resizing ramp."""
    from engine import steps

    largest = cfg.max_train_size
    note = steps.fail_early(
        p.train_step, list(p.evals.values()), batch_size=cfg.batch_size,
        train_size=(largest if cfg.train_size_at(p.first // p.steps_per_epoch) < largest
                    else None),
        eval_size=cfg.eval_size if p.val_loader is not None else None)
    if main and note:
        print(note, file=sys.stderr)


def _open_log(cfg: TrainConfig, p: Parts, start: Any, main: bool, world: int) -> Any:
    """The run's TrainLog, after its start-up summary and its start or resume record."""
    from engine.metrics import TrainLog

    log = TrainLog(os.path.join(cfg.out_dir, "metrics.jsonl"), enabled=main, start=p.first,
                   total=p.total, world_size=world, reduce=dist.all_reduce_sum,
                   progress=cfg.progress, epochs=cfg.epochs,
                   description="%s, %d steps/epoch" % (cfg.arch, p.steps_per_epoch),
                   tensorboard=cfg.tensorboard)
    from engine.run import startup_summary

    for line in startup_summary(cfg, world=world, steps_per_epoch=p.steps_per_epoch,
                                total=p.total, first=p.first, start=start, base_lr=p.base_lr,
                                train_loader=p.train_loader, val_loader=p.val_loader):
        log.say(line)
    if start.checkpoint:
        log.event("resume", p.first, checkpoint=start.checkpoint,
                  changes={c.name: [c.saved, c.now] for c in start.changes})
    else:
        log.event("start", 0)
    return log


def _plot(log: Any, png: str, title: str) -> None:
    """curves.png from metrics.jsonl; a disk that refuses it costs the picture, not the run."""
    from engine.metrics import plot_curves, read_metrics

    try:
        plot_curves(read_metrics(log.log.path), png, title=title)
    except OSError as exc:
        log._warn("warning: %s; training goes on without the picture"
                  % disk_error_message(exc, png).split("; ")[0])


def _loaders(cfg: TrainConfig, sources: Sequence[Any], rank: int, world: int):
    """(train loader, val loader or None): this rank's share of every epoch."""
    from engine.data import Loader

    try:
        train_loader = Loader(sources[0], **loader_kwargs(cfg, True, rank, world))
        val_loader = Loader(sources[1], **loader_kwargs(cfg, False, rank, world)) \
            if cfg.evaluate else None
    except (ValueError, OSError) as exc:  # batch larger than the data, unreadable folders
        raise UserError("--data %s: %s" % (cfg.data or cfg.train_data,
                                           " ".join(str(exc).split()))) from None
    if len(train_loader) == 0:
        raise UserError("the training set has fewer images than one global batch (%d)"
                        % (cfg.batch_size * world))
    return train_loader, val_loader


def _model_and_optimizer(cfg: TrainConfig, num_classes: int, world: int):
    """(model, grad manager, optimizer, AMP scaler or None), identical on every rank."""
    import megengine.optimizer as optim
    from megengine.autodiff import GradManager

    from engine import steps
    from engine.models import get_model
    from engine.optim import LARS, param_groups

    model = get_model(cfg.arch, num_classes=num_classes)
    dist.broadcast_module(model)
    gm = GradManager().attach(model.parameters(), callbacks=dist.allreduce_callback())
    groups = param_groups(model, cfg.weight_decay, cfg.no_wd_norm_bias)
    lr = scaled_lr(cfg.learning_rate, world)
    if cfg.optimizer == "lars":
        opt = LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = steps.make_grad_scaler() if cfg.amp else None
    return model, gm, opt, scaler


def _make_ema(cfg: TrainConfig, model, saved: Optional[Mapping[str, Any]] = None):
    """The weights' moving average (--ema-decay), or None: made from `model` as it is now (the
    resumed weights), or the checkpoint's `saved` average at this run's decay."""
    if cfg.ema_decay is None:
        return None
    from engine.ema import ModelEMA

    ema = ModelEMA(model, cfg.ema_decay, warmup=True, trace=cfg.trace)
    if saved:
        ema.load_state_dict(dict(saved))
        ema.decay = float(cfg.ema_decay)  # an allowed change of the decay applies from here
    return ema


def _mix_inputs(cfg: TrainConfig, step: int, rank: int, shape: Tuple[int, ...]):
    """This rank's Mixup/CutMix plan for `step` as step inputs: drawn from (seed, step, rank),
    so a resumed run mixes exactly as an uninterrupted one."""
    import megengine as mge

    from engine.mix import mix_plan

    n, _, h, w = shape
    plan = mix_plan(n, h, w, step=step, seed=cfg.seed, mixup_alpha=cfg.mixup_alpha,
                    cutmix_alpha=cfg.cutmix_alpha, rank=rank)
    return (mge.tensor(plan.perm), mge.tensor(plan.rows), mge.tensor(plan.cols),
            mge.tensor(np.float32(plan.lam)))
