"""Fine-tuning: a new run's first weights from other weights (--pretrained, --weights).

:func:`start_from` loads into the model a run has just built for its data's classes either
MegEngine's published weights for the run's architecture (``--pretrained``) or the weights of a
file (``--weights``: an engine checkpoint, an official MegEngine weight file or train.py
checkpoint; a path or a URL, fetched once per node). Every tensor must fit the model, except the
classifier head (``fc``): when the data's classes are not the weights' (another count, or an
engine checkpoint of other classes), the head keeps its fresh initialisation and one line says
so. Only the weights come along: the optimizer state, the schedule and the step start from zero,
because a fine-tuning run is a new run (``--resume`` continues one instead, and the two are not
combined: engine.config refuses it).
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

from engine import checkpoint, dist
from engine.config import TrainConfig
from engine.errors import UserError
from engine.imagenet_classes import imagenet_wnids
from engine.models import hub, weights

__all__ = ["HEAD", "start_from"]

#: The classifier head's tensors: the layer that depends on the classes.
HEAD = ("fc.weight", "fc.bias")


def start_from(model: Any, config: TrainConfig, classes: Sequence[str]) -> Optional[str]:
    """Load the weights ``config`` starts from (--pretrained / --weights) into ``model``, a
    fresh model of ``config.arch`` with one output per class of ``classes``; returns the weights'
    source, or None for a run from scratch (nothing is loaded).

    Raises a one-line UserError for weights that cannot be read or do not fit (another
    architecture: the message names both sides), or an engine checkpoint of another --arch.
    """
    if not (config.pretrained or config.weights):
        return None
    if config.pretrained:
        flag, source = "--pretrained", hub.prefetch_weights(hub.PUBLISHED, config.arch)
        assert source is not None  # prefetch_weights returns a path or raises
        obj = weights.read_file(source, trusted=config.trust_pickle or None,
                                what="cached weight file")
        what = "the published %s weights" % config.arch
    else:
        assert config.weights is not None
        flag, source = "--weights", config.weights
        obj = weights.read(source, trusted=config.trust_pickle or None)
        what = source
    run = checkpoint.config_of(obj)
    if run is not None and run.get("arch") and run["arch"] != config.arch:
        raise UserError("%s %s is a %s checkpoint but --arch is %s: pass --arch %s"
                        % (flag, source, run["arch"], config.arch, run["arch"]))
    state: Dict[str, Any] = dict(weights.unwrap(obj).state)
    reason = _new_head_reason(state, _classes_of(state, run), classes)
    if reason:
        own = model.state_dict()
        state.update((k, own[k]) for k in HEAD if k in own)  # the fresh head, kept as it is
    weights.load_weights(model, state, strict=True, source=what)
    if dist.get_rank() == 0:
        print("fine-tuning from %s%s" % (
            what, ": %s, so the classifier head (fc) starts fresh and every other layer from the "
                  "weights" % reason if reason else " (every layer, the classifier head too)"),
              file=sys.stderr)
    return source


def _classes_of(state: Mapping[str, Any], run: Optional[Mapping[str, Any]]) -> Optional[List[str]]:
    """The classes the weights' head scores, where known: an engine checkpoint's record, else
    the ImageNet WNIDs for a 1000-output head (published and official files)."""
    if run is not None and run.get("classes"):
        return list(run["classes"])
    fc = state.get("fc.weight")
    if fc is not None and len(getattr(fc, "shape", ())) == 2 and int(fc.shape[0]) == 1000:
        return imagenet_wnids()
    return None


def _new_head_reason(state: Mapping[str, Any], known: Optional[Sequence[str]],
                     classes: Sequence[str]) -> Optional[str]:
    """Why the head cannot be reused (None: it can): another class count, or other classes."""
    fc = state.get("fc.weight")
    if fc is None or len(getattr(fc, "shape", ())) != 2:
        return None  # not a ResNet head: the strict load names what does not fit
    rows = int(fc.shape[0])
    if rows != len(classes):
        return "they score %d classes, the data has %d" % (rows, len(classes))
    if known is not None and list(known) != list(classes):
        return "they score %d other classes than the data's (or in another order)" % rows
    return None
