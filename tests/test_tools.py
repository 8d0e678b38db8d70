"""The CLIs as users run them (subprocesses): --help, test.py and inference.py on tiny
checkpoints of every format, one-line errors with exit status 2, train.py flags and --amp."""
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from helpers import make_imagenet, photo_bgr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
LINE = re.compile(r"^(\d+): class = (.{20,}) with probability = ([ \d]\d\.\d|100\.0) %$")


def run_tool(name, *args, timeout=300, env=None):
    p = subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=None if env is None else {**os.environ, **env})
    return p.returncode, p.stdout, p.stderr


def assert_user_error(rc, out, err, *needles):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("tool", ["train.py", "test.py", "inference.py"])
def test_help(tool):
    rc, out, err = run_tool(tool, "--help", timeout=60)
    assert rc == 0 and "usage:" in out
    if tool == "train.py":
        for flag in ("--data", "--arch", "--batch-size", "--ngpus", "--save-dir", "--save",
                     "--learning-rate", "--epochs", "--workers", "--image-size", "--weight-decay",
                     "--momentum", "--warmup-epochs", "--lr-schedule", "--label-smoothing",
                     "--amp", "--trace", "--no-trace", "--dtr", "--resume", "--seed",
                     "--num-nodes", "--node-rank", "--master-ip", "--master-port", "--save-every"):
            assert flag in out, flag


def test_train_flags_map_to_config():
    from engine.config import config_from_argv

    cfg = config_from_argv(["--data", "D"])
    assert (cfg.arch, cfg.batch_size, cfg.learning_rate, cfg.epochs, cfg.trace, cfg.amp,
            cfg.dtr, cfg.lr_schedule) == ("resnet18", 32, 0.0125, 100, True, False, None, "step")
    # the node layout defaults to None so that torchrun/Slurm variables can fill it in
    assert (cfg.num_nodes, cfg.node_rank, cfg.master_ip, cfg.master_port, cfg.ngpus) == \
        (None, None, None, None, None)
    cfg = config_from_argv(
        ["-d", "D", "--save", "S", "--no-trace", "--dtr", "--lr", "0.1", "--lr-schedule",
         "cosine", "--num-nodes", "2", "--node-rank", "1", "--master-ip", "10.0.0.1",
         "--master-port", "2345", "--resume", "S", "--no-eval", "--no-progress"])
    assert (cfg.save_dir, cfg.trace, cfg.dtr, cfg.learning_rate, cfg.lr_schedule) == \
        ("S", False, "auto", 0.1, "cosine")
    assert (cfg.num_nodes, cfg.node_rank, cfg.master_ip, cfg.master_port, cfg.resume) == \
        (2, 1, "10.0.0.1", 2345, "S")
    assert (cfg.evaluate, cfg.progress) == (False, False)
    assert config_from_argv(["-d", "D", "--save-dir", "X"]).save_dir == "X"
    assert config_from_argv(["-d", "D", "--dtr", "5GB"]).dtr == "5GB"


def test_every_config_field_has_a_flag_and_its_default_comes_from_the_dataclass():
    import dataclasses

    from engine.config import TrainConfig, build_parser

    p = build_parser()
    dests = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in dests, f.name
        assert f.metadata.get("help"), f.name
        if f.default is not dataclasses.MISSING:
            assert dests[f.name].default == f.default, f.name


# Each tool's flags and their defaults, as its parser (derived from its dataclass) spells them.
TOOL_FLAGS = {
    # --arch None: an engine checkpoint's own, else resnet18 (engine.models.load.DEFAULT_ARCH)
    "engine.evaluate:TestConfig": {
        "-d": None, "--data": None, "-a": None, "--arch": None, "-m": None,
        "--model": None, "--trust-pickle": False, "-n": None, "--ngpus": None, "-b": 100,
        "--batch-size": 100, "-j": None, "--workers": None, "--image-size": None,
        "--no-progress": True},
    "engine.inference:InferenceConfig": {
        "-a": None, "--arch": None, "-m": None, "--model": None,
        "--trust-pickle": False, "-i": None, "--image": None, "--topk": 5, "--image-size": None},
    "engine.data.pack:PackConfig": {
        "--data": None, "--out": None, "--splits": None, "--workers": None, "--shard-size": 5000,
        "--max-side": None, "--seed": 0, "--strict": False, "--num-nodes": None,
        "--node-rank": None, "--merge": False, "--quiet": False},
    "engine.data.verify:VerifyConfig": {"path": None, "--fast": False, "--sample": None,
                                        "--seed": 0},
    "engine.data.stage:StageConfig": {"src": None, "dst": None, "--stall-timeout": 600.0},
    "engine.data.sample:SampleConfig": {
        "--out": None, "--classes": 10, "--train-per-class": 100, "--val-per-class": 20,
        "--seed": 0, "--imagenet-like": False},
    "engine.tools.demo:DemoConfig": {"--out": "demo", "--epochs": 3, "--image-size": 32,
                                     "--workers": 1},
    "engine.tools.gpu_check:GpuCheckConfig": {
        "--no-bench": True, "--bench-batch": 128, "--bench-size": 224, "--bench-steps": 20,
        "--bench-warmup": 5},
}


@pytest.mark.parametrize("where", sorted(TOOL_FLAGS))
def test_every_tool_parser_comes_from_its_dataclass(where):
    """The flags and defaults the tools have always had, each field an option with help, each
    default the dataclass's."""
    import dataclasses
    import importlib

    from engine.cli import build_parser, is_option

    module, name = where.split(":")
    config = getattr(importlib.import_module(module), name)
    actions = [a for a in build_parser(config)._actions if a.dest != "help"]
    spelled = {s: a.default for a in actions for s in (a.option_strings or [a.dest])}
    for flag, default in TOOL_FLAGS[where].items():
        assert flag in spelled, (where, flag)
        assert spelled[flag] == default, (where, flag)
    fields = {f.name: f for f in dataclasses.fields(config) if is_option(f)}
    assert {a.dest for a in actions} == set(fields)
    for a in actions:
        f = fields[a.dest]
        assert f.metadata["help"], a.dest
        assert a.required == (f.default is dataclasses.MISSING)
        if f.default is not dataclasses.MISSING:
            assert a.default == f.default, a.dest


def test_the_engine_functions_take_their_defaults_from_the_tools_dataclasses():
    import dataclasses
    import inspect

    from engine.data.pack import PackConfig, pack_imagenet
    from engine.data.stage import StageConfig, stage
    from engine.data.verify import VerifyConfig, verify
    from engine.inference import InferenceConfig, predict
    from engine.data.sample import SampleConfig, make_sample_imagenet

    for fn, config, names in [
            (pack_imagenet, PackConfig, ["shard_size", "seed", "workers", "max_side", "strict"]),
            (verify, VerifyConfig, ["sample", "fast", "seed"]),
            (stage, StageConfig, ["stall_timeout"]),
            (predict, InferenceConfig, ["topk", "image_size"]),
            (make_sample_imagenet, SampleConfig, ["classes", "train_per_class", "val_per_class",
                                                  "seed", "imagenet_like"])]:
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        params = inspect.signature(fn).parameters
        for n in names:
            assert params[n].default == defaults[n], (fn.__name__, n)


def test_a_recipe_gives_the_config_of_the_equivalent_flags_and_flags_override_it(tmp_path):
    import json

    from engine.config import config_from_argv, load_recipe
    from engine.errors import ConfigError

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"_source": "a note", "data": "D", "arch": "resnet50",
                                  "batch_size": 64, "lr_schedule": "cosine", "amp": True,
                                  "warmup_epochs": 5, "label_smoothing": 0.1}))
    by_recipe = config_from_argv(["--config", str(recipe)])
    by_flags = config_from_argv(["-d", "D", "-a", "resnet50", "-b", "64", "--lr-schedule",
                                 "cosine", "--amp", "--warmup-epochs", "5",
                                 "--label-smoothing", "0.1"])
    assert by_recipe == by_flags
    over = config_from_argv(["--config", str(recipe), "-b", "16", "--no-amp"])
    assert (over.batch_size, over.amp, over.arch) == (16, False, "resnet50")
    recipe.write_text(json.dumps({"batch_sise": 64}))
    with pytest.raises(ConfigError, match="unknown key batch_sise; valid keys:.*batch_size"):
        load_recipe(str(recipe))
    with pytest.raises(ConfigError, match="unknown recipe .no_such_recipe.; shipped recipes"):
        load_recipe("no_such_recipe")


def test_train_bad_recipe_is_one_line(tmp_path):
    (tmp_path / "r.json").write_text("{not json")
    rc, out, err = run_tool("train.py", "--config", tmp_path / "r.json")
    assert_user_error(rc, out, err, "not valid JSON")


def test_train_amp_on_cpu_gives_its_message(tmp_path):
    import megengine as mge

    if mge.is_cuda_available():
        pytest.skip("a GPU is present: --amp is allowed")
    rc, out, err = run_tool("train.py", "--data", tmp_path, "--amp")
    assert_user_error(rc, out, err, "--amp needs a CUDA GPU", "nan")


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 3-class val set, the chelsea photo, and resnet18 weights in every format."""
    import megengine as mge
    from engine.checkpoint import FORMAT, VERSION, dump
    from engine.models import get_model

    d = tmp_path_factory.mktemp("tools")
    root = make_imagenet(str(d / "inet"), classes=3, train=1, val=2)
    classes = sorted(os.listdir(os.path.join(root, "val")))
    cat = str(d / "chelsea.jpg")
    cv2.imwrite(cat, photo_bgr("chelsea"))
    mge.random.seed(0)
    sd3 = get_model("resnet18", num_classes=3).state_dict()
    out = {"root": root, "cat": cat, "dir": d, "classes": classes}
    out["engine"] = dump(
        {"format": FORMAT, "version": VERSION, "epoch": 1, "state_dict": sd3,
         "config": {"arch": "resnet18", "num_classes": 3, "classes": classes,
                    "image_size": 32}}, str(d / "engine.pkl"))
    out["other_classes"] = dump(
        {"format": FORMAT, "version": VERSION, "epoch": 1, "state_dict": sd3,
         "config": {"arch": "resnet18", "num_classes": 3, "classes": ["a", "b", "c"],
                    "image_size": 32}}, str(d / "other.pkl"))
    out["bare3"] = dump(sd3, str(d / "bare3.pkl"))
    out["official1000"] = dump(get_model("resnet18").state_dict(), str(d / "r18.pkl"))
    return out


# ------------------------------------------------------------------------------- test.py

TOP = re.compile(r"top1\s+([\d.]+)\s+top5\s+([\d.]+)")


@pytest.mark.parametrize("fmt", ["engine", "bare3"])
def test_test_tool_prints_top1_top5_last(files, fmt):
    rc, out, err = run_tool("test.py", "--data", files["root"], "--model", files[fmt],
                            "--image-size", 32, "--batch-size", 4, "--workers", 0,
                            "--no-progress")
    assert rc == 0, err
    m = TOP.search(out.strip().splitlines()[-1])
    assert m, out
    top1, top5 = map(float, m.groups())
    assert 0 <= top1 <= top5 <= 100
    assert "6 images" in out


def test_test_tool_accepts_the_val_folder_itself(files):
    rc, out, err = run_tool("test.py", "-d", os.path.join(files["root"], "val"), "-m",
                            files["engine"], "--image-size", 32, "-b", 6, "-j", 0,
                            "--no-progress")
    assert rc == 0, err
    assert TOP.search(out.strip().splitlines()[-1])


def test_test_tool_errors(files):
    rc, out, err = run_tool("test.py", "-d", files["root"], "-m", files["other_classes"],
                            "--image-size", 32, "-j", 0)
    assert_user_error(rc, out, err, "class mismatch")
    rc, out, err = run_tool("test.py", "-d", files["root"], "-m", files["engine"], "-a",
                            "resnet50", "-j", 0)
    assert_user_error(rc, out, err, "resnet18 checkpoint but --arch is resnet50")
    rc, out, err = run_tool("test.py", "-d", files["root"], "-m", files["official1000"],
                            "-a", "resnet34", "-j", 0)
    assert_user_error(rc, out, err, "do not fit the model")
    rc, out, err = run_tool("test.py", "-d", files["dir"] / "nope", "-m", files["engine"])
    assert_user_error(rc, out, err, "no such folder")


# -------------------------------------------------------------------------- inference.py

def test_inference_engine_checkpoint_prints_official_lines(files):
    rc, out, err = run_tool("inference.py", "--model", files["engine"], "--image", files["cat"],
                            "--image-size", 32)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3  # top-5 clamped to the 3 classes
    probs = []
    for k, line in enumerate(lines):
        m = LINE.match(line)
        assert m, line
        assert int(m.group(1)) == k
        assert m.group(2).strip() in files["classes"]  # names recorded in the checkpoint
        probs.append(float(m.group(3)))
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 100) < 0.5


def test_inference_official_1000_class_weights_use_imagenet_names(files):
    from engine.imagenet_classes import imagenet_names

    rc, out, err = run_tool("inference.py", "-a", "resnet18", "-m", files["official1000"],
                            "-i", files["cat"], "--topk", 5)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 5
    names = set(imagenet_names())
    for k, line in enumerate(lines):
        m = LINE.match(line)
        assert m and int(m.group(1)) == k, line
        assert m.group(2).strip() in names
    # the official formatting, byte for byte
    from engine.inference import format_prediction
    assert format_prediction(1, "Siamese_cat", 0.123) == \
        "1: class = Siamese_cat          with probability = 12.3 %"
    assert imagenet_names()[284] == "Siamese_cat" and imagenet_names()[287] == "lynx"


def test_inference_without_model_uses_the_published_weights_cache(files, tmp_path, monkeypatch):
    """No --model: the published weights, read from megengine.hub's cache (pre-placed here:
    this machine is offline), with ImageNet names."""
    import shutil
    from engine.models import pretrained_cache_path

    monkeypatch.setenv("MGE_HOME", str(tmp_path / "mge"))
    cached = pretrained_cache_path("resnet18")
    os.makedirs(os.path.dirname(cached))
    shutil.copy(files["official1000"], cached)
    # the stand-in is not the published file, so its sha256 does not match the name's digits
    rc, out, err = run_tool("inference.py", "-i", files["cat"], "--topk", 2,
                            env={"MGE_HOME": str(tmp_path / "mge"),
                                 "ENGINE_SKIP_WEIGHTS_HASH": "1"})
    assert rc == 0, err
    ref = run_tool("inference.py", "-m", files["official1000"], "-i", files["cat"], "--topk", 2)
    assert out == ref[1] and len(out.splitlines()) == 2


def test_inference_errors(files, tmp_path):
    rc, out, err = run_tool("inference.py", "-m", files["engine"], "-i", tmp_path / "no.jpg")
    assert_user_error(rc, out, err, "no such file", "no.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg at all")
    rc, out, err = run_tool("inference.py", "-m", files["engine"], "-i", junk)
    assert_user_error(rc, out, err, "cannot decode", "junk.jpg")
    rc, out, err = run_tool("inference.py", "-a", "resnet50", "-m", files["engine"], "-i",
                            files["cat"])
    assert_user_error(rc, out, err, "resnet18 checkpoint but --arch is resnet50")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04garbage")
    rc, out, err = run_tool("inference.py", "-m", bad, "-i", files["cat"])
    assert_user_error(rc, out, err, "cannot read checkpoint")


def test_preprocess_matches_official_resize_and_crop(files):
    from engine.inference import preprocess

    img = cv2.imread(files["cat"])                 # 300 x 451 (h x w)
    x = preprocess(files["cat"], 224)
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.uint8
    h, w = img.shape[:2]
    tw = int(256 * w / h)
    ref = cv2.resize(img, (tw, 256), interpolation=cv2.INTER_LINEAR)
    x0 = int(round((tw - 224) / 2.0))
    y0 = int(round((256 - 224) / 2.0))
    np.testing.assert_array_equal(x[0].transpose(1, 2, 0), ref[y0:y0 + 224, x0:x0 + 224])


# ------------------------------------------------------------------------------ train.py

@pytest.mark.slow
def test_train_tool_end_to_end_then_resume(files, tmp_path):
    root = make_imagenet(str(tmp_path / "inet"), classes=2, train=4, val=1)
    save = tmp_path / "run"
    common = ["-d", root, "-b", 4, "--image-size", 32, "-j", 0, "--epochs", 2, "--no-progress",
              "-p", 1, "--save", save]
    rc, out, err = run_tool("train.py", *common, "--max-steps", 1)
    assert rc == 0, err
    assert "done: 1 steps" in out and (save / "checkpoint.pkl").exists()
    rc, out, err = run_tool("train.py", *common, "--resume", save, "--no-trace")
    assert rc == 0, err
    assert "done: 4 steps" in out and "top1" in out
    rc, out, err = run_tool("test.py", "-d", root, "-m", save / "checkpoint.pkl",
                            "--image-size", 32, "-j", 0, "--no-progress")
    assert rc == 0 and TOP.search(out.strip().splitlines()[-1]), err


# ------------------------------------------------- train.py on bad input: one line, exit 2

@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny packed ImageNet (2 classes, 4 train / 1 val image each) to damage per test."""
    from engine.data.pack import pack_imagenet

    d = tmp_path_factory.mktemp("packed")
    raw = make_imagenet(str(d / "raw"), classes=2, train=4, val=1)
    out = str(d / "packed")
    pack_imagenet(raw, out, workers=1, shard_size=2, progress=False, log=lambda *a: None)
    return out


def _copy(packed, tmp_path):
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(packed, dst)
    return dst


TRAIN_ARGS = ["-b", 2, "--image-size", 32, "-j", 0, "--no-progress", "--max-steps", 1]


def _meta_missing(train):  # what an interrupted pack leaves: shards without meta.json
    (train / "meta.json").unlink()


def _meta_v99(train):
    import json

    meta = json.loads((train / "meta.json").read_text())
    (train / "meta.json").write_text(json.dumps(dict(meta, version=99)))


def _meta_not_json(train):
    (train / "meta.json").write_text('{"format": "engine-lmdb-shards", "vers')


@pytest.mark.parametrize("damage, needles", [
    (_meta_missing, ["meta.json", "incomplete", "pack_imagenet"]),
    (_meta_v99, ["version 99"]),
    (_meta_not_json, ["not valid JSON"]),
])
def test_train_damaged_meta_is_one_line(packed, tmp_path, damage, needles):
    data = _copy(packed, tmp_path)
    damage(data / "train")
    rc, out, err = run_tool("train.py", "-d", data, "--save", tmp_path / "o", *TRAIN_ARGS)
    assert_user_error(rc, out, err, str(data / "train"), *needles)


def test_train_garbage_shard_is_one_line(packed, tmp_path):
    data = _copy(packed, tmp_path)
    shards = sorted((data / "train").glob("shard-*.lmdb"))
    for shard in shards:  # every shard, so that the first batch surely reads one
        shard.write_bytes(np.random.default_rng(0).integers(0, 256, 64 << 10, np.uint8).tobytes())
    rc, out, err = run_tool("train.py", "-d", data, "--save", tmp_path / "o", *TRAIN_ARGS)
    assert_user_error(rc, out, err, "shard-0000")


def test_train_unknown_arch_fails_before_touching_data(tmp_path):
    # the data folder does not even exist: --arch is checked first, and the message lists names
    rc, out, err = run_tool("train.py", "-d", tmp_path / "nowhere", "--arch", "nosuch",
                            *TRAIN_ARGS)
    assert_user_error(rc, out, err, "--arch nosuch", "resnet50")


def test_train_multi_node_with_localhost_is_refused(tmp_path):
    rc, out, err = run_tool("train.py", "-d", tmp_path, "--num-nodes", 2, "--node-rank", 1,
                            "--master-ip", "localhost", "--master-port", 29500, *TRAIN_ARGS)
    assert_user_error(rc, out, err, "loopback")


@pytest.mark.slow
def test_train_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """The checkpoint write fails part-way (a file size limit stands in for a full disk: the
    OS refuses the write the same way); the previous checkpoint stays, the message names it."""
    import resource
    import signal

    root = make_imagenet(str(tmp_path / "inet"), classes=2, train=2, val=1)
    save = tmp_path / "run"
    common = ["-d", root, "--save", save, "-b", 2, "--image-size", 32, "-j", 0, "--no-progress",
              "--no-eval", "--epochs", 3]
    rc, out, err = run_tool("train.py", *common, "--max-steps", 1)
    assert rc == 0, err
    before = (save / "checkpoint.pkl").read_bytes()

    def limit():  # inherited by the tool: writes past 4 MB fail with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    p = subprocess.run([sys.executable, os.path.join(TOOLS, "train.py"),
                        *map(str, common + ["--max-steps", 2, "--resume", save])],
                       capture_output=True, text=True,
                       timeout=300, cwd=ROOT, preexec_fn=limit)
    assert_user_error(p.returncode, p.stdout, p.stderr, "cannot write",
                      str(save / "checkpoint.pkl"), "previous checkpoint")
    assert (save / "checkpoint.pkl").read_bytes() == before
    assert not [f for f in os.listdir(save) if f.startswith(".tmp-")]


@pytest.mark.slow
def test_train_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C lets the step finish, saves it and says so (and how to continue): one line when
    it arrives, one when the run has stopped, exit 130, no traceback."""
    import signal
    import time

    root = make_imagenet(str(tmp_path / "inet"), classes=2, train=4, val=1)
    save = tmp_path / "run"
    args = ["-d", root, "--save", save, "-b", 2, "--image-size", 32, "-j", 0, "--no-progress",
            "-p", 1, "--epochs", 1000, "--no-trace"]
    p = subprocess.Popen([sys.executable, os.path.join(TOOLS, "train.py"), *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True)
    try:
        metrics = save / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and '"train"' in metrics.read_text()):  # under way
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    # (MegEngine's own "info:" banner about running without CUDA, and the fail-early check's
    # note, precede it)
    lines = [l for l in err.splitlines() if l.strip()
             and not l.startswith(("info:", "debug:", "fail-early check:"))]
    assert len(lines) == 2 and lines[0].startswith("SIGINT: stopping after the current step")
    from engine.models.weights import read_file

    step = read_file(str(save / "checkpoint.pkl"))["step"]
    assert lines[1] == ("interrupted (Ctrl-C) after step %d: saved %s; rerun the same command "
                        "to continue (exit status 130)" % (step, save / "checkpoint.pkl"))


def test_every_tool_reports_user_errors_and_ctrl_c_the_same_way():
    """engine.errors.run_tool: one `error:` line and 2, Ctrl-C one line and 130, else the
    body's status; a bug keeps its traceback."""
    from engine.errors import ConfigError, run_tool

    def interrupted():
        raise KeyboardInterrupt

    def bug():
        raise ZeroDivisionError("a bug")

    assert run_tool(lambda: None) == 0 and run_tool(lambda: 3) == 3
    assert run_tool(lambda: (_ for _ in ()).throw(ConfigError("bad\nvalue"))) == 2
    assert run_tool(interrupted, interrupted="stopped; rerun") == 130
    with pytest.raises(ZeroDivisionError):
        run_tool(bug)


@pytest.mark.parametrize("tool", ["train.py", "test.py", "inference.py", "pack_imagenet.py",
                                  "verify_pack.py", "stage_shards.py"])
def test_tools_use_the_shared_error_handling(tool):
    src = open(os.path.join(ROOT, "engine", "tools", tool)).read()
    assert "run_tool(" in src and "except UserError" not in src
