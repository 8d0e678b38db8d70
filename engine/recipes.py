"""Training recipes: named JSON files of TrainConfig overrides.

`load_recipe("fast_resnet50_16ep", allowed=...)` reads `recipes/fast_resnet50_16ep.json` from
the repository (a path to any .json file works too) and returns its settings as a dict, ready
for `dataclasses.replace(TrainConfig(...), **recipe)`. Keys starting with "_" are documentation
(`_source`, `_expected`, `_notes`) and are dropped; any other key must be one of `allowed` (the
trainer passes its TrainConfig field names), so a typo fails loudly instead of being ignored.

A recipe file records where its numbers come from and the accuracy its source reports; those
figures were measured by the source on its hardware, not by this project.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

from engine.errors import ConfigError

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")

# The settings recipes use, with the JSON types each may take (None = null allowed).
RECIPE_KEYS: Dict[str, Tuple[type, ...]] = {
    "arch": (str,),
    "batch_size": (int,),                    # per GPU
    "learning_rate": (int, float),           # per GPU; the trainer multiplies by the world size
    "epochs": (int,),
    "weight_decay": (int, float),
    "momentum": (int, float),
    "warmup_epochs": (int, float),
    "lr_schedule": (str,),                   # step | cosine | linear | poly
    "label_smoothing": (int, float),
    "optimizer": (str,),                     # sgd | lars
    "no_wd_norm_bias": (bool,),
    "ema_decay": (int, float, type(None)),   # null = no EMA
    "mixup_alpha": (int, float),
    "cutmix_alpha": (int, float),
    "image_size": (int,),
    "min_res": (int, type(None)),            # progressive resizing; null = off
    "max_res": (int, type(None)),
    "start_ramp": (int, type(None)),
    "end_ramp": (int, type(None)),
    "val_image_size": (int, type(None)),     # null = image_size
    "val_resize_ratio": (int, float),        # val: resize short side to size / ratio, crop size
    "amp": (bool,),
}
CHOICES = {"lr_schedule": ("step", "cosine", "linear", "poly"), "optimizer": ("sgd", "lars")}
PROGRESSIVE = ("min_res", "max_res", "start_ramp", "end_ramp")


def list_recipes() -> List[str]:
    """Names of the recipes shipped in the repository's recipes/ folder."""
    if not os.path.isdir(RECIPES_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".json"))


def recipe_path(path_or_name: str) -> str:
    """A .json path as given, or a bare name resolved in the repository's recipes/ folder."""
    looks_like_path = path_or_name.endswith(".json") or os.sep in path_or_name or "/" in path_or_name
    if looks_like_path:
        if not os.path.isfile(path_or_name):
            raise ConfigError("recipe file not found: %s" % path_or_name)
        return path_or_name
    path = os.path.join(RECIPES_DIR, path_or_name + ".json")
    if not os.path.isfile(path):
        raise ConfigError("unknown recipe %r; shipped recipes: %s (or give a path to a .json file)"
                          % (path_or_name, ", ".join(list_recipes()) or "none"))
    return path


def _check_values(recipe: Dict[str, Any], where: str) -> None:
    for key, value in recipe.items():
        types = RECIPE_KEYS.get(key)
        if types is None:
            continue  # a key only the trainer knows: the trainer checks its value
        # JSON true/false are bools, and bool is an int in Python: keep them apart.
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError("%s: %s must be %s, got %r" % (where, key, names, value))
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError("%s: %s must be one of %s, got %r"
                              % (where, key, "|".join(CHOICES[key]), value))
    set_keys = [k for k in PROGRESSIVE if recipe.get(k) is not None]
    if set_keys and len(set_keys) != len(PROGRESSIVE):
        raise ConfigError("%s: progressive resizing needs all of %s set (or all null)"
                          % (where, ", ".join(PROGRESSIVE)))


def load_recipe(path_or_name: str, allowed: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Settings of a recipe (documentation keys dropped); unknown keys raise ConfigError.

    `allowed`: the keys the caller accepts (the trainer: its TrainConfig field names); None
    means RECIPE_KEYS.
    """
    path = recipe_path(path_or_name)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError("recipe %s is not valid JSON: %s (line %d, column %d)"
                          % (path, exc.msg, exc.lineno, exc.colno)) from None
    if not isinstance(data, dict):
        raise ConfigError("recipe %s must hold a JSON object of settings, got %s"
                          % (path, type(data).__name__))
    valid = set(RECIPE_KEYS if allowed is None else allowed)
    recipe = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(recipe) - valid)
    if unknown:
        raise ConfigError("recipe %s: unknown key%s %s; valid keys: %s"
                          % (path, "s" if len(unknown) > 1 else "", ", ".join(unknown),
                             ", ".join(sorted(valid))))
    _check_values(recipe, "recipe %s" % path)
    return recipe
