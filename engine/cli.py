"""Command lines derived from dataclasses: a tool's options, their defaults and their help texts
live once, as the fields of the dataclass that its engine function takes.

A field made with `option(default, help, *flags, **argparse_kw)` is a command-line option: it is
spelled `--field-name` unless `flags` are given (a flag without a leading dash makes it a
positional argument), a bool becomes `--x / --no-x` (a field named `no_x` becomes `--no-x / --x`),
and an Optional[...] annotation gives the value's type; a float option takes finite numbers only,
from a flag or a recipe alike (NaN and infinities are refused naming the option). A plain
dataclass field is not on the command line. `build_parser(Config)` derives the parser and
`parse(Config, argv)` returns a Config; given `recipes=`, a `--config RECIPE` flag supplies
defaults too, so that a value comes from the dataclass default < the recipe < a flag.

The help shows each default once, a bool's as the flag in effect ("(default: --progress)"). A
dataclass with many options groups them in its help by a class attribute `HELP_GROUPS`:
((title, (field name, ...)), ...) in display order; "config" names the --config flag, and an
option no group names is listed last, under "other options".

The options several tools share (the model name and its weights, the evaluation crop size, the
unpickling opt-out) are defined here once; each tool's dataclass uses them.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Type, TypeVar

__all__ = ["DEFAULT_ARCH", "option", "is_option", "choices", "help_groups", "build_parser", "parse",
           "finite_float", "check_numbers", "option_flag", "arch_option", "model_arch_option",
           "model_option", "trust_pickle_option", "eval_size_option", "batch_size_option"]

C = TypeVar("C")
Help = typing.Union[str, Callable[[], str]]


def option(default: Any, help: Help, *flags: str, **argparse_kw: Any) -> Any:
    """A dataclass field that is also a command-line option, its spelling and help text beside
    its default. `default=dataclasses.MISSING` makes the field (and the flag) required; `help`
    may be a function, called when the parser is built, for help that names a figure of this
    machine."""
    return dataclasses.field(default=default,
                             metadata=dict(help=help, flags=flags, kw=argparse_kw))


def is_option(f: dataclasses.Field) -> bool:
    return "help" in f.metadata


def choices(cls: type) -> Dict[str, Sequence[Any]]:
    """Field name -> the values its option accepts, for the options that restrict them."""
    return {f.name: f.metadata["kw"]["choices"] for f in dataclasses.fields(cls)
            if is_option(f) and "choices" in f.metadata["kw"]}


# ------------------------------------------------------------- options several tools share

#: The architecture a run builds, and weights that do not name theirs are, unless --arch says.
DEFAULT_ARCH = "resnet18"


def arch_option() -> Any:
    return option(DEFAULT_ARCH, "model name (engine.models.ARCHS)", "-a", "--arch")


def model_arch_option() -> Any:
    """--arch of a tool that loads weights: an engine checkpoint names its own."""
    return option(None, "model name (engine.models.ARCHS); default: the one an engine checkpoint "
                        "records, else %s. A different one than the checkpoint's is "
                        "refused" % DEFAULT_ARCH, "-a", "--arch")


def model_option() -> Any:
    return option(None, "weights: path or URL to an official .pkl or an engine checkpoint (a URL "
                        "is downloaded once into the megengine.hub cache; names ending in "
                        "_<hex>.pkl are sha256-checked); default, 'none' or 'published': "
                        "MegEngine's published weights for --arch", "-m", "--model",
                  metavar="PKL")


def trust_pickle_option(flag: str = "--model", files: str = "weight files") -> Any:
    return option(False, "load %s without the allow-list of what %s hold: only for files you "
                         "trust (unpickling runs whatever a file names)" % (flag, files))


def eval_size_option() -> Any:
    return option(None, "center-crop size (default: the size an engine checkpoint's run "
                        "evaluated at, its val_image_size or training size; else 224)",
                  "--image-size")


def batch_size_option(default: int) -> Any:
    return option(default, "images per GPU per step", "-b", "--batch-size")


# ------------------------------------------------------------------------------ numbers
# Python's float() reads "nan", "inf" and "-infinity", and JSON recipes may hold NaN, Infinity
# or 1e999; none of them is a setting. A NaN passes every range check (all comparisons are
# false) and an infinity passes the one-sided ones (> 0), so they are refused here, where the
# numbers of every tool come in: flags through finite_float, recipes through check_numbers.

NOT_FINITE = "NaN and infinities are not settings"


def finite_float(text: str) -> float:
    """argparse type of a float option: a finite number (argparse names the option when this
    raises)."""
    value = float(text)  # ValueError: argparse's "invalid float value: 'x'"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError("%r is not a finite number (%s)" % (text, NOT_FINITE))
    return value


finite_float.__name__ = "float"  # argparse's messages name the type by this


def option_flag(f: dataclasses.Field) -> str:
    """How messages name an option: its --field-name spelling if it has one, else its last."""
    flags = f.metadata.get("flags") or ()
    long = "--" + f.name.replace("_", "-")
    return long if long in flags or not flags else flags[-1]


def check_numbers(cls: type, values: Mapping[str, Any], where: str = "") -> None:
    """Raise ConfigError (one line naming the option) if a float or int option of `cls` in
    `values` (field name -> value: a recipe, or a built config's fields) is NaN or infinite."""
    from engine.errors import ConfigError

    for f in dataclasses.fields(cls):
        value = values.get(f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError("%s%s must be a finite number, got %r (%s)"
                              % (where, f.name if where else option_flag(f), value, NOT_FINITE))


# ------------------------------------------------------------------------------ the parser

def _arg_type(hint: Any) -> Tuple[Any, bool]:
    """(type for argparse, is_bool) of a field's annotation, Optional[...] unwrapped."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    return base, base is bool


class _Switch(argparse.Action):
    """A bool option spelled by two flags: the first sets True, the second False. For a field
    named `no_x` the pair is `--no-x / --x` (argparse's BooleanOptionalAction would make it
    `--no-x / --no-no-x`)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any):
        self.on = option_strings[0]
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, option_string == self.on)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _bool_flags(flags: Tuple[str, ...]) -> Tuple[str, ...]:
    """The flags of a bool option: each given flag, then the negation of each long one."""
    negations = []
    for flag in flags:
        if flag.startswith("--no-"):
            negations.append("--" + flag[len("--no-"):])
        elif flag.startswith("--"):
            negations.append("--no-" + flag[2:])
    return tuple(flags) + tuple(negations)


def _add(p: Any, f: dataclasses.Field, hint: Any) -> None:
    meta = f.metadata
    help_text = meta["help"]() if callable(meta["help"]) else meta["help"]
    flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
    kw: Dict[str, Any] = dict(help=help_text, **meta["kw"])
    base, is_bool = _arg_type(hint)
    positional = not flags[0].startswith("-")
    if positional:
        kw.setdefault("metavar", flags[0])
        flags = (f.name,)
    else:
        kw["dest"] = f.name
        if f.default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
    if is_bool:
        kw["action"] = _Switch
        flags = _bool_flags(flags)
    elif "const" not in kw or base is not str:  # nargs="?" with a str const keeps its text
        kw["type"] = finite_float if base is float else base
    p.add_argument(*flags, **kw)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not for a default of None (the help says what happens then)
    nor where the help names the default itself; a bool's default is the flag in effect."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        if isinstance(action, _Switch):
            flags = action.option_strings
            on = flags[:len(flags) // 2]
            shown = on if action.default else flags[len(flags) // 2:]
            return "%s (default: %s)" % (text, [f for f in shown if f.startswith("--")][0])
        return super()._get_help_string(action)


def help_groups(cls: type) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """`cls.HELP_GROUPS`: ((title, (field name, ...)), ...), or () for an ungrouped help."""
    return tuple(getattr(cls, "HELP_GROUPS", ()))


def build_parser(cls: type, description: str = "", epilog: Optional[str] = None,
                 recipes: bool = False) -> argparse.ArgumentParser:
    """The parser of `cls`'s option fields (flags, help, defaults), grouped by HELP_GROUPS;
    with `recipes`, plus --config for a recipe whose values become the defaults."""
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=_HelpFormatter)
    groups = help_groups(cls)
    where: Dict[str, Any] = {}
    for title, names in groups:
        group = p.add_argument_group(title)
        where.update({name: group for name in names})
    other = p.add_argument_group("other options") if groups else p
    # A class may hold --config as a field of its own (to record which recipe it came from).
    own_config = any("--config" in f.metadata.get("flags", ()) for f in dataclasses.fields(cls))
    if recipes and not own_config:
        where.get("config", other).add_argument(
            "--config", metavar="RECIPE", default=None,
            help="a recipe: the name of a shipped one (engine/recipes/NAME.json) or a path to a "
                 ".json file; its keys are these options' names (e.g. batch_size) and flags "
                 "given here override them")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_option(f):
            _add(where.get(f.name, other), f, hints[f.name])
    return p


def parse(cls: Type[C], argv: Optional[Sequence[str]] = None, description: str = "",
          epilog: Optional[str] = None,
          recipes: Optional[Callable[[str], Mapping[str, Any]]] = None) -> C:
    """`cls` from the command line. With `recipes` (a recipe name or path -> its values),
    --config RECIPE supplies defaults: dataclass default < recipe < flag. Bad values exit 2
    through argparse; `recipes` raises a UserError for a bad recipe."""
    p = build_parser(cls, description, epilog, recipes=recipes is not None)
    where = ""
    if recipes is not None:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv)
        if known.config:
            recipe = dict(recipes(known.config))
            where = "recipe %s: " % known.config
            p.set_defaults(**recipe)
            # A recipe may set a required option (--data); the flag is then optional.
            for action in p._actions:
                if action.dest in recipe:
                    action.required = False
    args = vars(p.parse_args(argv))
    args.pop("config", None)
    # argparse types only what comes from the command line: the numbers a recipe left standing
    # (no flag replaced them) are checked here, as flags are.
    check_numbers(cls, args, where)
    return cls(**args)
