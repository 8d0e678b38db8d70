"""A save dir is a run: which settings define a run, and what starting into a save dir does.

The same command starts a run and continues it, so that one batch script serves every requeue:

- an empty (or new) save dir: a new run;
- a save dir holding a checkpoint (``checkpoint.pkl``, the newest state): the run continues from
  it when this command's run-defining settings agree with the run's, and is refused otherwise,
  with one line naming every setting that differs and both values; nothing on disk changes;
- a save dir holding another run's log but no checkpoint yet (its ``config.json``): a new run if
  the settings agree (its records are appended after the old ones), refused otherwise.

``--resume auto`` is the explicit spelling of this (what the README's batch script uses);
``--resume PATH`` continues from a given checkpoint file or save dir and fails when it holds none.
``--allow-changes FIELD,...`` lets named run-defining settings change on a resume (say, the
learning rate after a divergence) and ``--replace`` starts a new run in a save dir that holds
one, after moving its files to ``replaced-<time>/`` inside it: nothing is ever deleted.

Which settings define a run (:data:`RUN_DEFINING`, plus the derived :data:`DERIVED` ones) and
which may change on a resume (:data:`MAY_CHANGE`) is decided here, for every TrainConfig field
(a test checks that the lists cover them all). What defines a run is what makes it a different
experiment: the model, the data it is trained on (classes, number of images), the optimisation
recipe and its schedule, the augmentation, the sizes and the seed. The global batch and the LR
after scaling are compared rather than the per-GPU values, so a requeue onto fewer GPUs may
continue with a larger per-GPU batch and LR that give the same global ones. What may change is
where and how the run executes (paths, GPUs, nodes, workers, trace), what it reports and when it
saves, and how long it runs: more ``--epochs`` continue the run, with the schedule computed for
the new length from the resumed step on (a note says so).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from engine.errors import UserError, disk_error_message

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["RUN_DEFINING", "DERIVED", "MAY_CHANGE", "Change", "RunStart", "settings_of",
           "compare", "plan", "parse_allowed", "allowed_fields", "replace_run", "run_files",
           "RUN_FILES", "CONFIG_FILE", "startup_summary", "prepare_save_dir"]

CONFIG_FILE = "config.json"
# What a run writes to its save dir besides its checkpoints (engine.checkpoint.files_in).
RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "curves.png", "tb")

# Settings that must agree for a save dir's run to continue, with what each is.
RUN_DEFINING: Dict[str, str] = {
    "arch": "the model",
    "seed": "the seed of the order, augmentation and initial weights",
    "optimizer": "the optimizer",
    "momentum": "the momentum",
    "weight_decay": "the weight decay",
    "no_wd_norm_bias": "the weight decay of norms and biases",
    "lr_schedule": "the LR schedule",
    "warmup_epochs": "the warmup",
    "label_smoothing": "the label smoothing",
    "mixup_alpha": "Mixup",
    "cutmix_alpha": "CutMix",
    "ema_decay": "the EMA of the weights",
    "image_size": "the train crop size",
    "min_res": "progressive resizing",
    "max_res": "progressive resizing",
    "start_ramp": "progressive resizing",
    "end_ramp": "progressive resizing",
    "val_image_size": "the val crop size",
    "val_resize_ratio": "the val resize ratio",
    "amp": "mixed precision",
}

# Run-defining values derived from several settings: name -> (the field --allow-changes names to
# let it change, what it is).
DERIVED: Dict[str, Tuple[str, str]] = {
    "global_batch": ("batch_size", "the global batch (--batch-size x ranks)"),
    "global_lr": ("learning_rate", "the LR after scaling (--lr x ranks)"),
    "classes": ("data", "the classes of the training data"),
    "train_images": ("data", "the number of training images"),
}

# Settings that may change when a run continues.
MAY_CHANGE = frozenset({
    "epochs", "max_steps", "data", "workers", "ngpus", "num_nodes", "node_rank", "master_ip",
    "master_port", "rendezvous_timeout", "save_dir", "resume", "trust_pickle", "trace", "dtr",
    "print_freq", "save_every", "save_every_minutes", "keep_checkpoints", "evaluate", "progress",
    "tensorboard", "allow_changes", "replace", "heartbeat_timeout", "train_data", "val_data",
    # where a new run's weights come from: a continuing run has its own
    "pretrained", "weights",
    # compared through DERIVED: the per-GPU values may change with the GPU count, and so may
    # what a recipe's world size turns them into
    "batch_size", "learning_rate", "recipe", "recipe_world_size", "keep_global_batch",
})


@dataclass(frozen=True)
class Change:
    """One run-defining setting that differs: its name, the run's value and this command's."""

    name: str
    saved: Any
    now: Any

    @property
    def allowed_by(self) -> str:
        """The field --allow-changes names to let this change."""
        return DERIVED[self.name][0] if self.name in DERIVED else self.name

    def describe(self) -> str:
        if self.name == "arch":  # the words earlier engines used, kept for scripts that match
            return "it is a %s run but --arch is %s" % (self.saved, self.now)
        if self.name == "classes":
            return ("classes: the run was trained on %d classes, --data has %d (or in another "
                    "order)" % (len(self.saved), len(self.now)))
        return "%s: %s in the run, %s here" % (self.name, _show(self.saved), _show(self.now))


def _show(value: Any) -> str:
    return "none" if value is None else repr(value) if isinstance(value, str) else str(value)


@dataclass
class RunStart:
    """What a start into a save dir does, decided before any process or model is made."""

    checkpoint: Optional[str] = None   # the checkpoint the run continues from (None: new run)
    step: int = 0                      # that checkpoint's step
    changes: List[Change] = field(default_factory=list)  # let through by --allow-changes
    replace: bool = False              # rank 0 moves the old run's files aside first
    notes: List[str] = field(default_factory=list)


def settings_of(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The run-defining values of a run config (a checkpoint's or config.json's dict, see
    engine.checkpoint.run_config); settings it does not record are left out."""
    out = {k: config[k] for k in RUN_DEFINING if k in config}
    world = config.get("world_size")
    if world is not None and "batch_size" in config:
        out["global_batch"] = int(config["batch_size"]) * int(world)
    if world is not None and "learning_rate" in config:
        out["global_lr"] = float(config["learning_rate"]) * int(world)
    for k in ("classes", "train_images"):
        if config.get(k) is not None:
            out[k] = list(config[k]) if k == "classes" else config[k]
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def compare(saved: Mapping[str, Any], now: Mapping[str, Any]) -> List[Change]:
    """Every run-defining value that both configs record and that differs."""
    a, b = settings_of(saved), settings_of(now)
    return [Change(k, a[k], b[k]) for k in list(RUN_DEFINING) + list(DERIVED)
            if k in a and k in b and not _same(a[k], b[k])]


def allowed_fields() -> List[str]:
    """The names --allow-changes accepts: the run-defining fields."""
    return sorted(set(RUN_DEFINING) | {d[0] for d in DERIVED.values()})


def _spellings() -> Dict[str, str]:
    """Every way to name a TrainConfig field (its name, its flags without dashes) -> the name."""
    from engine.config import TrainConfig

    out = {}
    for f in dataclasses.fields(TrainConfig):
        for flag in (f.name, f.name.replace("_", "-")) + tuple(f.metadata.get("flags") or ()):
            out[flag.lstrip("-")] = f.name
    return out


def parse_allowed(text: Optional[str]) -> Tuple[bool, List[str]]:
    """--allow-changes: (all, field names); a name may be spelled as its option (--lr, lr,
    learning-rate); an unknown name is a UserError listing the valid ones."""
    if not text:
        return False, []
    names = _spellings()
    valid = allowed_fields()
    out = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        if raw == "all":
            return True, []
        name = names.get(raw.lstrip("-"), raw)
        if name not in valid:
            raise UserError("--allow-changes %s: %r is not a setting that defines a run; those "
                            "are: %s" % (text, raw, ", ".join(valid)))
        out.append(name)
    return False, out


def plan(config: "TrainConfig", *, world_size: int, classes: Sequence[str],
         train_images: Optional[int]) -> RunStart:
    """What this command does in its save dir (see the module docstring); raises UserError for
    a refusal, before anything on disk changes."""
    from engine import checkpoint as ckpt
    from engine.checkpoint import run_config

    save_dir = config.out_dir
    explicit = config.resume not in (None, "auto")
    if config.replace and explicit:
        raise UserError("--replace starts a new run and --resume %s continues one: give one of "
                        "them" % config.resume)
    now = run_config(config, classes, world_size, train_images=train_images)
    every, allowed = parse_allowed(config.allow_changes)
    existing = ckpt.file_in(save_dir) if os.path.isdir(save_dir) else None
    if config.replace:
        return RunStart(replace=bool(run_files(save_dir)))
    path: Optional[str]
    if explicit:
        path = ckpt.resolve_resume(config.resume or "")
        if existing and os.path.dirname(os.path.abspath(path)) != os.path.abspath(save_dir):
            raise UserError(
                "--resume %s: the save dir %s holds a run of its own (%s); continue that one "
                "(leave out --resume), choose another --save-dir, or pass --replace without "
                "--resume to start over there" % (config.resume, save_dir, existing))
    else:
        path = existing
    if path is not None:
        saved = ckpt.read(path, trusted=config.trust_pickle or None)
        where = "%s (%s, step %d)" % (save_dir, os.path.basename(path), saved.step)
        changes = _check(compare(saved.config, now), every, allowed, where, had_checkpoint=True)
        start = RunStart(checkpoint=path, step=saved.step, changes=changes)
        start.notes += _notes(saved.config, now, changes, saved.ema is not None)
        return start
    old = _read_config(save_dir)
    if old is not None and run_files(save_dir):
        where = "%s (its %s; no checkpoint yet)" % (save_dir, CONFIG_FILE)
        changes = _check(compare(old, now), every, allowed, where, had_checkpoint=False)
        return RunStart(changes=changes)
    return RunStart()


def _check(changes: List[Change], every: bool, allowed: Sequence[str], where: str,
           had_checkpoint: bool) -> List[Change]:
    refused = [c for c in changes if not every and c.allowed_by not in allowed]
    if not refused:
        return changes
    names = ",".join(dict.fromkeys(c.allowed_by for c in refused))
    what = ("to continue it" if had_checkpoint else "to start a new run after its log")
    raise UserError(
        "%s holds a run with other settings than this command: %s. Rerun with the run's settings "
        "to continue it, add --allow-changes %s %s with these, or pass --replace to start a new "
        "run there (the old files are kept under replaced-<time>/)%s"
        % (where, "; ".join(c.describe() for c in refused), names, what,
           _ema_hint(refused)))


def _ema_hint(changes: Sequence[Change]) -> str:
    for c in changes:
        if c.name == "ema_decay" and c.saved is not None and c.now is None:
            return ("; the run keeps an EMA of its weights: pass --ema-decay %s to keep it "
                    "(allowing the change drops it)" % c.saved)
        if c.name == "ema_decay" and c.saved is None:
            return ("; the run keeps no EMA: allowing the change starts one from the resumed "
                    "weights")
    return ""


def _notes(saved: Mapping[str, Any], now: Mapping[str, Any], changes: Sequence[Change],
           has_ema: bool) -> List[str]:
    out = []
    if saved.get("epochs") is not None and saved.get("epochs") != now.get("epochs"):
        out.append("--epochs %s (the run was started for %s): the LR schedule (%s) is computed for "
                   "%s epochs from the resumed step on"
                   % (now.get("epochs"), saved.get("epochs"), now.get("lr_schedule"),
                      now.get("epochs")))
    for c in changes:
        if c.name == "ema_decay" and c.now is None and has_ema:
            out.append("the checkpoint's EMA is dropped (--ema-decay is not given)")
        elif c.name == "ema_decay" and c.saved is None:
            out.append("the checkpoint has no EMA: it starts from the resumed weights")
        else:
            out.append("allowed change: %s" % c.describe())
    return out


def _read_config(save_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(save_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError("%s cannot be read (%s): it records the run in %s; move it away, or pass "
                        "--replace to start a new run there" % (path, exc, save_dir)) from None
    return config if isinstance(config, dict) else None


def run_files(save_dir: str) -> List[str]:
    """The files of a run in `save_dir` (checkpoints, config.json, metrics, curves, tb/)."""
    from engine import checkpoint as ckpt

    if not os.path.isdir(save_dir):
        return []
    found = [os.path.join(save_dir, n) for n in RUN_FILES
             if os.path.lexists(os.path.join(save_dir, n))]
    return sorted(set(ckpt.files_in(save_dir)) | set(found))


def replace_run(save_dir: str) -> Optional[str]:
    """Move the run in `save_dir` into `save_dir/replaced-<time>/` (renames only, nothing is
    deleted or copied); returns that folder, or None when there was nothing to move."""
    files = run_files(save_dir)
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = os.path.join(save_dir, "replaced-" + stamp)
    n = 1
    while os.path.lexists(target):
        n += 1
        target = os.path.join(save_dir, "replaced-%s-%d" % (stamp, n))
    try:
        os.makedirs(target)
        for path in files:
            os.rename(path, os.path.join(target, os.path.basename(path)))
    except OSError as exc:
        raise UserError(disk_error_message(exc, target)) from None
    return target


def startup_summary(cfg: TrainConfig, *, world: int, steps_per_epoch: int, total: int,
                    first: int, start: Any, base_lr: float, train_loader: Any,
                    val_loader: Any) -> List[str]:
    """The lines a run's log starts with (rank 0): what is about to run, and from where."""
    from engine import dist

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
                 % (cfg.data or cfg.train_data, train_loader.num_samples, val, train_loader.workers,
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


def prepare_save_dir(cfg: TrainConfig, run_config: Dict[str, Any], start: Any) -> None:
    """Rank 0: move a replaced run aside, clear dead temp files, write config.json."""
    from engine import checkpoint as ckpt
    from engine.atomic import atomic_write

    if start.replace:
        moved = replace_run(cfg.out_dir)
        if moved:
            print("note: the run that was in %s is now in %s (nothing was deleted)"
                  % (cfg.out_dir, moved), file=sys.stderr)
    ckpt.clean_temp_files(cfg.out_dir)
    path = os.path.join(cfg.out_dir, CONFIG_FILE)
    text = json.dumps(run_config, indent=1, sort_keys=True) + "\n"
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as exc:
        raise UserError(disk_error_message(exc, path)) from None
