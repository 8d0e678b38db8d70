"""The checkpoint: one type, :class:`Checkpoint`, and the one pair that writes and reads it.

A checkpoint is what a run needs to continue exactly where it stopped: the global step (the
whole position) and the steps per epoch it was counted in, the states of the model, optimizer,
AMP scaler and EMA, the run's config and its metrics. This module is the only one that knows how
that is laid out on disk and which versions exist: the trainer builds a :class:`Checkpoint` and
calls :func:`write`, or calls :func:`read` and applies the result (:meth:`Checkpoint.resume_step`,
:meth:`Checkpoint.restore`).

On disk, a plain pickle (``megengine.save`` is ``pickle.dump``) of host values only (tensors
become numpy arrays), so it loads with or without MegEngine, of one dict::

    {"format": "engine-checkpoint", "version": 2,
     "step": int,             # global optimisation steps done: the whole position
     "steps_per_epoch": int,  # what `step` was counted in (epoch = step // steps_per_epoch)
     "state_dict": {...},     # model weights, the key official test.py/inference.py read too
     "optimizer": {...}, "scaler": {...} | None, "ema": {...} | None,
     "config": {...},         # TrainConfig as a dict + num_classes, classes, world_size,
                              # command, versions, started (engine.config.RUN_RECORD_KEYS)
     "metrics": {...}}        # best top-1 so far

A save dir's checkpoints (:func:`save`): :data:`FILE_NAME` (the official train.py's name) is
always the newest state of its run, what a resume continues from; ``checkpoint-<step>.pkl`` are
the last ``keep`` of them (a rolling window), and :data:`BEST_NAME` the one with the best val
top-1 so far. Each save writes :data:`FILE_NAME` atomically (temp file in the same folder, fsync,
rename: a crash or kill -9 at any moment leaves the previous file or the new one, never a torn
one), then hard-links the others to it (a copy where the file system has no hard links), and only
then drops the oldest window files: the newest checkpoint is never the one deleted. A state with
a non-finite number (a diverged run) is never written (:class:`NonFiniteState`).

Versions. Version 1 stored the position as ``"epoch"`` plus the loader's ``{"epoch",
"position"}``, counted in steps per epoch it did not record. **Version 1 is still owed:** a
checkpoint is the only copy of days of training, every run started before version 2 left a
version-1 file, and an engine upgrade must not strand such a run; the upgrade costs a few lines,
all in :func:`read`. A version newer than :data:`VERSION` is
refused with a message that says to update the engine.

Weights only. Evaluation and inference need just the model and the run config, which every
version keeps under ``"state_dict"`` and ``"config"``: :func:`config_of` recognises a checkpoint
among other weight files without the checks a resume needs, and :func:`ema_weights_of` finds its
averaged weights.

Reading is safe by default: the file is unpickled with the allow-list of
:func:`engine.models.weights.unpickle` (containers, numbers, strings, numpy arrays, MegEngine
tensors); anything else is refused with a one-line UnsafePickleError naming the global.
``trusted=True`` or ENGINE_TRUST_PICKLE=1 reads a trusted file as a plain pickle.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from megengine import Tensor

from engine.atomic import TMP_PREFIX, atomic_write, fsync_dir
from engine.errors import UserError, disk_error_message
from engine.models.weights import load_weights, read_file

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["FILE_NAME", "BEST_NAME", "FORMAT", "VERSION", "Checkpoint", "NonFiniteState",
           "clean_temp_files", "config_of", "dump", "ema_weights_of", "file_in", "files_in",
           "read", "resolve_resume", "run_config", "save", "window_name", "write"]

FORMAT = "engine-checkpoint"
VERSION = 2
FILE_NAME = "checkpoint.pkl"  # the official train.py's name; the newest state of a save dir's run
BEST_NAME = "best.pkl"
_WINDOW = re.compile(r"^checkpoint-(\d+)\.pkl$")


class NonFiniteState(UserError):
    """A state to be saved holds nan or inf: the run diverged, and the file is not written.
    `where` names the first such entry (state_dict.fc.weight, optimizer.state...)."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where


@dataclass
class Checkpoint:
    """Everything a run continues from. ``model``, ``optimizer``, ``scaler`` and ``ema`` are
    the objects' ``state_dict()``; ``config`` is :func:`run_config`'s dict."""

    step: int
    steps_per_epoch: int
    model: Mapping[str, Any]
    optimizer: Mapping[str, Any]
    config: Dict[str, Any]
    scaler: Optional[Mapping[str, Any]] = None
    ema: Optional[Mapping[str, Any]] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False)  # the file it was read from, for messages

    def resume_step(self, config: TrainConfig, classes: Sequence[str], world_size: int,
                    steps_per_epoch: int) -> int:
        """The global step this checkpoint continues at, counted in this run's steps per epoch.

        A resume must continue the same run: same model and classes. At an epoch boundary the
        global batch may change (the epoch is re-counted in this run's steps); mid-epoch it may
        not: the rest of the epoch's batches would differ.
        """
        saved = self.config
        if saved.get("arch") != config.arch:
            raise UserError("--resume: the checkpoint is a %s run but --arch is %s"
                            % (saved.get("arch"), config.arch))
        if list(saved.get("classes", [])) != list(classes):
            raise UserError(
                "--resume: the checkpoint was trained on %d classes, --data has %d (or in another "
                "order); resume with the same data" % (len(saved.get("classes", [])), len(classes)))
        epoch, position = divmod(self.step, self.steps_per_epoch)
        saved_batch = saved.get("batch_size", 0) * saved.get("world_size", 1)
        if position and saved_batch != config.batch_size * world_size:
            raise UserError(
                "--resume: the checkpoint stopped mid-epoch with a global batch of %d, this run "
                "has %d; the remaining batches would differ. Use the same --batch-size/--ngpus."
                % (saved_batch, config.batch_size * world_size))
        return epoch * steps_per_epoch + position

    def restore(self, model: Any, optimizer: Any, scaler: Any = None, ema: Any = None) -> None:
        """Load the saved states into a run's objects (``scaler``/``ema`` None: the run keeps
        none); weights that do not fit, or an optimizer of another kind, are UserErrors."""
        try:
            load_weights(model, self.model, strict=True, source=self.source or None)
        except ValueError as exc:
            raise UserError(" ".join(str(exc).split())) from None
        try:
            optimizer.load_state_dict(self.optimizer)
        except Exception as exc:  # noqa: BLE001 - MegEngine raises bare errors for a group mismatch
            raise UserError("--resume %s: the optimizer state does not fit this run (%s); resume "
                            "with the same --optimizer and --no-wd-norm-bias"
                            % (self.source, " ".join(str(exc).split()))) from None
        if scaler is not None and self.scaler:
            scaler.load_state_dict(self.scaler)
        if ema is not None and self.ema:
            ema.load_state_dict(self.ema)


def run_config(config: TrainConfig, classes: Sequence[str], world_size: int,
               train_images: Optional[int] = None) -> Dict[str, Any]:
    """What a checkpoint (and a save dir's config.json) records about its run: the TrainConfig,
    what test.py/inference.py and a resume need besides (class list, world size, the number
    of training images when known), and the launch (engine.config.run_facts: command line,
    versions, start time)."""
    from engine.config import run_facts

    out = dataclasses.asdict(config)
    out.update(num_classes=len(classes), classes=list(classes))
    out["world_size"] = int(world_size)
    if train_images is not None:
        out["train_images"] = int(train_images)
    out.update(run_facts())
    return out


# --------------------------------------------------------------------------------------------
# The write/read pair
# --------------------------------------------------------------------------------------------


def write(checkpoint: Checkpoint, path: str) -> str:
    """Write ``checkpoint`` to ``path`` atomically; returns ``path``. A full disk, a quota or a
    read-only folder is a UserError, and the previous checkpoint, if any, is unchanged; so is a
    state holding nan or inf (:class:`NonFiniteState`), which is never written."""
    ck = checkpoint
    obj = {"format": FORMAT, "version": VERSION, "step": ck.step,
           "steps_per_epoch": ck.steps_per_epoch, "state_dict": ck.model,
           "optimizer": ck.optimizer, "scaler": ck.scaler, "ema": ck.ema, "config": ck.config,
           "metrics": ck.metrics}
    host = _to_host(obj)
    bad = _first_non_finite(host, "")
    if bad is not None:
        raise NonFiniteState("the state of step %d is not finite (%s holds nan or inf), so it is "
                             "not saved; %s is unchanged" % (ck.step, bad, path), bad)
    try:
        return atomic_write(path, lambda f: pickle.dump(host, f, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError as exc:
        raise UserError(disk_error_message(exc, path) + " (the previous checkpoint, if any, is "
                        "unchanged)") from None


def _first_non_finite(obj: Any, where: str) -> Optional[str]:
    """The key path of the first float array or number in `obj` that is not finite, or None."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if k == "config":
                continue
            found = _first_non_finite(v, "%s.%s" % (where, k) if where else str(k))
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _first_non_finite(v, "%s[%d]" % (where, i))
            if found:
                return found
        return None
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return None if np.isfinite(obj).all() else where
    if isinstance(obj, float) and not np.isfinite(obj):
        return where
    return None


def read(path: str, *, trusted: Optional[bool] = None) -> Checkpoint:
    """The checkpoint in ``path`` (safely unpickled unless ``trusted``; None =
    $ENGINE_TRUST_PICKLE), any version this engine reads, as a :class:`Checkpoint`.

    A missing, unreadable, unsafe or foreign file (an official weight file has no optimizer
    state to resume), a damaged one, or one of a newer version is a one-line UserError.
    """
    obj = read_file(path, trusted=trusted, what="checkpoint")
    if obj.get("format") != FORMAT:
        raise UserError("--resume %s: not a checkpoint written by tools/train.py (an official "
                        "weight file has no optimizer or loader state to resume)" % path)
    try:
        version = int(obj.get("version", 1))
    except (TypeError, ValueError):
        raise UserError("%s is damaged: its version is %r" % (path, obj.get("version"))) from None
    if version > VERSION:
        raise UserError("--resume %s: checkpoint version %s was written by a newer engine (this "
                        "one reads up to %d); update the engine" % (path, version, VERSION))
    if version == 1:
        step, steps_per_epoch = _position_v1(obj, path)
    else:
        step, steps_per_epoch = _int(obj, "step", path), _int(obj, "steps_per_epoch", path)
    if steps_per_epoch < 1 or step < 0:
        raise UserError("%s is damaged: step %d, steps_per_epoch %d" % (path, step, steps_per_epoch))
    return Checkpoint(step=step, steps_per_epoch=steps_per_epoch,
                      model=_mapping(obj, "state_dict", path),
                      optimizer=_mapping(obj, "optimizer", path),
                      config=dict(_mapping(obj, "config", path)),
                      scaler=obj.get("scaler"), ema=obj.get("ema"),
                      metrics=dict(obj.get("metrics") or {}), source=path)


def _position_v1(obj: Mapping[str, Any], path: str) -> Tuple[int, int]:
    """The upgrade of version 1's place, the loader's (epoch, position in the epoch), to
    version 2's (step, steps per epoch); the loader's pair is what version 1 resumed from.

    Its "step" is epoch x (the writing run's steps per epoch) + position, which gives the steps
    per epoch from any epoch past the first. Where it does not (the first epoch, or a step that
    does not add up), any length past the position names the same place, and the shortest is
    taken: (epoch, position) is what a resume continues from either way.
    """
    loader = _mapping(obj, "loader", path)
    epoch, position = _int(loader, "epoch", path), _int(loader, "position", path)
    step = obj.get("step")
    if epoch > 0 and isinstance(step, int) and (step - position) % epoch == 0 \
            and (step - position) // epoch > position:
        return step, (step - position) // epoch
    return epoch * (position + 1) + position, position + 1


def _int(obj: Mapping[str, Any], key: str, path: str) -> int:
    try:
        return int(obj[key])
    except (KeyError, TypeError, ValueError):
        raise UserError("%s is damaged: its %r entry is %r, not a number"
                        % (path, key, obj.get(key))) from None


def _mapping(obj: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if not isinstance(value, Mapping):
        raise UserError("%s is damaged: its %r entry is a %s, not a dict"
                        % (path, key, type(value).__name__))
    return value


def config_of(obj: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The run config of an engine checkpoint's dict (any version; its weights are under
    "state_dict"), or None when ``obj`` is another weight file."""
    if obj.get("format") != FORMAT:
        return None
    return dict(obj.get("config") or {})


def ema_weights_of(obj: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The state dict of the moving average an engine checkpoint's dict holds (a run with an
    EMA), or None when it holds none or ``obj`` is another weight file."""
    if obj.get("format") != FORMAT:
        return None
    ema = obj.get("ema")
    state = ema.get("state_dict") if isinstance(ema, Mapping) else None
    return state if isinstance(state, Mapping) else None


def dump(obj: Mapping[str, Any], path: str) -> str:
    """Pickle any dict to ``path`` atomically (temp file in the same folder, fsync, rename,
    fsync dir), tensors as numpy arrays; returns ``path``. :func:`write` is this for a
    :class:`Checkpoint`; weight files of the other formats can be written with it too.

    A crash or kill -9 at any moment leaves either the previous file or the new one under
    ``path``, never a truncated one; a stray temp file may remain and is ignored by reads.
    OSErrors (a full disk) propagate.
    """
    host = _to_host(obj)
    return atomic_write(path, lambda f: pickle.dump(host, f, protocol=pickle.HIGHEST_PROTOCOL))


def _to_host(obj: Any) -> Any:
    """Tensors -> numpy, so a file never needs a device (or MegEngine) to load."""
    if isinstance(obj, dict):  # dict and OrderedDict both rebuild from pairs
        return obj.__class__((k, _to_host(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    if isinstance(obj, Tensor):
        return obj.numpy()
    return obj


# --------------------------------------------------------------------------------------------
# The save dir
# --------------------------------------------------------------------------------------------


def file_in(save_dir: str) -> Optional[str]:
    """The save dir's newest checkpoint, or None when it has none. Temp files are never
    returned."""
    path = os.path.join(save_dir, FILE_NAME)
    return path if os.path.isfile(path) else None


def window_name(step: int) -> str:
    """The name of step `step`'s file in the rolling window."""
    return "checkpoint-%08d.pkl" % step


def files_in(save_dir: str) -> List[str]:
    """Every checkpoint file of a save dir: the newest, the window, the best."""
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    return sorted(os.path.join(save_dir, n) for n in names
                  if n in (FILE_NAME, BEST_NAME) or _WINDOW.match(n))


def save(checkpoint: Checkpoint, save_dir: str, *, keep: int = 0, best: bool = False) -> str:
    """Write `checkpoint` as the save dir's newest (:data:`FILE_NAME`), put it in the rolling
    window of the last `keep` saves (``checkpoint-<step>.pkl``), as :data:`BEST_NAME` too when
    `best`, then drop the window's oldest files (by when they were written, never the newest).
    Returns the path of :data:`FILE_NAME`. Errors as :func:`write`; a window or best file that
    cannot be made is a UserError too (the newest checkpoint is written by then)."""
    path = write(checkpoint, os.path.join(save_dir, FILE_NAME))
    try:
        if keep > 0:
            _link_over(path, os.path.join(save_dir, window_name(checkpoint.step)))
        if best:
            _link_over(path, os.path.join(save_dir, BEST_NAME))
        fsync_dir(save_dir)
        _drop_old(save_dir, keep)
    except OSError as exc:
        raise UserError(disk_error_message(exc, save_dir) + " (%s is saved)" % path) from None
    return path


def _link_over(src: str, dst: str) -> None:
    """`dst` becomes another name of `src`'s file, atomically (a copy where links fail)."""
    folder = os.path.dirname(dst)
    tmp = os.path.join(folder, "%s%s.%d.link" % (TMP_PREFIX, os.path.basename(dst), os.getpid()))
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
    except OSError:  # no hard links here (some network and FAT file systems): copy instead
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 22))
        return
    os.replace(tmp, dst)


def _drop_old(save_dir: str, keep: int) -> None:
    window = []
    for name in os.listdir(save_dir):
        match = _WINDOW.match(name)
        if match:
            st = os.stat(os.path.join(save_dir, name))
            window.append((st.st_mtime_ns, int(match.group(1)), name))
    window.sort(reverse=True)  # newest first
    for _, _, name in window[max(0, keep):]:
        os.unlink(os.path.join(save_dir, name))


def resolve_resume(resume: str) -> str:
    """`--resume` takes a checkpoint file or a save dir (meaning the checkpoint in it)."""
    if os.path.isdir(resume):
        found = file_in(resume)
        if found is None:
            raise UserError(
                "nothing to resume in %s: it has no %s (was any epoch or --save-every step "
                "reached?)" % (resume, FILE_NAME)
            )
        return found
    if not os.path.exists(resume):
        raise UserError("--resume: no such file or folder: %s" % resume)
    return resume


def clean_temp_files(save_dir: str) -> None:
    """Remove temp files left by a save that was killed; called when a run (re)starts."""
    for p in glob.glob(os.path.join(save_dir, TMP_PREFIX + "*")):
        try:
            os.unlink(p)
        except OSError:
            pass
