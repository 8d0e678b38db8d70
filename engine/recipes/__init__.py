"""Training recipes: named JSON files of TrainConfig overrides, shipped in this package.

`load_recipe("fast_resnet50_16ep", schema)` reads `fast_resnet50_16ep.json` from this folder
(installed with the package, so a name works from any folder; a path to any .json file works
too) and returns its settings as a dict. Keys starting with "_" are documentation (`_source`,
`_expected`, `_notes`) and are dropped; every other key must be an option of `schema` with a
value of its type (engine.config passes TrainConfig's fields, the one place options are
defined), so a typo fails loudly instead of being ignored. Users go through engine.config.load_recipe / `--config`.

A recipe file records where its numbers come from and the accuracy its source reports; those
figures were measured by the source on its hardware, not by this project.
"""
from __future__ import annotations

import json
import os
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence

from engine.errors import ConfigError

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))


def list_recipes() -> List[str]:
    """Names of the shipped recipes."""
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".json"))


def recipe_path(path_or_name: str) -> str:
    """A .json path as given, or the file of the shipped recipe a bare name names."""
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


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field annotation (int, float, bool, str, Optional[...])."""
    if typing.get_origin(hint) is typing.Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool):  # JSON true/false are bools, and bool is an int in Python
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Union:
        return "/".join(_hint_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def load_recipe(path_or_name: str, schema: Mapping[str, Any],
                choices: Optional[Mapping[str, Sequence[Any]]] = None) -> Dict[str, Any]:
    """Settings of a recipe (documentation keys dropped), checked against `schema` (option
    name -> type annotation: the trainer passes its TrainConfig's) and `choices`; an unknown
    key or a value of the wrong type raises ConfigError in one line."""
    path = recipe_path(path_or_name)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError("cannot read recipe %s (%s)" % (path, exc.strerror or exc)) from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark some editors write is fine
    except UnicodeDecodeError as exc:
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:64]
        raise ConfigError("recipe %s is not UTF-8 text (%sbyte %d cannot be read); save it as "
                          "UTF-8" % (path, "it looks like UTF-16: " if utf16 else "",
                                     exc.start)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("recipe %s is not valid JSON: %s (line %d, column %d)"
                          % (path, exc.msg, exc.lineno, exc.colno)) from None
    if not isinstance(data, dict):
        raise ConfigError("recipe %s must hold a JSON object of settings, got %s"
                          % (path, type(data).__name__))
    recipe = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(recipe) - set(schema))
    if unknown:
        raise ConfigError("recipe %s: unknown key%s %s; valid keys: %s"
                          % (path, "s" if len(unknown) > 1 else "", ", ".join(unknown),
                             ", ".join(sorted(schema))))
    for key, value in recipe.items():
        if not _matches(value, schema[key]):
            raise ConfigError("recipe %s: %s must be %s, got %r"
                              % (path, key, _hint_name(schema[key]), value))
        allowed = (choices or {}).get(key)
        if allowed and value not in allowed:
            raise ConfigError("recipe %s: %s must be one of %s, got %r"
                              % (path, key, "|".join(map(str, allowed)), value))
    return recipe
