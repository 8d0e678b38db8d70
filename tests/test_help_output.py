"""What the tools print: train.py --help in sections, each default shown once, bool flags named
by the flag in effect (no --no-no-...), and no MegEngine CUDA-probing lines or numpy subnormal
warnings on a CPU machine unless ENGINE_VERBOSE=1."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import make_imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("train.py", "test.py", "inference.py", "pack_imagenet.py", "verify_pack.py",
         "stage_shards.py", "make_sample_imagenet.py", "demo.py", "gpu_check.py")
SECTIONS = ("data", "model", "optimisation", "schedule", "modern recipe",
            "precision and compile", "checkpoints", "distributed", "logging")
NOISE = re.compile(r"^(debug: failed to load cuda func|info: \+)|smallest subnormal", re.M)


def run(args, env=None, timeout=300):
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def helps():
    out = {}
    for tool in TOOLS:
        rc, text, err = run([os.path.join("tools", tool), "--help"], timeout=120)
        assert rc == 0, (tool, err)
        out[tool] = text
    return out


def test_train_help_is_in_sections_in_order(helps):
    text = helps["train.py"]
    heads = [line[:-1] for line in text.splitlines() if re.match(r"^[a-z][a-z ]+:$", line)]
    assert heads == ["options"] + list(SECTIONS), heads  # no "other options": all are grouped
    section = text.split("\nmodern recipe:\n")[1].split("\n\n")[0]
    assert "--config RECIPE" in section and "--ema-decay" in section


def test_every_train_option_is_in_a_section():
    from engine.cli import help_groups, is_option
    from engine.config import TrainConfig

    grouped = [n for _, names in help_groups(TrainConfig) for n in names]
    assert len(grouped) == len(set(grouped))
    options = {f.name for f in dataclasses.fields(TrainConfig) if is_option(f)}
    assert options == set(grouped)  # --config is the `recipe` field's flag


@pytest.mark.parametrize("tool", TOOLS)
def test_no_default_is_printed_twice_and_bools_name_their_flag(helps, tool):
    text = helps[tool]
    assert "--no-no-" not in text
    assert not re.search(r"\(default: (True|False|None)\)", " ".join(text.split())), tool
    entries = re.split(r"\n(?=  \S)", text.split("\noptions:\n", 1)[1])
    assert len(entries) > 1
    for entry in entries:
        assert len(re.findall(r"\bdefault\b", entry)) <= 1, entry


def test_bool_flags_read_right(helps):
    text = " ".join(helps["train.py"].split())
    assert "--no-wd-norm-bias, --wd-norm-bias no weight decay on BatchNorm parameters and " \
           "biases (default: --wd-norm-bias)" in text
    assert "--amp, --no-amp" in text and "(default: --no-amp)" in text
    test_help = " ".join(helps["test.py"].split())
    assert re.search(r"--progress, --no-progress [^()]*\(default: --progress\)", test_help)


def test_the_no_x_switch_and_its_opposite(tmp_path):
    from engine.config import config_from_argv

    assert config_from_argv(["-d", "D"]).no_wd_norm_bias is False
    assert config_from_argv(["-d", "D", "--no-wd-norm-bias"]).no_wd_norm_bias is True
    assert config_from_argv(["-d", "D", "--no-wd-norm-bias", "--wd-norm-bias"]
                            ).no_wd_norm_bias is False
    # a recipe turns it on; the opposite flag turns it off again
    assert config_from_argv(["-d", "D", "--config", "fast_resnet18_16ep"]).no_wd_norm_bias
    assert not config_from_argv(["-d", "D", "--config", "fast_resnet18_16ep",
                                 "--wd-norm-bias"]).no_wd_norm_bias
    with pytest.raises(SystemExit):
        config_from_argv(["-d", "D", "--no-no-wd-norm-bias"])


# -------------------------------------------------------------------------- quiet by default

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import megengine as mge
    from engine.checkpoint import dump
    from engine.models import get_model

    d = tmp_path_factory.mktemp("quiet")
    root = make_imagenet(str(d / "inet"), classes=3, train=1, val=2)
    mge.random.seed(0)
    return root, dump(get_model("resnet18", num_classes=3).state_dict(), str(d / "bare3.pkl"))


def test_megengine_tools_print_no_cuda_probing_on_cpu(weights):
    root, pkl = weights
    rc, out, err = run(["tools/gpu_check.py", "--no-bench"])
    assert rc == 0, err
    assert not NOISE.search(out + err), err
    rc, out, err = run(["tools/test.py", "-d", root, "-m", pkl, "--image-size", "32",
                        "--no-progress", "-j", "0"])
    assert rc == 0, err
    assert not NOISE.search(out + err), err
    assert "top1" in out


def test_engine_verbose_shows_what_megengine_prints(weights):
    root, pkl = weights
    cmd = ["tools/test.py", "-d", root, "-m", pkl, "--image-size", "32", "--no-progress", "-j", "0"]
    rc, out, err = run(cmd, env={"ENGINE_VERBOSE": "1"})
    assert rc == 0, err
    quiet = run(cmd)[2]
    import megengine as mge

    if not mge.is_cuda_available():  # a CPU machine: MegEngine's CUDA stub announces itself
        assert "failed to load cuda func" in err and "info: +" in err
    assert len(err) > len(quiet)


def test_numpy_subnormal_warnings_and_other_output_of_a_tool_body():
    body = ("import sys, numpy as np\n"
            "from engine.errors import run_tool\n"
            "def body():\n"
            "    import megengine as mge\n"
            "    mge.get_device_count('gpu')\n"
            "    mge.tensor(np.ones(2, np.float32))\n"
            "    np.finfo(np.float32).smallest_subnormal\n"
            "    print('kept line', file=sys.stderr)\n"
            "    import multiprocessing as mp\n"
            "    for _ in range(2):  # the CUDA stub prints in every forked child\n"
            "        p = mp.get_context('fork').Process(target=print, args=('child line',),\n"
            "                                           kwargs={'file': sys.stderr})\n"
            "        p.start(); p.join()\n"
            "sys.exit(run_tool(body))\n")
    rc, out, err = run(["-c", body])
    assert rc == 0, err
    assert err.splitlines() == ["kept line", "child line", "child line"], err
    rc, out, err = run(["-c", body], env={"ENGINE_VERBOSE": "1"})
    assert "kept line" in err
    if "failed to load cuda func" in err:  # flush-to-zero comes with MegEngine's CPU libraries
        assert "smallest subnormal" in err


def test_a_recipe_records_its_world_size():
    from engine.config import load_recipe

    assert load_recipe("fast_resnet18_16ep")["recipe_world_size"] == 1
    assert load_recipe("fast_resnet50_16ep")["recipe_world_size"] == 8
    assert load_recipe("fast_resnet50_88ep")["recipe_world_size"] == 8
    assert load_recipe("seed_resnet50")["recipe_world_size"] is None  # not stated by its source
    with open(os.path.join(ROOT, "engine", "recipes", "fast_resnet18_16ep.json")) as f:
        assert "world_size: 1" in json.load(f)["_source"]["config_text"]
