"""The training configuration: one dataclass is the only place a default or a help text lives.

tools/train.py's flags are derived from the fields (engine.cli), recipe files (`--config NAME`,
engine/recipes/NAME.json, or a path) supply values whose keys are the field names, and flags given
on the command line win over both: dataclass default < recipe < flag. `TrainConfig.finalized()`
validates everything that can be checked without touching data or devices.

A run records its config in the save dir's config.json (and in its checkpoint): the options,
then what the run adds (:data:`RUN_RECORD_KEYS`: the class list, the world size, the command
line, the versions, the start time, from :func:`run_facts`). That file is a recipe too:
`--config run/config.json` replays the run's options, leaving out the record and the options that
belong to that launch (:data:`LAUNCH_KEYS`: its save dir, resume and node layout).
:func:`eval_transform` reads from such a record how the run evaluated.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

from engine import cli, dist
from engine.cli import option as _opt
from engine.errors import UserError

__all__ = ["TrainConfig", "NodeLayout", "SCHEDULES", "OPTIMIZERS", "RUN_RECORD_KEYS", "LAUNCH_KEYS",
           "build_parser", "config_from_argv", "load_recipe", "run_facts", "eval_transform"]

SCHEDULES = ("step", "cosine", "linear", "poly")
OPTIMIZERS = ("sgd", "lars")

#: What a run's config (config.json, a checkpoint's "config") holds besides the options: facts of
#: the run, not settings. classes, num_classes, world_size and train_images come from
#: checkpoint.run_config, the rest from run_facts().
RUN_RECORD_KEYS = ("classes", "num_classes", "world_size", "train_images", "command", "versions",
                   "started")
#: Options of a run's config that belong to its launch rather than to its recipe: a replay of the
#: config takes its own (a new save dir, a fresh start, this machine's node layout).
LAUNCH_KEYS = ("save_dir", "resume", "allow_changes", "replace", "ngpus", "num_nodes",
               "node_rank", "master_ip", "master_port")


class NodeLayout(NamedTuple):
    """TrainConfig.node_layout(): the node fields after with_cluster(), none of them None."""

    num_nodes: int
    node_rank: int
    master_ip: str
    master_port: int  # 0 = any free port (a single node only)


@dataclass
class TrainConfig:
    data: Optional[str] = _opt(None, "ROOT with train/ and val/: packed shards (meta.json) or raw "
                                     "<wnid>/*.JPEG folders (or --train-data / --val-data)",
                               "-d", "--data", metavar="DIR")
    train_data: Optional[str] = _opt(
        None, "the train split folder (packed or raw), in place of --data's train/: e.g. staged "
              "on local disk while val stays on shared storage", metavar="DIR")
    val_data: Optional[str] = _opt(None, "the val split folder, in place of --data's val/ (not "
                                         "needed with --no-eval)", metavar="DIR")
    arch: str = cli.arch_option()
    pretrained: bool = _opt(False, "fine-tune: start from MegEngine's published weights for "
                                   "--arch (a new classifier head when the data's classes "
                                   "differ)")
    weights: Optional[str] = _opt(
        None, "fine-tune: start from these weights, an engine checkpoint or an official MegEngine "
              ".pkl (path or URL; a new classifier head when the data's classes differ). Not "
              "with --resume, which continues a run", metavar="PATH")
    batch_size: int = cli.batch_size_option(32)
    ngpus: Optional[int] = _opt(
        None, "GPUs (processes) per node; default: SLURM_GPUS_ON_NODE under Slurm, else all "
              "visible; 1 process on CPU", "-n", "--ngpus")
    save_dir: Optional[str] = _opt(None, "output folder (default: output/<arch>)",
                                   "-s", "--save-dir", "--save")
    learning_rate: float = _opt(0.0125, "learning rate per GPU; the run uses it x world size",
                                "--lr", "--learning-rate")
    recipe_world_size: Optional[int] = _opt(
        None, "the GPU count that --batch-size and --lr were chosen for (a recipe records it; "
              "default: any). On another count the run says what the global batch and LR "
              "become", metavar="N")
    keep_global_batch: bool = _opt(
        False, "on a GPU count other than --recipe-world-size, keep the recipe's global batch "
               "and LR (the per-GPU batch becomes global / GPUs) instead of its per-GPU values")
    epochs: int = _opt(100, "training epochs")
    workers: Optional[int] = _opt(
        None, "loader processes per GPU (default: usable cores / GPUs per node - 1; 0 = decode "
              "in the training process)", "-j", "--workers")
    image_size: int = _opt(224, "train crop size (and val size unless --val-image-size)")
    weight_decay: float = _opt(1e-4, "weight decay", "--wd", "--weight-decay")
    momentum: float = _opt(0.9, "SGD momentum")
    warmup_epochs: float = _opt(0.0, "linear per-step LR warmup length, in epochs")
    lr_schedule: str = _opt("step", "step: x0.1 at epochs 30/60/80 (scaled to --epochs outside "
                                    "90-100); cosine; linear (to zero); poly (power 2, to zero)",
                            choices=SCHEDULES)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy targets")
    optimizer: str = _opt("sgd", "sgd, or lars (layer-wise trust ratio; norms and biases "
                                 "excluded, as in MLPerf)", choices=OPTIMIZERS)
    no_wd_norm_bias: bool = _opt(False, "no weight decay on BatchNorm parameters and biases")
    ema_decay: Optional[float] = _opt(
        None, "keep an exponential moving average of the weights with this decay per step "
              "(warmed up), evaluated beside the live model and saved in the checkpoint",
        metavar="DECAY")
    mixup_alpha: float = _opt(0.0, "Mixup's Beta(alpha, alpha); 0 = off")
    cutmix_alpha: float = _opt(0.0, "CutMix's Beta(alpha, alpha); 0 = off (with both on, "
                                    "each batch picks one, half the time each)")
    min_res: Optional[int] = _opt(None, "progressive resizing: train size up to --start-ramp "
                                        "(all four of --min-res/--max-res/--start-ramp/"
                                        "--end-ramp, or none)")
    max_res: Optional[int] = _opt(None, "progressive resizing: train size from --end-ramp on")
    start_ramp: Optional[int] = _opt(None, "progressive resizing: last epoch at --min-res")
    end_ramp: Optional[int] = _opt(None, "progressive resizing: first epoch at --max-res "
                                         "(sizes between are interpolated, multiples of 32)")
    val_image_size: Optional[int] = _opt(None, "val crop size (default: --image-size, or "
                                               "--max-res with progressive resizing)")
    val_resize_ratio: float = _opt(0.875, "val: resize the shorter side to size / ratio, then "
                                          "center-crop (0.875: 256 -> 224)")
    amp: bool = _opt(False, "mixed precision (float16 autocast + GradScaler); needs a CUDA GPU")
    trace: bool = _opt(True, "compile the train/eval steps with jit.trace(symbolic=True); "
                             "ignored with --dtr")
    dtr: Optional[str] = _opt(
        None, "enable DTR (recompute to save memory); THRESHOLD like 5GB, default 80%% of "
              "device memory. Runs the steps eagerly (no trace): MegEngine only supports DTR in "
              "eager mode", nargs="?", const="auto", metavar="THRESHOLD")
    resume: Optional[str] = _opt(
        None, "auto (also what happens without --resume): continue the run in the save dir when "
              "it holds one and this command's run-defining settings agree, else start it; or a "
              "checkpoint file (or save dir) to continue from, which must exist",
        metavar="auto|PATH")
    allow_changes: Optional[str] = _opt(
        None, "run-defining settings that may differ from the run's when it continues, comma-"
              "separated (e.g. learning_rate after a divergence), or all", metavar="FIELDS")
    replace: bool = _opt(False, "start a new run in a save dir that holds one; its files move to "
                                "<save dir>/replaced-<time>/ (nothing is deleted)")
    trust_pickle: bool = cli.trust_pickle_option("--resume and --weights",
                                                 "checkpoints and weight files")
    seed: int = _opt(0, "seed of the sample order, augmentation and initial weights")
    # None = resolved from the environment (torchrun-style, Slurm) by dist.resolve_cluster
    num_nodes: Optional[int] = _opt(None, "machines in a multi-node run (default: from NNODES / "
                                          "WORLD_SIZE, SLURM_NNODES, else 1)")
    node_rank: Optional[int] = _opt(None, "this machine's index (default: NODE_RANK / RANK, "
                                          "SLURM_NODEID, else 0)")
    master_ip: Optional[str] = _opt(
        None, "address of node 0 as every node sees it (default: MASTER_ADDR, the first host of "
              "SLURM_JOB_NODELIST, else localhost for one node)")
    master_port: Optional[int] = _opt(
        None, "rendezvous port on node 0 (default: MASTER_PORT; under Slurm 20000 + "
              "SLURM_JOB_ID %% 10000, below Linux's ephemeral ports; else any free port on one "
              "node)")
    rendezvous_timeout: float = _opt(
        600.0, "multi-node: how long nodes wait for each other at startup before stopping with "
               "an error that names the missing node", metavar="SECONDS")
    heartbeat_timeout: float = _opt(
        15.0, "multi-node: a node silent this long (no heartbeat through node 0's rendezvous "
              "server: dead, stopped or cut off) stops the run on every node with an error that "
              "names it", metavar="SECONDS")
    print_freq: int = _opt(20, "steps per metrics record and progress update",
                           "-p", "--print-freq")
    save_every: int = _opt(0, "also checkpoint every STEPS steps, for mid-epoch resume (0 = "
                              "epoch ends only)", metavar="STEPS")
    save_every_minutes: float = _opt(10.0, "also checkpoint when this many minutes have passed "
                                           "since the last checkpoint (0 = off)",
                                     metavar="MINUTES")
    keep_checkpoints: int = _opt(3, "the rolling window: keep the last K checkpoints as "
                                    "checkpoint-<step>.pkl beside checkpoint.pkl (the newest) "
                                    "and best.pkl (0 = none)", metavar="K")
    max_steps: Optional[int] = _opt(None, "stop after this many global steps")
    evaluate: bool = _opt(True, "validate after every epoch (--no-eval skips it)", "--eval")
    progress: bool = _opt(True, "progress bar on rank 0 (--no-progress for log files)")
    tensorboard: bool = _opt(False, "also write the metrics as TensorBoard events to the save "
                                    "dir (needs tensorboardX: pip install -e .[tensorboard])")
    # Where the values came from, recorded in config.json; not a setting, so two configs of the
    # same values are equal whatever recipe (or none) they came from. From Python, apply a
    # recipe with config_from_argv(["--config", ...]) or load_recipe.
    recipe: Optional[str] = dataclasses.field(default=None, compare=False, metadata=dict(
        help="a recipe: the name of a shipped one (engine/recipes/NAME.json), a path to a .json "
             "file, or a run's config.json (replays that run); its keys are these options' "
             "names (e.g. batch_size) and flags given here override them",
        flags=("--config",), kw=dict(metavar="RECIPE")))

    # The sections of tools/train.py --help, in order (engine.cli.build_parser).
    HELP_GROUPS = (
        ("data", ("data", "train_data", "val_data", "workers", "image_size", "val_image_size",
                  "val_resize_ratio", "evaluate", "seed")),
        ("model", ("arch", "pretrained", "weights")),
        ("optimisation", ("batch_size", "learning_rate", "recipe_world_size",
                          "keep_global_batch", "optimizer", "momentum", "weight_decay")),
        ("schedule", ("epochs", "warmup_epochs", "lr_schedule", "max_steps")),
        ("modern recipe", ("recipe", "label_smoothing", "no_wd_norm_bias", "ema_decay",
                           "mixup_alpha", "cutmix_alpha", "min_res", "max_res", "start_ramp",
                           "end_ramp")),
        ("precision and compile", ("amp", "trace", "dtr")),
        ("checkpoints", ("save_dir", "resume", "allow_changes", "replace", "trust_pickle",
                         "save_every", "save_every_minutes", "keep_checkpoints")),
        ("distributed", ("ngpus", "num_nodes", "node_rank", "master_ip", "master_port",
                         "rendezvous_timeout", "heartbeat_timeout")),
        ("logging", ("print_freq", "progress", "tensorboard")),
    )

    def finalized(self) -> "TrainConfig":
        """A validated copy with defaults resolved; raises UserError for bad values."""
        c = dataclasses.replace(self)
        cli.check_numbers(TrainConfig, vars(c))  # a NaN would pass every check below
        if not (c.data or c.train_data):
            raise UserError("--data is required: ROOT holding train/ and val/ (or --train-data "
                            "DIR, with --val-data DIR unless --no-eval)")
        if c.evaluate and not (c.data or c.val_data):
            raise UserError("--train-data %s without --data: evaluating needs --val-data DIR "
                            "(or pass --no-eval)" % c.train_data)
        if c.pretrained and c.weights:
            raise UserError("--pretrained and --weights both name the weights to start from; "
                            "pass one")
        if (c.pretrained or c.weights) and c.resume not in (None, "auto"):
            raise UserError("%s starts a new run from other weights, but --resume %s continues "
                            "an existing run from its own checkpoint; pass one (to continue a "
                            "fine-tuning run, --resume alone: its checkpoint holds the "
                            "fine-tuned weights)"
                            % ("--pretrained" if c.pretrained else "--weights", c.resume))
        if c.weights and "://" not in c.weights and not os.path.isfile(c.weights):
            raise UserError("--weights: no such file: %s" % c.weights)
        c.save_dir = c.out_dir
        checks = [
            (c.batch_size >= 1, "--batch-size must be >= 1"),
            (c.epochs >= 1, "--epochs must be >= 1"),
            (c.learning_rate > 0, "--learning-rate must be > 0"),
            (c.image_size >= 32, "--image-size must be >= 32"),
            (c.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0 <= c.momentum < 1, "--momentum must be in [0, 1)"),
            (0 <= c.warmup_epochs <= c.epochs, "--warmup-epochs must be in [0, --epochs]"),
            (c.lr_schedule in SCHEDULES, "--lr-schedule must be one of %s" % "|".join(SCHEDULES)),
            (0 <= c.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (c.workers is None or c.workers >= 0, "--workers must be >= 0"),
            (c.num_nodes is None or c.num_nodes >= 1, "--num-nodes must be >= 1"),
            (c.node_rank is None or c.node_rank >= 0, "--node-rank must be >= 0"),
            (c.print_freq >= 1, "--print-freq must be >= 1"),
            (c.rendezvous_timeout > 0, "--rendezvous-timeout must be > 0"),
            (c.heartbeat_timeout > 0, "--heartbeat-timeout must be > 0"),
            (c.save_every >= 0, "--save-every must be >= 0"),
            (c.save_every_minutes >= 0, "--save-every-minutes must be >= 0"),
            (c.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
            (c.max_steps is None or c.max_steps >= 1, "--max-steps must be >= 1"),
            (c.ngpus is None or c.ngpus >= 0, "--ngpus must be >= 0"),
            (c.recipe_world_size is None or c.recipe_world_size >= 1,
             "--recipe-world-size must be >= 1"),
            (c.optimizer in OPTIMIZERS, "--optimizer must be one of %s" % "|".join(OPTIMIZERS)),
            (c.ema_decay is None or 0 < c.ema_decay < 1, "--ema-decay must be in (0, 1)"),
            (c.mixup_alpha >= 0 and c.cutmix_alpha >= 0, "--mixup-alpha and --cutmix-alpha "
                                                         "must be >= 0"),
            (c.val_image_size is None or c.val_image_size >= 32, "--val-image-size must be >= 32"),
            (0 < c.val_resize_ratio <= 1, "--val-resize-ratio must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        ramp = min_res, max_res, start_ramp, end_ramp = (c.min_res, c.max_res, c.start_ramp,
                                                         c.end_ramp)
        if any(v is not None for v in ramp):
            if min_res is None or max_res is None or start_ramp is None or end_ramp is None:
                raise UserError("progressive resizing needs all of --min-res, --max-res, "
                                "--start-ramp and --end-ramp (got %s)" % (ramp,))
            if not (32 <= min_res <= max_res and 0 <= start_ramp <= end_ramp):
                raise UserError("progressive resizing needs 32 <= --min-res <= --max-res and "
                                "0 <= --start-ramp <= --end-ramp (got %s)" % (ramp,))
        if c.dtr:
            c.trace = False  # DTR runs eagerly (see steps.TrainStep); train() says so
        return c

    def for_world_size(self, world_size: int) -> Tuple["TrainConfig", Optional[str]]:
        """(the config to run on `world_size` GPUs, a one-line note or None).

        batch_size and learning_rate are per GPU (the run's LR is learning_rate x world size).
        A recipe made for recipe_world_size GPUs therefore changes its global batch and LR on
        another count; the note says what they become. With keep_global_batch the copy's
        per-GPU values are rescaled so that the recipe's global batch and LR stay; a global
        batch that does not divide over the GPUs is refused.
        """
        made_for = self.recipe_world_size
        if made_for is None or made_for == world_size:
            return self, None
        bs, lr = self.batch_size, self.learning_rate
        recipe = ("--batch-size %d and --lr %g were set for %d GPU%s (global batch %d at LR %g)"
                  % (bs, lr, made_for, "" if made_for == 1 else "s", bs * made_for, lr * made_for))
        gpus = "%d GPU%s" % (world_size, "" if world_size == 1 else "s")
        if not self.keep_global_batch:
            return self, ("note: %s; on %s the global batch becomes %d at LR %g (per-GPU values "
                          "kept, LR x %d GPUs); --keep-global-batch keeps %d at LR %g instead"
                          % (recipe, gpus, bs * world_size, lr * world_size, world_size,
                             bs * made_for, lr * made_for))
        global_batch = bs * made_for
        if global_batch % world_size:
            raise UserError("--keep-global-batch: the global batch %d (%d per GPU for %d GPUs) "
                            "does not divide over %s; choose --batch-size for this count "
                            "without --keep-global-batch" % (global_batch, bs, made_for, gpus))
        kept = dataclasses.replace(self, batch_size=global_batch // world_size,
                                   learning_rate=lr * made_for / world_size,
                                   recipe_world_size=world_size)
        return kept, ("note: %s; --keep-global-batch: on %s that is %d per GPU, the same global "
                      "batch %d at LR %g" % (recipe, gpus, kept.batch_size, global_batch,
                                            lr * made_for))

    def with_cluster(self, env: Mapping[str, str]) -> "TrainConfig":
        """A copy whose node layout (and GPU count) is filled in from flags, then `env`."""
        cl = dist.resolve_cluster(
            env, num_nodes=self.num_nodes, node_rank=self.node_rank, master_ip=self.master_ip,
            master_port=self.master_port, ngpus=self.ngpus)
        return dataclasses.replace(self, num_nodes=cl.num_nodes, node_rank=cl.node_rank,
                                   master_ip=cl.master_addr, master_port=cl.master_port,
                                   ngpus=cl.gpus_per_node)

    @property
    def out_dir(self) -> str:
        """The save dir: --save-dir, by default output/<arch>."""
        return self.save_dir if self.save_dir is not None else os.path.join("output", self.arch)

    # A typed view of fields that are Optional on the command line but always set once
    # with_cluster() has resolved them.

    def node_layout(self) -> NodeLayout:
        """This node's place in the run, as with_cluster() filled it in."""
        num_nodes, node_rank, master_ip, master_port = (self.num_nodes, self.node_rank,
                                                        self.master_ip, self.master_port)
        assert (num_nodes is not None and node_rank is not None and master_ip is not None
                and master_port is not None), "with_cluster() resolves the node layout"
        return NodeLayout(num_nodes, node_rank, master_ip, master_port)

    @property
    def progressive(self) -> bool:
        return self.min_res is not None

    def _ramp(self) -> Tuple[int, int, int, int]:
        """(min_res, max_res, start_ramp, end_ramp) of a progressive config; finalized() has
        made sure that all four are set once one is."""
        min_res, max_res, start_ramp, end_ramp = (self.min_res, self.max_res, self.start_ramp,
                                                  self.end_ramp)
        assert (min_res is not None and max_res is not None and start_ramp is not None
                and end_ramp is not None), "progressive resizing needs all four of its options"
        return min_res, max_res, start_ramp, end_ramp

    def train_size_at(self, epoch: int) -> int:
        """The training crop size of `epoch` (FFCV's schedule, or --image-size)."""
        from engine.schedules import resolution_at

        if not self.progressive:
            return self.image_size
        return resolution_at(epoch, *self._ramp())

    @property
    def max_train_size(self) -> int:
        if not self.progressive:
            return self.image_size
        min_res, max_res, _start, _end = self._ramp()
        return max(max_res, min_res)

    @property
    def eval_size(self) -> int:
        return self.val_image_size or self.max_train_size


# ------------------------------------------------------------------------------ recipe files

def load_recipe(path_or_name: str) -> Dict[str, Any]:
    """A recipe's values by option name (a shipped recipe by name, or a .json path), checked
    against TrainConfig's fields and choices. Keys starting with "_" are its documentation.

    A run's config.json is a recipe of that run: its record (RUN_RECORD_KEYS) and the options
    of its launch (LAUNCH_KEYS) are left out, with a note saying so."""
    from engine import recipes

    schema: Dict[str, Any] = dict(typing.get_type_hints(TrainConfig))
    schema.update((k, object) for k in RUN_RECORD_KEYS)  # any value: they are dropped below
    values = recipes.load_recipe(path_or_name, schema, cli.choices(TrainConfig))
    if not any(k in values for k in RUN_RECORD_KEYS):
        return values
    own = [k for k in LAUNCH_KEYS if values.get(k) is not None]
    print("note: --config %s is a run's record: replaying its options%s" % (
        path_or_name, "; %s are this run's own (flags or defaults), not the recorded run's"
        % ", ".join("--" + k.replace("_", "-") for k in own) if own else ""), file=sys.stderr)
    return {k: v for k, v in values.items() if k not in RUN_RECORD_KEYS and k not in LAUNCH_KEYS}


def run_facts() -> Dict[str, Any]:
    """What a run records about its launch besides its options (RUN_RECORD_KEYS): the command
    line that started it, the versions it ran on (engine, MegEngine, Python, CUDA when a GPU is
    used) and the start time. Called in a rank process: it asks MegEngine about CUDA."""
    import datetime
    import shlex

    return {"command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
            "versions": _versions(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _versions() -> Dict[str, Optional[str]]:
    import importlib.metadata
    import platform

    import megengine

    try:
        engine_version: Optional[str] = importlib.metadata.version("engine")
    except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        engine_version = None
    cuda = None
    if megengine.is_cuda_available():
        v = int(megengine.device.get_cuda_version())  # CUDA_VERSION: major * 1000 + minor * 10
        cuda = "%d.%d" % (v // 1000, v % 1000 // 10)
    return {"engine": engine_version, "megengine": megengine.__version__,
            "python": platform.python_version(), "cuda": cuda}


def eval_transform(run: Mapping[str, Any]) -> Tuple[int, float]:
    """(crop size, resize ratio) of a run's evaluation, from its recorded config (a checkpoint's
    or config.json; {} for weights without one): the val_image_size, else the largest training
    size (--max-res with progressive resizing), else the training size; 224 and 0.875 for
    weights that record none. A run recorded before an option existed had its default."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in run.items() if k in known})
    return int(cfg.eval_size), float(cfg.val_resize_ratio)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """tools/train.py's parser: TrainConfig's options plus --config RECIPE."""
    return cli.build_parser(TrainConfig, description, recipes=True)


def config_from_argv(argv: Optional[Sequence[str]] = None,
                     description: str = "") -> TrainConfig:
    """Parse the command line: defaults < --config recipe < flags. Bad values exit 2 through
    argparse; a bad recipe raises ConfigError (a UserError)."""
    return cli.parse(TrainConfig, argv, description, recipes=load_recipe)
