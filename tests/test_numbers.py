"""Numbers that are not settings: NaN and infinities in any tool's numeric option, from a flag, a
recipe or a config built in Python, are refused in one line naming the option; so is a recipe
that is not UTF-8 text. The tools run as users run them (subprocesses with a deadline)."""
import dataclasses
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import typing

import pytest

import engine.tools
from helpers import ROOT
from engine import cli
from engine.config import TrainConfig, config_from_argv
from engine.errors import ConfigError, UserError

DEADLINE = 120
BAD = ["nan", "NaN", "inf", "-inf", "Infinity", "-Infinity", "1e999"]


def tool_configs():
    """(tool, its config dataclass) for every tool in engine.tools: the dataclass its parser is
    derived from is the one with command-line options in the module's namespace."""
    found = []
    for mod in pkgutil.iter_modules(engine.tools.__path__):
        module = importlib.import_module("engine.tools." + mod.name)
        for value in vars(module).values():
            if dataclasses.is_dataclass(value) and isinstance(value, type) and any(
                    cli.is_option(f) for f in dataclasses.fields(value)):
                found.append((mod.name, value))
    return found


def numeric_options():
    out = []
    for tool, cls in tool_configs():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cli.is_option(f) and cli._arg_type(hints[f.name])[0] in (int, float):
                out.append((tool, cls, f))
    return out


def test_every_tool_with_numeric_options_is_covered():
    tools = {tool for tool, _, _ in numeric_options()}
    assert {"train", "test", "inference", "pack_imagenet", "stage_shards", "verify_pack",
            "make_sample_imagenet", "demo", "gpu_check"} <= tools
    floats = {(tool, f.name) for tool, cls, f in numeric_options()
              if cli._arg_type(typing.get_type_hints(cls)[f.name])[0] is float}
    assert {("train", "learning_rate"), ("train", "ema_decay"),
            ("stage_shards", "stall_timeout")} <= floats


def required_argv(cls):
    """The least argv that parses: a placeholder for every required option and positional."""
    argv = []
    for f in dataclasses.fields(cls):
        if cli.is_option(f) and f.default is dataclasses.MISSING:
            flags = f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)
            argv += ["x"] if not flags[0].startswith("-") else [flags[-1], "x"]
    return argv


@pytest.mark.parametrize("tool,cls,f", numeric_options(),
                         ids=lambda v: getattr(v, "name", v if isinstance(v, str) else ""))
def test_a_non_finite_flag_is_refused_naming_the_option(tool, cls, f, capsys):
    flags = f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)
    for value in BAD:
        with pytest.raises(SystemExit) as exit_:
            cli.parse(cls, required_argv(cls) + ["%s=%s" % (flags[0], value)])
        assert exit_.value.code == 2, (tool, f.name, value)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "error: argument " in last and flags[0] in last and repr(value) in last, err
        assert "Traceback" not in err


def test_finite_numbers_still_parse():
    c = config_from_argv(["--data", "D", "--lr", "0.5", "--wd", "-0.0", "--ema-decay", "1e-3",
                          "--momentum", "0"])
    assert (c.learning_rate, c.weight_decay, c.ema_decay, c.momentum) == (0.5, 0.0, 1e-3, 0.0)


def write_recipe(tmp_path, text, name="r.json"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return str(path)


@pytest.mark.parametrize("key,token", [("learning_rate", "Infinity"), ("momentum", "NaN"),
                                       ("weight_decay", "-Infinity"), ("warmup_epochs", "1e999"),
                                       ("ema_decay", "NaN"), ("rendezvous_timeout", "Infinity")])
def test_a_non_finite_recipe_value_is_refused_naming_the_key(tmp_path, key, token):
    path = write_recipe(tmp_path, '{"epochs": 3, "%s": %s}' % (key, token))
    with pytest.raises(ConfigError) as err:
        config_from_argv(["--config", path, "--data", "D"])
    message = str(err.value)
    assert key in message and "finite" in message and path in message and "\n" not in message
    # a flag given for that option replaces the recipe's value, and then nothing is wrong
    flag = {"learning_rate": "--lr", "weight_decay": "--wd"}.get(
        key, "--" + key.replace("_", "-"))
    config_from_argv(["--config", path, "--data", "D", flag, "0.5"])


def test_a_config_built_in_python_is_checked_too():
    for field, value in [("learning_rate", float("inf")), ("momentum", float("nan")),
                         ("val_resize_ratio", float("nan"))]:
        with pytest.raises(UserError, match="--%s must be a finite number" % field.replace(
                "_", "-")):
            TrainConfig(data="x", **{field: value}).finalized()


def test_a_dtr_size_of_nan_or_inf_is_refused():
    from engine.steps import parse_bytes

    for text in ("nanGB", "infMB", "inf", "-infB", "1e999GB"):
        with pytest.raises(UserError, match="memory size"):
            parse_bytes(text)
    assert parse_bytes("1.5 GiB") == 3 << 29


def test_recipe_encodings(tmp_path):
    settings = {"epochs": 3, "_notes": "cosine à la FFCV"}
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"):
        path = write_recipe(tmp_path, json.dumps(settings, ensure_ascii=False).encode(encoding),
                            "r-%s.json" % encoding)
        with pytest.raises(ConfigError) as err:
            config_from_argv(["--config", path, "--data", "D"])
        message = str(err.value)
        assert "not UTF-8" in message and "save it as UTF-8" in message and "\n" not in message
        if encoding.startswith("utf-16"):
            assert "UTF-16" in message
    # UTF-8 with the byte-order mark some editors write is UTF-8
    path = write_recipe(tmp_path, b"\xef\xbb\xbf" + json.dumps(settings).encode(), "bom.json")
    assert config_from_argv(["--config", path, "--data", "D"]).epochs == 3


def run(tool, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *map(str, args)],
                          capture_output=True, text=True, timeout=DEADLINE)


def error_line(r):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_the_tools_refuse_them_in_one_line(tmp_path):
    # the reported case: training ran, saved, then died in the plot
    line = error_line(run("train.py", "--data", tmp_path, "--lr", "inf"))
    assert "argument --lr/--learning-rate: 'inf' is not a finite number" in line
    recipe = write_recipe(tmp_path, '{"learning_rate": Infinity}')
    line = error_line(run("train.py", "--data", tmp_path, "--config", recipe))
    assert line.startswith("error: recipe ") and "learning_rate must be a finite number" in line
    utf16 = write_recipe(tmp_path, '{"epochs": 1}'.encode("utf-16"), "u16.json")
    line = error_line(run("train.py", "--data", tmp_path, "--config", utf16))
    assert line.startswith("error: recipe ") and "UTF-16" in line
    line = error_line(run("stage_shards.py", tmp_path, tmp_path / "d", "--stall-timeout", "nan"))
    assert "argument --stall-timeout: 'nan' is not a finite number" in line
    for tool, flag in (("test.py", "--image-size"), ("pack_imagenet.py", "--shard-size")):
        line = error_line(run(tool, "--data", tmp_path, "--out", tmp_path, flag, "inf")
                          if tool == "pack_imagenet.py" else run(tool, "--data", tmp_path, flag,
                                                                 "inf"))
        assert "argument %s: invalid int value: 'inf'" % flag in line
