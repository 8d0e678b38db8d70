"""ImageNet training: `train(TrainConfig(...)) -> summary dict`.

Read `_train_worker` top to bottom: it is the whole algorithm (data, model, optimizer, resume,
the epoch loop with per-step LR, logging, eval, checkpoints). The pure pieces it uses (LR
schedule, LR scaling, GPU count, data paths, loader arguments, which rank writes) are small
functions above it so that tests can check them without a GPU.

Recipe defaults follow the MegEngine 0.x train.py that produced the published weights: 32 images
and lr 0.0125 per GPU (lr x world size), SGD momentum 0.9, wd 1e-4 on all parameters, x0.1 at
epochs 30/60/80, no warmup, no label smoothing.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from engine import distributed
from engine.errors import UserError, disk_error_message

if TYPE_CHECKING:
    from engine.data.folder import FolderIndex

from engine.config import SCHEDULES, TrainConfig  # noqa: E402,F401  (re-exported)


# --------------------------------------------------------------------------------------------
# Pure pieces (tested directly)
# --------------------------------------------------------------------------------------------


def scaled_lr(per_gpu_lr: float, world_size: int) -> float:
    """Linear scaling rule: the global batch grows with the world size, so does the LR."""
    return per_gpu_lr * world_size


def step_milestones(epochs: int) -> List[float]:
    """Epochs at which the step schedule multiplies the LR by 0.1.

    The reference recipe decays at 30/60/80 for its 90-100 epoch runs; other lengths scale
    those proportionally (from 90 below, from 100 above, so the function is continuous), so a
    5-epoch run still decays at 1.67/3.33/4.44.
    """
    base = [30.0, 60.0, 80.0]
    if 90 <= epochs <= 100:
        return base
    ref = 90.0 if epochs < 90 else 100.0
    return [m * epochs / ref for m in base]


def lr_at(
    step: int,
    *,
    base_lr: float,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 0.0,
    schedule: str = "step",
) -> float:
    """Learning rate for global step `step` (0-based), updated every step.

    Warmup is linear from base_lr/warmup_steps (not 0, which would waste the first step) up to
    the schedule's value. Step: x0.1 at each milestone (in steps). Cosine: from base_lr at the
    end of warmup to 0 at the last step.
    """
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if schedule == "step":
        bounds = [int(round(m * steps_per_epoch)) for m in step_milestones(epochs)]
        lr = base_lr * 0.1 ** bisect_right(bounds, step)
    elif schedule == "cosine":
        t = min(max(step - warmup, 0) / max(1, total - warmup), 1.0)
        lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError("unknown schedule %r; choose from %s" % (schedule, SCHEDULES))
    if step < warmup:
        lr *= (step + 1) / warmup
    return lr


def resolve_ngpus(requested: Optional[int], available: int, num_nodes: int = 1) -> int:
    """Processes per node. CPU-only machines run one process (MegEngine's distributed
    backend is CUDA-only), so asking for more there is an error, not a silent downgrade."""
    if available == 0:
        if requested not in (None, 0, 1) or num_nodes > 1:
            raise UserError(
                "no CUDA GPU is visible, so training runs as one CPU process; multi-GPU and "
                "multi-node need CUDA (got --ngpus %s, --num-nodes %d)" % (requested, num_nodes)
            )
        return 1
    if requested is None or requested == 0:
        return available
    if requested > available:
        raise UserError("--ngpus %d but only %d GPUs are visible" % (requested, available))
    return requested


def resolve_data(data: str) -> Tuple[str, str]:
    """--data ROOT -> (ROOT/train, ROOT/val); each is a packed split (meta.json) or raw folders."""
    if not os.path.isdir(data):
        raise UserError("--data: no such folder: %s" % data)
    train_dir, val_dir = os.path.join(data, "train"), os.path.join(data, "val")
    missing = [p for p in (train_dir, val_dir) if not os.path.isdir(p)]
    if missing:
        raise UserError(
            "--data %s must hold train/ and val/ (raw <wnid>/*.JPEG folders or packed shards "
            "with meta.json); missing: %s" % (data, ", ".join(missing))
        )
    return train_dir, val_dir


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

    if os.path.exists(os.path.join(split_dir, shards.META_FILE)) or any(
            f.startswith("shard-") for f in os.listdir(split_dir)):
        shards.read_meta(split_dir)  # raises ShardError, a UserError, with the fix
        return split_dir
    return index_folder(split_dir)  # raises LayoutError, a UserError


def loader_kwargs(config: TrainConfig, train: bool, rank: int, world_size: int) -> Dict[str, Any]:
    """Arguments for engine.data.Loader: each rank reads its own share of every epoch.

    The one place that says how the trainer drives the loader. The loaders of a node's ranks
    share its cores, so each sizes its workers for world_size / num_nodes loaders per machine;
    the val loader starts its workers for each eval and releases them after."""
    return dict(
        batch_size=config.batch_size,
        train=train,
        image_size=config.image_size,
        workers=config.workers,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        local_world_size=max(1, world_size // (config.num_nodes or 1)),
        persistent_workers=train,
    )


def writes_files(rank: int) -> bool:
    """Only global rank 0 logs, plots and saves: N ranks writing one file would corrupt it."""
    return rank == 0


def checkpoint_config(config: TrainConfig, num_classes: int, classes: List[str]) -> Dict[str, Any]:
    """What a checkpoint records about its run (inference/test need arch, classes, size)."""
    out = dataclasses.asdict(config)
    out.update(num_classes=int(num_classes), classes=list(classes))
    return out


def check_resume_compatible(saved: Dict[str, Any], config: TrainConfig, classes: List[str],
                            world_size: int, mid_epoch: bool) -> None:
    """A resume must continue the same run: same model and classes; mid-epoch, same batches."""
    if saved.get("arch") != config.arch:
        raise UserError("--resume: the checkpoint is a %s run but --arch is %s"
                        % (saved.get("arch"), config.arch))
    if list(saved.get("classes", [])) != list(classes):
        raise UserError(
            "--resume: the checkpoint was trained on %d classes, --data has %d (or in another "
            "order); resume with the same data" % (len(saved.get("classes", [])), len(classes))
        )
    if mid_epoch:
        saved_batch = saved.get("batch_size", 0) * saved.get("world_size", 1)
        if saved_batch != config.batch_size * world_size:
            raise UserError(
                "--resume: the checkpoint stopped mid-epoch with a global batch of %d, this run "
                "has %d; the remaining batches would differ. Use the same --batch-size/--ngpus."
                % (saved_batch, config.batch_size * world_size)
            )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> Dict[str, Any]:
    """Train (one process per GPU, or one CPU process) and return rank 0's summary dict.

    Everything that can be checked without building a model is checked here, in the parent,
    before any process is launched or tensor created (the launcher's children must not inherit
    a CUDA context).
    """
    from engine import precision
    from engine.checkpoint import resolve_resume

    if config.dtr and config.trace:
        print("note: --dtr runs the steps eagerly (MegEngine supports DTR in eager mode only), "
              "so --trace is off for this run", file=sys.stderr)
    cfg = config.finalized().with_cluster(os.environ)
    # Each node runs these checks itself (paths may exist on one node and not another); in a
    # multi-node run a failure is reported at the rendezvous instead of raised here, so that
    # every node stops with the same message rather than waiting for this one.
    problem, ngpus, resume, sources = None, None, None, []
    try:
        if cfg.num_nodes > 1:
            distributed.check_one_process_per_node(os.environ)
        precision.require_amp_device(cfg.amp)
        check_arch(cfg.arch)
        train_dir, val_dir = resolve_data(cfg.data)
        sources = [split_source(d) for d in ((train_dir, val_dir) if cfg.evaluate
                                             else (train_dir,))]
        resume = resolve_resume(cfg.resume) if cfg.resume else None
        ngpus = resolve_ngpus(cfg.ngpus, distributed.gpu_count(), cfg.num_nodes)
    except UserError as exc:
        if cfg.num_nodes == 1:
            raise
        problem = " ".join(str(exc).split())
    report = distributed.node_report(num_nodes=cfg.num_nodes, ngpus=ngpus, error=problem,
                                     resume=resume)
    return distributed.launch(
        _train_worker, cfg, sources,
        ngpus=ngpus or 1, num_nodes=cfg.num_nodes, node_rank=cfg.node_rank,
        master_ip=cfg.master_ip, master_port=cfg.master_port,
        report=report, rendezvous_timeout=cfg.rendezvous_timeout,
    )


def _train_worker(cfg: TrainConfig, sources: Sequence[Any] = ()) -> Dict[str, Any]:
    import megengine as mge
    import megengine.optimizer as optim
    from megengine.autodiff import GradManager
    from tqdm import tqdm

    from engine import checkpoint as ckpt
    from engine import precision
    from engine.data import Loader
    from engine.evaluate import run_eval
    from engine.metrics import LossMeter, MetricsLog, StepTimer, interval_summary, plot_curves, read_jsonl
    from engine.models import get_model, load_weights

    rank, world = distributed.get_rank(), distributed.get_world_size()
    main = writes_files(rank)
    # Same seed on every rank (init_process_group reseeds with time+rank), so every rank builds
    # the same initial weights even before the broadcast.
    mge.random.seed(cfg.seed)

    # ---- data: each rank its own share of every epoch ----
    if not sources:  # called directly rather than through train()
        sources = resolve_data(cfg.data)
    try:
        train_loader = Loader(sources[0], **loader_kwargs(cfg, True, rank, world))
        val_loader = Loader(sources[1], **loader_kwargs(cfg, False, rank, world)) \
            if cfg.evaluate else None
    except (ValueError, OSError) as exc:  # no meta.json, empty folders, batch > data, ...
        raise UserError("--data %s: %s" % (cfg.data, exc)) from None
    classes = list(train_loader.classes)
    num_classes = int(train_loader.num_classes)
    steps_per_epoch = len(train_loader)
    if main:
        print("data: %d workers per loader (%d ranks per node), %.0f MB shared ring per loader"
              % (train_loader.workers, train_loader.local_world_size,
                 train_loader.shared_memory_bytes / 1e6), file=sys.stderr)
    if steps_per_epoch == 0:
        raise UserError("the training set has fewer images than one global batch (%d)"
                        % (cfg.batch_size * world))

    # ---- model, gradients, optimizer ----
    model = get_model(cfg.arch, num_classes=num_classes)
    distributed.broadcast_module(model)
    gm = GradManager().attach(model.parameters(), callbacks=distributed.allreduce_callback())
    base_lr = scaled_lr(cfg.learning_rate, world)
    opt = optim.SGD(model.parameters(), lr=base_lr, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay)
    scaler = precision.make_grad_scaler() if cfg.amp else None
    run_config = checkpoint_config(cfg, num_classes, classes)
    run_config["world_size"] = world

    # ---- resume: weights, optimizer, scaler, and the exact loader position ----
    start_epoch, loader_state, best_top1 = 0, None, None
    if main:
        ckpt.clean_temp_files(cfg.save_dir)
        if not cfg.resume and ckpt.find_latest(cfg.save_dir):
            print("note: %s already holds a checkpoint; this fresh run will replace it (pass "
                  "--resume %s to continue that run instead)" % (cfg.save_dir, cfg.save_dir),
                  file=sys.stderr)
    if cfg.resume:
        path = ckpt.resolve_resume(cfg.resume)
        state = ckpt.load_checkpoint(path)
        if not ckpt.is_engine_checkpoint(state):
            raise UserError("--resume %s: not a checkpoint written by tools/train.py (an official "
                            "weight file has no optimizer or loader state to resume)" % path)
        loader_state = dict(state["loader"])
        check_resume_compatible(state["config"], cfg, classes, world,
                                mid_epoch=loader_state.get("position", 0) > 0)
        try:
            load_weights(model, state["state_dict"], strict=True, source=path)
        except ValueError as exc:
            raise UserError(" ".join(str(exc).split())) from None
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        best_top1 = state.get("metrics", {}).get("best_top1")
    # Derived, not stored: the LR schedule only depends on where we are in the run.
    step = start_epoch * steps_per_epoch + (loader_state or {}).get("position", 0)

    train_step = precision.make_train_step(
        model, gm, opt, trace=cfg.trace, amp=cfg.amp, scaler=scaler,
        label_smoothing=cfg.label_smoothing,
        dtr_bytes=precision.dtr_threshold(cfg.dtr) if cfg.dtr else None,
    )
    eval_step = precision.make_eval_step(model, num_classes=num_classes, trace=cfg.trace,
                                         amp=cfg.amp)

    # ---- outputs (rank 0 only) ----
    log = MetricsLog(os.path.join(cfg.save_dir, "metrics.jsonl"), enabled=main)
    log.drop_after(step)  # records past the checkpoint are about to be redone
    png = os.path.join(cfg.save_dir, "curves.png")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    bar = tqdm(total=total_steps, initial=min(step, total_steps), unit="step", dynamic_ncols=True,
               disable=not (main and cfg.progress))

    def save(epoch: int, loader_sd: Dict[str, int]) -> Optional[str]:
        if not main:
            return None
        path = os.path.join(cfg.save_dir, ckpt.LATEST)
        try:
            return _save(epoch, loader_sd, path)
        except OSError as exc:  # full disk, quota, read-only: the previous checkpoint is intact
            raise UserError(disk_error_message(exc, path) + " (the previous checkpoint, if "
                            "any, is unchanged)") from None

    def _save(epoch: int, loader_sd: Dict[str, int], path: str) -> str:
        return ckpt.save_checkpoint({
            "format": ckpt.FORMAT, "version": ckpt.VERSION,
            "epoch": epoch, "step": step,
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "loader": dict(loader_sd),
            "config": run_config,
            "metrics": {"best_top1": best_top1},
        }, path)

    def evaluate(epoch: int) -> Optional[Dict[str, float]]:
        if val_loader is None:
            return None
        distributed.broadcast_buffers(model)  # every rank scores rank 0's BN statistics
        model.eval()
        result = run_eval(eval_step, val_loader)
        model.train()
        log.write({"kind": "eval", "epoch": epoch, "step": step, **result})
        if main:
            bar.write("epoch %d  val top1 %.3f  top5 %.3f  loss %.4f  (%d images)"
                      % (epoch, result["top1"], result["top5"], result["loss"], result["images"]))
        return result

    # ---- the loop ----
    loss_meter, timer = LossMeter(), StepTimer()
    # (device loss, update skipped) not read yet: reading a loss forces a sync, so batch it
    pending: List[Any] = []
    last_loss, last_eval, throughput = None, None, []
    checkpoint_path = None
    stopped = cfg.max_steps is not None and step >= cfg.max_steps
    epoch, position = start_epoch, step - start_epoch * steps_per_epoch
    t_start = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, cfg.epochs if not stopped else start_epoch):
        if loader_state is not None:
            train_loader.load_state_dict(loader_state)  # continues at the saved position
            loader_state = None
        else:
            train_loader.set_epoch(epoch)
        bar.set_description("epoch %d/%d" % (epoch, cfg.epochs))
        timer.start_interval()
        batches = iter(train_loader)
        position = step - epoch * steps_per_epoch
        while True:
            timer.before_data()
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            timer.after_data(len(labels) * world)

            lr = lr_at(step, base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                       warmup_epochs=cfg.warmup_epochs, schedule=cfg.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr  # honoured by the traced graph too (it reads the group each call)
            loss = train_step(mge.tensor(images), mge.tensor(labels))
            pending.append((loss, train_step.last_step_skipped))
            step += 1
            position += 1
            bar.update(1)
            stopped = cfg.max_steps is not None and step >= cfg.max_steps

            if step % cfg.print_freq == 0 or position == steps_per_epoch or stopped:
                for loss, skipped in pending:  # the sync point: the interval's timing is exact
                    loss_meter.update(float(loss.item()), skipped)
                pending.clear()
                speed = timer.read()
                # Mean over all ranks' finite steps. A collective: every rank logs at the same
                # steps (they all run the same step count), so the calls pair up.
                interval = interval_summary(distributed.all_reduce_sum(loss_meter.local()),
                                            world)
                last_loss = interval["loss"]
                throughput.append(speed["img_s"])
                # img_s counts all ranks' images; data_wait is this rank's share of the interval
                # spent blocked on the loader.
                log.write({"kind": "train", "epoch": epoch, "step": step, "loss": last_loss,
                           "skipped": interval["skipped"], "lr": lr, "img_s": speed["img_s"],
                           "data_wait": speed["data_wait"]})
                bar.set_postfix(loss="-" if last_loss is None else "%.4f" % last_loss,
                                lr="%.5f" % lr,
                                img_s="%.1f" % speed["img_s"], wait="%.0f%%" % (100 * speed["data_wait"]))
                loss_meter.reset()
                timer.start_interval()

            if stopped or (cfg.save_every and step % cfg.save_every == 0):
                if position < steps_per_epoch:  # mid-epoch: the loader knows where it is
                    checkpoint_path = save(epoch, train_loader.state_dict()) or checkpoint_path
            if stopped:
                break

        if position == steps_per_epoch:  # a complete epoch: eval, then checkpoint "epoch+1"
            last_eval = evaluate(epoch) or last_eval
            if last_eval is not None and (best_top1 is None or last_eval["top1"] > best_top1):
                best_top1 = last_eval["top1"]
            checkpoint_path = save(epoch + 1, {"epoch": epoch + 1, "position": 0}) or checkpoint_path
            if main:
                plot_curves(read_jsonl(log.path), png, title="%s on %s" % (cfg.arch, cfg.data))
        if stopped:
            break

    finished_epoch = position == steps_per_epoch
    if stopped and not finished_epoch and val_loader is not None:
        last_eval = evaluate(epoch)  # a run stopped mid-epoch (max_steps) still reports accuracy
    if main and os.path.exists(log.path):
        plot_curves(read_jsonl(log.path), png, title="%s on %s" % (cfg.arch, cfg.data))
    bar.close()
    train_loader.close()
    if val_loader is not None:
        val_loader.close()
    return {
        "save_dir": cfg.save_dir,
        "checkpoint": checkpoint_path,
        "epoch": epoch + 1 if finished_epoch else epoch,  # the epoch a resume would continue in
        "steps": step,
        "loss": last_loss,
        "top1": last_eval["top1"] if last_eval else None,
        "top5": last_eval["top5"] if last_eval else None,
        "best_top1": best_top1,
        "img_s": float(np.mean(throughput)) if throughput else None,
        "seconds": time.perf_counter() - t_start,
        "world_size": world,
        "num_classes": num_classes,
        "lr": base_lr,
    }
