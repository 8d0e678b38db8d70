"""ImageNet training: `train(TrainConfig(...)) -> TrainResult`.

Read `_train_worker` top to bottom: it is the whole algorithm (data, model, optimizer, resume,
then `for step in range(start, total)` with the per-step LR, logging, eval and checkpoints at
the boundaries). One global step is the only position; the epoch, the LR, the image size and
the mixing plan are functions of it. The pure pieces it uses (LR scaling,
data paths, loader arguments) are small functions tested without a GPU.

The defaults (engine/config.py) follow the MegEngine 0.x train.py that produced the published
weights: 32 images and lr 0.0125 per GPU (lr x world size), SGD momentum 0.9, wd 1e-4 on all
parameters, x0.1 at epochs 30/60/80, no warmup, no label smoothing. The modern options (EMA,
Mixup/CutMix, LARS, no decay on norms, progressive resizing, test resolution) are off unless a
flag or a recipe (engine/recipes/*.json) turns them on.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from engine import dist
from engine.errors import UserError, disk_error_message

if TYPE_CHECKING:
    from engine.data.folder import FolderIndex

from engine.config import TrainConfig
from engine.schedules import lr_at

# --------------------------------------------------------------------------------------------
# Pure pieces (tested directly)
# --------------------------------------------------------------------------------------------


def scaled_lr(per_gpu_lr: float, world_size: int) -> float:
    """Linear scaling rule: the global batch grows with the world size, so does the LR."""
    return per_gpu_lr * world_size


def resolve_data(data: Optional[str], train_data: Optional[str] = None,
                 val_data: Optional[str] = None, evaluate: bool = True) -> Tuple[str, Optional[str]]:
    """(train split, val split or None without `evaluate`): --train-data / --val-data, else
    --data ROOT's train/ and val/; each is a packed split (meta.json) or raw folders."""
    if data is not None and not os.path.isdir(data):
        raise UserError("--data: no such folder: %s" % data)
    wanted = [("--train-data", train_data, "train")] + \
        ([("--val-data", val_data, "val")] if evaluate else [])
    dirs, missing = [], []
    for flag, given, sub in wanted:
        if given is not None:
            if not os.path.isdir(given):
                raise UserError("%s: no such folder: %s" % (flag, given))
            dirs.append(given)
            continue
        assert data is not None, "TrainConfig.finalized() requires --data without %s" % flag
        dirs.append(os.path.join(data, sub))
        if not os.path.isdir(dirs[-1]):
            missing.append(dirs[-1])
    if missing:
        raise UserError(
            "--data %s must hold train/%s (raw <wnid>/*.JPEG folders or packed shards with "
            "meta.json); missing: %s%s" % (data, " and val/" if evaluate else "",
                                          ", ".join(missing),
                                          "" if not evaluate or val_data else
                                          " (--no-eval trains without a val split)"))
    return dirs[0], dirs[1] if evaluate else None


def check_arch(arch: str) -> None:
    """An unknown --arch fails here, before any data is opened or process started."""
    from engine.models import ARCHS

    if arch.strip().lower().replace("-", "_") not in ARCHS:
        raise UserError("--arch %s: unknown architecture; valid names: %s"
                        % (arch, ", ".join(ARCHS)))


def split_source(split_dir: str) -> Union[str, "FolderIndex"]:
    """What each rank's Loader reads, checked up front so bad data fails in seconds, before any
    model or loader is built: a packed split's meta.json is validated (missing: an interrupted
    pack; unknown version; not JSON) and its path returned; a raw folder is scanned here, once
    per node, and its file list shared with the forked ranks (N ranks scanning a tree of a
    million files each would take minutes on a network file system)."""
    from engine.data import shards
    from engine.data.folder import index_folder

    if shards.is_packed(split_dir):
        shards.read_meta(split_dir)  # raises ShardError, a UserError, with the fix
        return split_dir
    return index_folder(split_dir)  # raises LayoutError, a UserError


def loader_kwargs(config: TrainConfig, train: bool, rank: int, world_size: int) -> Dict[str, Any]:
    """Arguments for engine.data.Loader: each rank reads its own share of every epoch.

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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


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


# A streak of AMP steps whose gradients all overflowed: the loss scale has halved this many times
# in a row (2**16 -> 2**-34), so the model no longer trains; the run has diverged.
MAX_OVERFLOW_STREAK = 50


def train(config: TrainConfig) -> Optional[TrainResult]:
    """Train (one process per GPU, or one CPU process) and return rank 0's result (None on
    nodes other than rank 0's).

    Everything that can be checked without building a model is checked here, in the parent,
    before any process is launched or tensor created (the launcher's children must not inherit
    a CUDA context): the data, the arch, and what starting into the save dir means
    (engine.run.plan: a new run, the continuation of the one there, or a refusal that changes
    nothing on disk). SIGTERM, SIGUSR1 and Ctrl-C stop the run after a step with a checkpoint
    (engine.stop).
    """
    from engine import run, steps, stop

    if config.dtr and config.trace:
        print("note: --dtr runs the steps eagerly (MegEngine supports DTR in eager mode only), "
              "so --trace is off for this run", file=sys.stderr)
    if dist.cpu_collectives():
        print(dist.cpu_backend.NOTE, file=sys.stderr)
        config = dataclasses.replace(config, trace=False)
    cfg = config.finalized().with_cluster(os.environ)
    layout = cfg.node_layout()
    dist.check_one_process_per_node(os.environ)
    # This machine's own verdict, so given before any rendezvous: a CPU-only node of a
    # multi-node run stops now with the reason instead of waiting for the other nodes. (The
    # test-only CPU collectives run several CPU ranks on purpose.)
    if not dist.cpu_collectives():
        dist.require_gpus(cfg.ngpus, dist.gpu_count(), layout.num_nodes)
    # Each node runs these checks itself (paths may exist on one node and not another); in a
    # multi-node run a failure is reported at the rendezvous instead of raised here, so that
    # every node stops with the same message rather than waiting for this one.
    problem, ngpus, sources = None, None, []
    start = run.RunStart()
    try:
        steps.require_amp_device(cfg.amp)
        check_arch(cfg.arch)
        sources = [split_source(d) for d in _data_dirs(cfg) if d is not None]
        ngpus = dist.processes_per_node(cfg.ngpus, layout.num_nodes)
        cfg, note = cfg.for_world_size(ngpus * layout.num_nodes)
        if note and layout.node_rank == 0:
            print(note, file=sys.stderr)
        classes, train_images = source_facts(sources[0])
        start = run.plan(cfg, world_size=ngpus * layout.num_nodes, classes=classes,
                         train_images=train_images)
    except UserError as exc:
        if layout.num_nodes == 1:
            raise
        problem = " ".join(str(exc).split())
    if layout.num_nodes > 1:  # before the ranks are forked: they inherit the choice
        print(dist.configure_interfaces(layout.master_ip, os.environ), file=sys.stderr)
    report = dist.node_report(num_nodes=layout.num_nodes, ngpus=ngpus, error=problem,
                              resume=start.checkpoint)
    with stop.handling(ranks=(ngpus or 1) * layout.num_nodes > 1):
        try:
            result = dist.launch(
                _train_worker, cfg, sources, start,
                ngpus=ngpus or 1, num_nodes=layout.num_nodes, node_rank=layout.node_rank,
                master_ip=layout.master_ip, master_port=layout.master_port,
                report=report, rendezvous_timeout=cfg.rendezvous_timeout,
                heartbeat_timeout=cfg.heartbeat_timeout,
            )
        except stop.StopNow:
            stop.end_ranks()
            raise
    if result is not None and result.stopped and layout.num_nodes > 1:
        # srun --kill-on-bad-exit ends the tasks still running when one exits non-zero, and
        # srun's own status then shows their deaths: let the other nodes (which exit 0 after a
        # stop) finish first, so that the status a requeue script tests is this node's.
        time.sleep(stop.NODE_EXIT_GRACE_S)
    return result


def source_facts(source: Any) -> Tuple[List[str], int]:
    """(classes, number of records) of what split_source returned, without opening a shard
    (this process forks the ranks: no LMDB environment may be open across the fork)."""
    from engine.data import shards

    if isinstance(source, str):
        meta = shards.read_meta(source, check_files=False)
        return list(meta["classes"]), int(meta["num_samples"])
    return list(source.classes), len(source.items)


def _train_worker(cfg: TrainConfig, sources: Sequence[Any] = (), start: Any = None) -> TrainResult:
    """One rank's run. The position is one number, the global step; everything else (epoch,
    LR, when to log, evaluate and save) is derived from it."""
    import megengine as mge

    from engine import checkpoint as ckpt
    from engine import run, steps, stop
    from engine.metrics import TrainLog, read_metrics

    stop.in_rank()
    start = start if start is not None else run.RunStart()
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0  # only global rank 0 writes files: N ranks writing one would corrupt it
    # The same seed on every rank (init_process_group reseeds with time+rank), so every rank
    # builds the same initial weights even before the broadcast.
    mge.random.seed(cfg.seed)
    train_loader, val_loader = _loaders(cfg, sources or _data_dirs(cfg), rank, world)
    steps_per_epoch, classes = len(train_loader), list(train_loader.classes)
    model, gm, opt, scaler = _model_and_optimizer(cfg, len(classes), world)
    run_config = ckpt.run_config(cfg, classes, world, train_images=train_loader.num_samples)
    first, best_top1, best_score, saved_ema = 0, None, None, None
    if start.checkpoint:
        saved = ckpt.read(start.checkpoint, trusted=cfg.trust_pickle or None)
        first = saved.resume_step(cfg, classes, world, steps_per_epoch)
        saved.restore(model, opt, scaler)
        best_top1, saved_ema = saved.metrics.get("best_top1"), saved.ema
        best_score = (saved.metrics.get("best") or {}).get("top1")
    else:
        from engine.finetune import start_from

        start_from(model, cfg, classes)  # --pretrained / --weights (fine-tuning), else nothing
    # The average starts from the weights the run continues with: made after they are loaded.
    ema = _make_ema(cfg, model, saved_ema)
    total = cfg.epochs * steps_per_epoch
    total = total if cfg.max_steps is None else min(total, cfg.max_steps)
    base_lr = scaled_lr(cfg.learning_rate, world)
    if main:
        _prepare_save_dir(cfg, run_config, start)
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
    log = TrainLog(os.path.join(cfg.out_dir, "metrics.jsonl"), enabled=main, start=first,
                   total=total, world_size=world, reduce=dist.all_reduce_sum,
                   progress=cfg.progress, epochs=cfg.epochs,
                   description="%s, %d steps/epoch" % (cfg.arch, steps_per_epoch),
                   tensorboard=cfg.tensorboard)
    for line in startup_summary(cfg, world=world, steps_per_epoch=steps_per_epoch, total=total,
                                first=first, start=start, base_lr=base_lr,
                                train_loader=train_loader, val_loader=val_loader):
        log.say(line)
    if start.checkpoint:
        log.event("resume", first, checkpoint=start.checkpoint,
                  changes={c.name: [c.saved, c.now] for c in start.changes})
    else:
        log.event("start", 0)
    png = os.path.join(cfg.out_dir, "curves.png")
    last_saved: Optional[int] = first if start.checkpoint else None
    newest: Optional[str] = start.checkpoint
    save_seconds = 60.0 * cfg.save_every_minutes
    t_saved = time.monotonic()

    def save(step: int, best: bool = False) -> Optional[str]:
        """Rank 0: checkpoint step `step` (never one whose loss or weights are not finite)."""
        nonlocal last_saved, newest, t_saved
        if not main or step == last_saved:
            return None
        log.read_pending()
        if log.first_nonfinite is not None and not cfg.amp:
            raise _diverged(cfg, log, newest, last_saved, "the loss is %s at step %d"
                            % (log.first_nonfinite[1], log.first_nonfinite[0] + 1))
        try:
            path = ckpt.save(ckpt.Checkpoint(
                step=step, steps_per_epoch=steps_per_epoch, model=model.state_dict(),
                optimizer=opt.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                ema=ema.state_dict() if ema is not None else None, config=run_config,
                metrics={"best_top1": best_top1,
                         "best": {"top1": best_score, "of": "ema" if ema else "live"}}),
                cfg.out_dir, keep=cfg.keep_checkpoints, best=best)
        except ckpt.NonFiniteState as exc:
            raise _diverged(cfg, log, newest, last_saved, "the weights of step %d are not "
                            "finite (%s holds nan or inf)" % (step, exc.where)) from None
        last_saved, newest, t_saved = step, path, time.monotonic()
        return path

    def evaluate(step: int) -> Optional[Dict[str, Dict[str, float]]]:
        if val_loader is None:
            return None
        from engine.evaluate import run_eval

        results = {}
        for name, (net, eval_step) in evals.items():
            dist.broadcast_buffers(net)  # every rank scores rank 0's BN statistics
            net.eval()
            results[name] = run_eval(eval_step, val_loader)
            log.eval(step, (step - 1) // steps_per_epoch, results[name], name)
        model.train()
        return results

    if first < total:  # the largest sizes now, not hours in at the end of a resizing ramp
        largest = cfg.max_train_size
        note = steps.fail_early(
            train_step, list(evals.values()), batch_size=cfg.batch_size,
            train_size=largest if cfg.train_size_at(first // steps_per_epoch) < largest else None,
            eval_size=cfg.eval_size if val_loader is not None else None)
        if main and note:
            print(note, file=sys.stderr)
    last_eval, checkpoint_path, stopped = None, None, 0
    streak = 0
    t_start = time.perf_counter()
    t_epoch, eval_seconds = time.perf_counter(), 0.0
    batches = train_loader.stream(first)
    model.train()
    for step in range(first, total):
        log.before_data()
        images, labels = next(batches)
        log.after_data(len(labels))
        lr = lr_at(step, base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                   warmup_epochs=cfg.warmup_epochs, schedule=cfg.lr_schedule)
        for group in opt.param_groups:
            group["lr"] = lr  # honoured by the traced graph too (it reads the group each call)
        mix = _mix_inputs(cfg, step, rank, images.shape) if mixing else None
        log.add(train_step(mge.tensor(images), mge.tensor(labels), mix),
                train_step.last_step_skipped, step)
        streak = streak + 1 if train_step.last_step_skipped else 0
        if streak >= MAX_OVERFLOW_STREAK:  # every rank sees the same overflows: all stop here
            raise _diverged(cfg, log, newest, last_saved, "the gradients overflowed in %d AMP "
                            "steps in a row (steps %d-%d; the loss scale fell to %g)"
                            % (streak, step + 2 - streak, step + 1,
                               getattr(train_step.scaler, "scale_factor", 0.0)))
        done = step + 1
        epoch_end, last = done % steps_per_epoch == 0, done == total
        agreed = 0
        if done % cfg.print_freq == 0 or epoch_end or last:
            interval = log.interval(done, step // steps_per_epoch, lr, stop=stop.code(world))
            if interval.nonfinite and not cfg.amp:  # summed over the ranks: all stop here
                where = log.first_nonfinite
                what = ("the loss is %s at step %d" % (where[1], where[0] + 1) if where
                        else "the loss is not finite on another rank by step %d" % done)
                raise _diverged(cfg, log, newest, last_saved, what)
            agreed = stop.decode(interval.stop, world)
        if world == 1 and not agreed:
            agreed = stop.requested()  # one process needs no agreement: stop after this step
        stopping = bool(agreed) and not last
        is_best = False
        if (epoch_end or last) and not stopping:  # a stop saves first: the time may be short
            t_eval = time.perf_counter()
            results = evaluate(done)
            eval_seconds += time.perf_counter() - t_eval
            if results is not None:
                last_eval = results[""]
                if best_top1 is None or last_eval["top1"] > best_top1:
                    best_top1 = last_eval["top1"]
                # best.pkl follows the EMA's score when the run keeps one (what it delivers)
                score = results["ema" if "ema" in results else ""]["top1"]
                if best_score is None or score > best_score:
                    best_score, is_best = score, True
        timed = main and save_seconds > 0 and time.monotonic() - t_saved >= save_seconds
        if (epoch_end or last or stopping or timed
                or (cfg.save_every and done % cfg.save_every == 0)):
            checkpoint_path = save(done, is_best) or checkpoint_path
        if epoch_end:
            log.epoch_done(step // steps_per_epoch, time.perf_counter() - t_epoch, eval_seconds)
            t_epoch, eval_seconds = time.perf_counter(), 0.0
        if epoch_end or last:
            if main:
                _plot(log, png, read_metrics, "%s on %s" % (cfg.arch, cfg.data or cfg.train_data))
        if stopping:
            stopped = agreed
            stop.note_agreed(agreed)
            log.event("stop", done, signal=stop.name(agreed), checkpoint=newest)
            if epoch_end and val_loader is not None:
                log.say("the eval of epoch %d is left out to stop quickly (tools/test.py scores "
                        "%s)" % (step // steps_per_epoch, newest))
            break
    log.close()
    train_loader.close()
    if val_loader is not None:
        val_loader.close()
    done = step + 1 if stopped else max(first, total)
    return TrainResult(
        save_dir=cfg.out_dir, checkpoint=checkpoint_path or (newest if main else None),
        epoch=done // steps_per_epoch, steps=done,
        loss=log.last_loss, top1=last_eval["top1"] if last_eval else None,
        top5=last_eval["top5"] if last_eval else None, best_top1=best_top1,
        img_s=log.mean_img_s(), seconds=time.perf_counter() - t_start, world_size=world,
        num_classes=len(classes), lr=base_lr, stopped=stop.name(stopped) if stopped else None,
        exit_status=stop.exit_status(stopped), resumed_from=start.checkpoint)


def _plot(log: Any, png: str, read: Any, title: str) -> None:
    """curves.png from metrics.jsonl; a disk that refuses it costs the picture, not the run."""
    from engine.metrics import plot_curves

    try:
        plot_curves(read(log.log.path), png, title=title)
    except OSError as exc:
        log._warn("warning: %s; training goes on without the picture"
                  % disk_error_message(exc, png).split("; ")[0])


def _diverged(cfg: TrainConfig, log: Any, newest: Optional[str], newest_step: Optional[int],
              what: str) -> UserError:
    """The one-line error of a diverged run: what went wrong, where, and the way back."""
    finite = log.last_finite
    last = ("; the last finite loss was %.6g, at step %d" % (finite[1], finite[0] + 1)
            if finite else "")
    if newest:
        way = ("nothing after step %s was saved, so %s (step %s) is the last good checkpoint; "
               "to continue from it, rerun this command with a lower --lr (this run's is %g) and "
               "--allow-changes learning_rate" % (newest_step, newest, newest_step,
                                                   cfg.learning_rate))
    else:
        way = ("no checkpoint was saved before it; rerun this command with a lower --lr (this "
               "run's is %g) and --replace to start the run again" % cfg.learning_rate)
    return DivergedError("training diverged: %s%s. %s" % (what, last, way))


class DivergedError(UserError):
    """The loss or the weights stopped being finite, or AMP overflowed too long."""


def startup_summary(cfg: TrainConfig, *, world: int, steps_per_epoch: int, total: int,
                    first: int, start: Any, base_lr: float, train_loader: Any,
                    val_loader: Any) -> List[str]:
    """The lines a run's log starts with (rank 0): what is about to run, and from where."""
    nodes = cfg.num_nodes or 1
    per_node = max(1, world // nodes)
    if start.checkpoint:
        epoch, pos = divmod(first, steps_per_epoch)
        where = ("continuing the run in %s from %s: step %d (epoch %d, step %d of %d in it)"
                 % (cfg.out_dir, start.checkpoint, first, epoch, pos, steps_per_epoch))
    else:
        where = "a new run in %s" % cfg.out_dir
    lines = ["run: " + where]
    lines += ["note: " + n for n in start.notes]
    warmup = ", warmup %g epochs" % cfg.warmup_epochs if cfg.warmup_epochs else ""
    unit = "GPU" if dist.gpu_count() else "CPU process"
    lines.append("world: %d rank%s = %d node%s x %d %s%s; global batch %d (%d per rank); LR %g "
                 "after scaling (%g per rank x %d), %s schedule%s"
                 % (world, "" if world == 1 else "s", nodes, "" if nodes == 1 else "s", per_node,
                    unit, "" if per_node == 1 else "es" if unit.endswith("s") else "s",
                    cfg.batch_size * world, cfg.batch_size, base_lr, cfg.learning_rate, world,
                    cfg.lr_schedule, warmup))
    lines.append("steps: %d per epoch, %d in total (%d epochs%s), %d to go"
                 % (steps_per_epoch, total, cfg.epochs,
                    ", --max-steps %d" % cfg.max_steps if cfg.max_steps is not None else "",
                    max(0, total - first)))
    val = (", val %d images" % val_loader.num_samples) if val_loader is not None else ", no eval"
    lines.append("data: %s: %d train images%s; %d workers per loader (%d ranks per node), %.1f MB "
                 "shared ring per loader (%d slots)"
                 % (cfg.data, train_loader.num_samples, val, train_loader.workers,
                    train_loader.local_world_size, train_loader.shared_memory_bytes / 1e6,
                    train_loader.slots))
    when = ["every %g min" % cfg.save_every_minutes] if cfg.save_every_minutes else []
    when += ["every %d steps" % cfg.save_every] if cfg.save_every else []
    when += ["at each epoch end and on SIGTERM/SIGUSR1 (exit 75) or Ctrl-C (exit 130)"]
    lines.append("checkpoints: %s; checkpoint.pkl is the newest, the last %d kept as "
                 "checkpoint-<step>.pkl, best.pkl by val top-1 of the %s"
                 % (", ".join(when), cfg.keep_checkpoints,
                    "EMA" if cfg.ema_decay is not None else "weights"))
    return lines


def _data_dirs(cfg: TrainConfig) -> Tuple[str, Optional[str]]:
    return resolve_data(cfg.data, cfg.train_data, cfg.val_data, cfg.evaluate)


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


def _prepare_save_dir(cfg: TrainConfig, run_config: Dict[str, Any], start: Any) -> None:
    """Rank 0: move a replaced run aside, clear dead temp files, write config.json."""
    import json

    from engine import checkpoint as ckpt
    from engine import run
    from engine.atomic import atomic_write

    if start.replace:
        moved = run.replace_run(cfg.out_dir)
        if moved:
            print("note: the run that was in %s is now in %s (nothing was deleted)"
                  % (cfg.out_dir, moved), file=sys.stderr)
    ckpt.clean_temp_files(cfg.out_dir)
    path = os.path.join(cfg.out_dir, run.CONFIG_FILE)
    text = json.dumps(run_config, indent=1, sort_keys=True) + "\n"
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as exc:
        raise UserError(disk_error_message(exc, path)) from None
