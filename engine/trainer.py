"""ImageNet training: `train(TrainConfig(...)) -> TrainResult`.

This module is the parent's side: it checks what can be checked before any process is launched
(the data paths, the arch, the node layout, what starting into the save dir means) and launches
one rank per GPU. What each rank runs, the training loop, is engine.loop.run_rank.

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
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

from engine import dist, loop
from engine.config import TrainConfig
from engine.errors import UserError
from engine.loop import DivergedError, TrainResult, loader_kwargs, scaled_lr

if TYPE_CHECKING:
    from engine.data.folder import FolderIndex

__all__ = ["train", "TrainResult", "DivergedError", "resolve_data", "check_arch", "split_source",
           "source_facts", "loader_kwargs", "scaled_lr"]

# --------------------------------------------------------------------------------------------
# Pure pieces (tested directly)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


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
                loop.run_rank, cfg, sources, start,
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


def _data_dirs(cfg: TrainConfig) -> Tuple[str, Optional[str]]:
    return resolve_data(cfg.data, cfg.train_data, cfg.val_data, cfg.evaluate)
