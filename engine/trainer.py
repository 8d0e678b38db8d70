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
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

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


def train(config: TrainConfig) -> Optional[TrainResult]:
    """Train (one process per GPU, or one CPU process) and return rank 0's result (None on
    nodes other than rank 0's).

    Everything that can be checked without building a model is checked here, in the parent,
    before any process is launched or tensor created (the launcher's children must not inherit
    a CUDA context).
    """
    from engine import steps
    from engine.checkpoint import resolve_resume

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
    problem, ngpus, resume, sources = None, None, None, []
    try:
        steps.require_amp_device(cfg.amp)
        check_arch(cfg.arch)
        sources = [split_source(d) for d in _data_dirs(cfg) if d is not None]
        resume = resolve_resume(cfg.resume) if cfg.resume else None
        ngpus = dist.processes_per_node(cfg.ngpus, layout.num_nodes)
        cfg, note = cfg.for_world_size(ngpus * layout.num_nodes)
        if note and layout.node_rank == 0:
            print(note, file=sys.stderr)
    except UserError as exc:
        if layout.num_nodes == 1:
            raise
        problem = " ".join(str(exc).split())
    if layout.num_nodes > 1:  # before the ranks are forked: they inherit the choice
        print(dist.configure_interfaces(layout.master_ip, os.environ), file=sys.stderr)
    report = dist.node_report(num_nodes=layout.num_nodes, ngpus=ngpus, error=problem,
                              resume=resume)
    return dist.launch(
        _train_worker, cfg, sources,
        ngpus=ngpus or 1, num_nodes=layout.num_nodes, node_rank=layout.node_rank,
        master_ip=layout.master_ip, master_port=layout.master_port,
        report=report, rendezvous_timeout=cfg.rendezvous_timeout,
        heartbeat_timeout=cfg.heartbeat_timeout,
    )


def _train_worker(cfg: TrainConfig, sources: Sequence[Any] = ()) -> TrainResult:
    """One rank's run. The position is one number, the global step; everything else (epoch,
    LR, when to log, evaluate and save) is derived from it."""
    import megengine as mge

    from engine import checkpoint as ckpt
    from engine import steps
    from engine.metrics import TrainLog, plot_curves, read_jsonl

    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0  # only global rank 0 writes files: N ranks writing one would corrupt it
    # The same seed on every rank (init_process_group reseeds with time+rank), so every rank
    # builds the same initial weights even before the broadcast.
    mge.random.seed(cfg.seed)
    from engine.finetune import start_from

    train_loader, val_loader = _loaders(cfg, sources or _data_dirs(cfg), rank, world)
    steps_per_epoch, classes = len(train_loader), list(train_loader.classes)
    model, gm, opt, scaler = _model_and_optimizer(cfg, len(classes), world)
    start_from(model, cfg, classes)  # --pretrained / --weights (fine-tuning), else nothing
    ema = _make_ema(cfg, model)
    run_config = ckpt.run_config(cfg, classes, world)
    start, best_top1 = _resume(cfg, model, opt, scaler, ema, classes, world, steps_per_epoch) \
        if cfg.resume else (0, None)
    if main:
        _prepare_save_dir(cfg, run_config, train_loader)
    total = cfg.epochs * steps_per_epoch
    total = total if cfg.max_steps is None else min(total, cfg.max_steps)
    base_lr = scaled_lr(cfg.learning_rate, world)
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
    log = TrainLog(os.path.join(cfg.out_dir, "metrics.jsonl"), enabled=main, start=start,
                   total=total, world_size=world, reduce=dist.all_reduce_sum,
                   progress=cfg.progress,
                   description="%s, %d steps/epoch" % (cfg.arch, steps_per_epoch),
                   tensorboard=cfg.tensorboard)
    png = os.path.join(cfg.out_dir, "curves.png")

    def save(step: int) -> Optional[str]:
        if not main:
            return None
        return ckpt.write(ckpt.Checkpoint(
            step=step, steps_per_epoch=steps_per_epoch, model=model.state_dict(), optimizer=opt.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            ema=ema.state_dict() if ema is not None else None,
            config=run_config, metrics={"best_top1": best_top1}),
            os.path.join(cfg.out_dir, ckpt.FILE_NAME))

    def evaluate(step: int) -> Optional[Dict[str, float]]:
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
        return results[""]

    if start < total:  # the largest sizes now, not hours in at the end of a resizing ramp
        largest = cfg.max_train_size
        note = steps.fail_early(
            train_step, list(evals.values()), batch_size=cfg.batch_size,
            train_size=largest if cfg.train_size_at(start // steps_per_epoch) < largest else None,
            eval_size=cfg.eval_size if val_loader is not None else None)
        if main and note:
            print(note, file=sys.stderr)
    last_eval, checkpoint_path = None, None
    t_start = time.perf_counter()
    batches = train_loader.stream(start)
    model.train()
    for step in range(start, total):
        log.before_data()
        images, labels = next(batches)
        log.after_data(len(labels))
        lr = lr_at(step, base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                   warmup_epochs=cfg.warmup_epochs, schedule=cfg.lr_schedule)
        for group in opt.param_groups:
            group["lr"] = lr  # honoured by the traced graph too (it reads the group each call)
        mix = _mix_inputs(cfg, step, rank, images.shape) if mixing else None
        log.add(train_step(mge.tensor(images), mge.tensor(labels), mix),
                train_step.last_step_skipped)
        done = step + 1
        epoch_end, stop = done % steps_per_epoch == 0, done == total
        if done % cfg.print_freq == 0 or epoch_end or stop:
            log.interval(done, step // steps_per_epoch, lr)
        if epoch_end or stop:  # a run stopped mid-epoch (max_steps) still reports accuracy
            last_eval = evaluate(done) or last_eval
            if last_eval is not None and (best_top1 is None or last_eval["top1"] > best_top1):
                best_top1 = last_eval["top1"]
        if epoch_end or stop or (cfg.save_every and done % cfg.save_every == 0):
            checkpoint_path = save(done) or checkpoint_path
        if main and (epoch_end or stop):
            plot_curves(read_jsonl(log.log.path), png,
                        title="%s on %s" % (cfg.arch, cfg.data or cfg.train_data))
    log.close()
    train_loader.close()
    if val_loader is not None:
        val_loader.close()
    done = max(start, total)
    return TrainResult(
        save_dir=cfg.out_dir, checkpoint=checkpoint_path, epoch=done // steps_per_epoch, steps=done,
        loss=log.last_loss, top1=last_eval["top1"] if last_eval else None,
        top5=last_eval["top5"] if last_eval else None, best_top1=best_top1,
        img_s=log.mean_img_s(), seconds=time.perf_counter() - t_start, world_size=world,
        num_classes=len(classes), lr=base_lr)


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


def _make_ema(cfg: TrainConfig, model):
    """The weights' moving average (--ema-decay), or None."""
    if cfg.ema_decay is None:
        return None
    from engine.ema import ModelEMA

    return ModelEMA(model, cfg.ema_decay, warmup=True, trace=cfg.trace)


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


def _resume(cfg: TrainConfig, model, opt, scaler, ema, classes: List[str], world: int,
            steps_per_epoch: int) -> Tuple[int, Optional[float]]:
    """Load weights, optimizer, scaler and EMA state; returns (global step, best top-1)."""
    from engine import checkpoint as ckpt

    assert cfg.resume is not None  # called only for a run with --resume
    saved = ckpt.read(ckpt.resolve_resume(cfg.resume), trusted=cfg.trust_pickle or None)
    step = saved.resume_step(cfg, classes, world, steps_per_epoch)
    saved.restore(model, opt, scaler, ema)
    return step, saved.metrics.get("best_top1")


def _prepare_save_dir(cfg: TrainConfig, run_config: Dict[str, Any], loader) -> None:
    """Rank 0: clear dead temp files, say what is about to happen, write config.json."""
    import json

    from engine import checkpoint as ckpt
    from engine.atomic import atomic_write

    ckpt.clean_temp_files(cfg.out_dir)
    if not cfg.resume and ckpt.file_in(cfg.out_dir):
        print("note: %s already holds a checkpoint; this fresh run will replace it (pass "
              "--resume %s to continue that run instead)" % (cfg.save_dir, cfg.save_dir),
              file=sys.stderr)
    print("data: %d workers per loader (%d ranks per node), %.1f MB shared ring per loader"
          % (loader.workers, loader.local_world_size, loader.shared_memory_bytes / 1e6),
          file=sys.stderr)
    path = os.path.join(cfg.out_dir, "config.json")
    text = json.dumps(run_config, indent=1, sort_keys=True) + "\n"
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as exc:
        raise UserError(disk_error_message(exc, path)) from None
