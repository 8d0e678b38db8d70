"""engine.models must be a drop-in for MegEngine's official ResNet: same keys, shapes, outputs.

The oracle is data recorded once from the official model.py (tests/data/README.md says how):
its state-dict key/shape table for every architecture, and its outputs for seeded weights.
"""
import hashlib
import json
import math
import os
import pickle
import time
import zlib
from typing import Dict, Mapping, Sequence

import numpy as np
import pytest

import megengine as mge
import megengine.hub.hub as mge_hub
import megengine.module as M

import engine.models as models
from engine.errors import UserError
from engine.models import hub
from engine.models import weights as weights_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")

HEAVY = {"resnet101", "resnet152", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2"}

#: The seed of the weights behind official_resnet_outputs.npz.
REFERENCE_SEED = 20240


def official_table(name: str) -> Dict[str, tuple]:
    """The official model's state-dict keys (in order) and shapes, as recorded."""
    with open(os.path.join(DATA, "official_resnet_keys.json")) as f:
        rows = json.load(f)["archs"][name]
    return {key: tuple(shape) for key, shape in rows}


def seeded_state(shapes: Mapping[str, Sequence[int]], seed: int) -> Dict[str, np.ndarray]:
    """Deterministic weights, entry by entry from (seed, key) alone; see tests/data/README.md.

    Non-trivial BN statistics and affine parameters, so a wrongly wired BN cannot go unnoticed.
    """
    state = {}
    for key, shape in shapes.items():
        shape = tuple(shape)
        rng = np.random.RandomState([seed, zlib.crc32(key.encode("utf-8"))])
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_var":
            v = rng.uniform(0.5, 2.0, shape)
        elif leaf in ("running_mean", "bias"):
            v = rng.normal(0.0, 0.1, shape)
        elif len(shape) == 1:  # BN scale
            v = rng.uniform(0.5, 1.5, shape)
        else:  # conv (4-D, or 5-D grouped) and fc weights: He-normal over the fan-in
            fan_in = int(np.prod(shape[-3:])) if len(shape) >= 4 else shape[-1]
            v = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
        state[key] = v.astype(np.float32)
    return state


@pytest.fixture
def no_init(monkeypatch):
    """Skip weight init: the key/shape checks need structure only, and init dominates build time."""
    for fn in ("msra_normal_", "msra_uniform_", "uniform_", "ones_", "zeros_"):
        monkeypatch.setattr(M.init, fn, lambda *a, **k: None)


def shapes(module: M.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_var=True).items()}


def randomized_state(module: M.Module, seed: int = 0) -> dict:
    """Seeded weights for `module`'s own keys (e.g. with a 10-class fc)."""
    return seeded_state(shapes(module), seed)


# ------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    "name", [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in models.ARCHS]
)
def test_keys_and_shapes_equal_official(name, no_init):
    ours, theirs = shapes(models.get_model(name)), official_table(name)
    assert list(ours) == list(theirs)  # same keys in the same order
    assert ours == theirs


def test_reference_table_covers_every_arch():
    with open(os.path.join(DATA, "official_resnet_keys.json")) as f:
        assert tuple(json.load(f)["archs"]) == models.ARCHS
    # the counts documented for the published weights
    for name, entries, elements in [("resnet18", 102, 11_699_112), ("resnet50", 267, 25_610_152),
                                    ("resnext50_32x4d", 267, 25_097_128)]:
        table = official_table(name)
        assert len(table) == entries and sum(int(np.prod(s)) for s in table.values()) == elements


def test_layout_details_of_official_weights(no_init):
    s18 = shapes(models.resnet18())
    assert "layer1.0.downsample.0.weight" not in s18  # M.Identity: no keys
    assert s18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert s18["layer2.0.downsample.1.running_var"] == (128,)  # 1-D BN tensors
    assert not any("num_batches_tracked" in k for k in s18)
    s50 = shapes(models.resnet50())
    assert s50["layer2.0.conv2.weight"][:2] == (128, 128)  # stride on the 3x3 ("v1.5")
    sx = shapes(models.resnext50_32x4d())
    assert sx["layer1.0.conv2.weight"] == (32, 4, 4, 3, 3)  # grouped conv is 5-D
    assert len(sx) == 267


def test_arch_names_and_unknown_name():
    assert models.ARCHS == (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
    )
    for name in models.ARCHS:
        assert callable(getattr(models, name))
    with pytest.raises(ValueError) as exc:
        models.get_model("resnet19")
    assert "resnet19" in str(exc.value) and "resnext50_32x4d" in str(exc.value)
    with pytest.raises(ValueError, match="groups"):
        models.get_model("resnext50_32x4d", groups=8)
    # config/CLI spellings
    assert models.get_model(" ResNet18 ", num_classes=2).fc.weight.shape == (2, 512)
    assert models.get_model("resnext50-32x4d", num_classes=2).fc.weight.shape == (2, 2048)


# ---------------------------------------------------------------------------------------- init


def test_official_initialisation():
    m = models.resnet18(num_classes=10)
    sd = m.state_dict()
    assert sd["fc.weight"].shape == (10, 512)
    assert np.all(sd["bn1.weight"] == 1) and np.all(sd["bn1.bias"] == 0)
    assert np.all(sd["layer1.0.bn2.weight"] == 1)
    w = sd["layer3.0.conv2.weight"]  # msra_normal fan_out: std = sqrt(2 / (256*3*3))
    assert abs(w.std() / np.sqrt(2.0 / (256 * 9)) - 1) < 0.05
    fc_bound = 1 / np.sqrt(512)  # msra_uniform a=sqrt(5) == U(+-1/sqrt(fan_in))
    assert np.abs(sd["fc.weight"]).max() <= fc_bound + 1e-6

    z = models.resnet18(zero_init_residual=True).state_dict()
    assert all(np.all(z["layer%d.%d.bn2.weight" % (i, j)] == 0) for i in range(1, 5) for j in range(2))
    assert np.all(z["layer1.0.bn1.weight"] == 1)
    zb = models.get_model("resnet50", zero_init_residual=True).state_dict()
    assert np.all(zb["layer4.2.bn3.weight"] == 0) and np.all(zb["layer4.2.bn2.weight"] == 1)


# ------------------------------------------------------------------------------ official weights


@pytest.mark.parametrize("dump", ["megengine", "pickle"])
def test_pickled_official_state_dict_loads_strict(tmp_path, dump):
    """A bare state dict in the official layout (the recorded table), as mge.save writes the
    published files, loads with MegEngine's own strict load_state_dict and with load_weights."""
    state = seeded_state(official_table("resnet18"), seed=7)
    path = str(tmp_path / "weights.pkl")
    if dump == "megengine":
        mge.save(state, path)
        state = mge.load(path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
        with open(path, "rb") as f:
            state = pickle.load(f)
    assert all(isinstance(v, np.ndarray) for v in state.values())  # a bare state dict

    ours = models.resnet18()
    ours.load_state_dict(state, strict=True)
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(v, state[k])

    fresh = models.resnet18()
    assert models.load_weights(fresh, weights_mod.read_file(path)) == ([], [], [])
    np.testing.assert_array_equal(fresh.state_dict()["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])


def _reference(tag: str) -> Dict[str, np.ndarray]:
    with np.load(os.path.join(DATA, "official_resnet_outputs.npz")) as data:
        return {k[len(tag) + 1:]: data[k] for k in data.files if k.startswith(tag + "_")}


def _close(got: np.ndarray, expect: np.ndarray) -> None:
    assert got.shape == expect.shape
    scale = float(np.abs(expect).max())
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_eval_features_and_logits_equal_official_at_64(name):
    ref = _reference("%s_64" % name)
    ours = models.get_model(name)
    ours.load_state_dict(seeded_state(official_table(name), REFERENCE_SEED), strict=True)
    ours.eval()
    x = mge.tensor(ref["input"])
    _close(ours.extract_features(x)["res5"].numpy(), ref["res5"])
    _close(ours(x).numpy(), ref["logits"])


def test_eval_logits_equal_official_forward_at_224():
    """At 224 px the adaptive pool is the official avg_pool2d(x, 7): the official forward as is."""
    ref = _reference("resnet18_224")
    ours = models.resnet18()
    ours.load_state_dict(seeded_state(official_table("resnet18"), REFERENCE_SEED), strict=True)
    ours.eval()
    x = np.repeat(np.repeat(ref["input28"], 8, axis=2), 8, axis=3)
    assert x.shape == (1, 3, 224, 224)
    _close(ours(mge.tensor(x)).numpy(), ref["logits"])


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("resnet18", 64), ("resnext50_32x4d", 64), ("resnet34", 96)])
def test_small_inputs_pool_globally(name, size):
    m = models.get_model(name, num_classes=7)
    m.eval()
    x = mge.tensor(np.random.default_rng(0).normal(size=(2, 3, size, size)).astype("float32"))
    out = m(x).numpy()
    assert out.shape == (2, 7) and np.all(np.isfinite(out))
    res5 = m.extract_features(x)["res5"].numpy()
    pooled = res5.mean(axis=(2, 3))
    w, b = m.fc.weight.numpy(), m.fc.bias.numpy()
    np.testing.assert_allclose(out, pooled @ w.T + b.reshape(-1), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ pretrained=True


def test_cache_path_matches_megengine_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("MGE_HOME", str(tmp_path / "mge"))
    expected_names = {
        "resnet18": "009607_resnet18_naiveaug_70312_78a63ca6.pkl",
        "resnet50": "928d77_resnet50_fbaug_76254_4e14b7d1.pkl",
        "resnext101_32x8d": "d3d065_resnext101_32x8d_fbaug_79520_80efb344.pkl",
    }
    for name in models.PRETRAINED_FILES:
        url = models.pretrained_url(name)
        assert url == "https://data.megengine.org.cn/models/weights/" + models.PRETRAINED_FILES[name]
        digest = hashlib.sha256(url.encode()).hexdigest()[:6]
        hub_path = os.path.join(mge_hub._get_megengine_home(), "serialized", digest + "_" + os.path.basename(url))
        assert models.pretrained_cache_path(name) == hub_path
        if name in expected_names:
            assert os.path.basename(hub_path) == expected_names[name]
    monkeypatch.delenv("MGE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.pretrained_cache_path("resnet18").startswith(str(tmp_path / "xdg" / "megengine" / "serialized"))


def _offline(monkeypatch, tmp_path):
    """Cache in tmp_path; any download attempt hits a closed local port (never the real server)."""
    monkeypatch.setenv("MGE_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "WEIGHTS_URL_BASE", "http://127.0.0.1:9/models/weights/")
    monkeypatch.setattr(hub, "DOWNLOAD_TIMEOUT_S", 2.0)


def _publish_as(monkeypatch, arch: str, data: bytes) -> str:
    """Pretend `data` is the published file of `arch`: a name that carries its sha256 prefix."""
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(hub.PRETRAINED_FILES, arch, "%s_test_%s.pkl" % (arch, digest[:8]))
    path = models.pretrained_cache_path(arch)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_pretrained_loads_preplaced_cache_file(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    src = models.resnet18()
    state = randomized_state(src, seed=3)
    _publish_as(monkeypatch, "resnet18", pickle.dumps(state))
    m = models.resnet18(pretrained=True)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    m2 = models.get_model("resnet18", pretrained=True)
    np.testing.assert_array_equal(m2.state_dict()["fc.weight"], state["fc.weight"])


def test_pretrained_without_file_fails_fast_with_path(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as exc:
        models.resnet18(pretrained=True)
    assert time.monotonic() - start < 10
    msg = str(exc.value)
    path = models.pretrained_cache_path("resnet18")
    assert path in msg and path.startswith(str(tmp_path))
    assert "resnet18_naiveaug_70312_78a63ca6.pkl" in msg
    serialized = os.path.dirname(path)
    # nothing but the node lock file: no partial or temp file a later run could trust
    assert [f for f in os.listdir(serialized) if not f.endswith(".lock")] == []


def test_pretrained_cache_file_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    """A truncated/foreign file under the published name is not trusted: it is downloaded again,
    and offline that fails with a message naming the mismatch and the path."""
    _offline(monkeypatch, tmp_path)
    path = models.pretrained_cache_path("resnet18")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"truncated")
    with pytest.raises(RuntimeError) as exc:
        models.resnet18(pretrained=True)
    msg = str(exc.value)
    assert "sha256" in msg and "78a63ca6" in msg and path in msg


def test_pretrained_unreadable_file_with_right_hash_says_delete(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    _publish_as(monkeypatch, "resnet18", b"not a pickle at all")
    with pytest.raises(RuntimeError, match="delete it"):
        models.resnet18(pretrained=True)


@pytest.mark.parametrize("name", ["wide_resnet50_2", "wide_resnet101_2"])
def test_wide_has_no_pretrained_weights(name):
    with pytest.raises(ValueError, match="no published"):
        models.get_model(name, pretrained=True)


# ---------------------------------------------------------------------------------- load_weights


def test_load_weights_accepts_checkpoint_wrappers_and_old_layouts():
    src = models.resnet18()
    state = randomized_state(src, seed=5)
    for wrapped in ({"state_dict": state, "epoch": 3}, {"model": state, "arch": "resnet18"}):
        m = models.resnet18()
        models.load_weights(m, wrapped)
        np.testing.assert_array_equal(m.state_dict()["bn1.running_mean"], state["bn1.running_mean"])
    old = dict(state)
    old["bn1.weight"] = state["bn1.weight"].reshape(1, -1, 1, 1)  # MegEngine 0.x BN layout
    old["fc.weight"] = state["fc.weight"].astype(np.float16)
    old["conv1.weight"] = mge.tensor(state["conv1.weight"])
    m = models.resnet18()
    models.load_weights(m, old)
    sd = m.state_dict()
    np.testing.assert_array_equal(sd["bn1.weight"], state["bn1.weight"])
    assert sd["fc.weight"].dtype == np.float32  # not silently switched to float16


def test_load_weights_class_count_mismatch_is_named_and_atomic():
    state = models.resnet18().state_dict()
    m = models.resnet18(num_classes=10)
    before = m.state_dict()
    with pytest.raises(ValueError) as exc:
        models.load_weights(m, state, source="ckpt.pkl")
    msg = str(exc.value)
    assert isinstance(exc.value, UserError) and "\n" not in msg  # the tools print it as is
    assert "ckpt.pkl" in msg and "fc.weight" in msg
    assert "1000 classes" in msg and "num_classes=10" in msg
    after = m.state_dict()
    for k in before:  # nothing was loaded before the error
        np.testing.assert_array_equal(after[k], before[k])

    result = models.load_weights(m, state, strict=False)  # fine-tuning: keep the new fc
    assert sorted(result.mismatched) == ["fc.bias", "fc.weight"]
    np.testing.assert_array_equal(m.state_dict()["conv1.weight"], state["conv1.weight"])
    np.testing.assert_array_equal(m.state_dict()["fc.weight"], before["fc.weight"])


def test_load_weights_other_architecture_is_named(no_init):
    state = {k: np.zeros(s, np.float32) for k, s in shapes(models.resnet34()).items()}
    with pytest.raises(ValueError) as exc:
        models.load_weights(models.resnet18(), state)
    msg = str(exc.value)
    assert "another architecture" in msg and "resnet34" in msg and "resnet18" in msg
    assert "unexpected" in msg and "layer1.2." in msg

    xstate = {k: np.zeros(s, np.float32) for k, s in shapes(models.resnext50_32x4d()).items()}
    with pytest.raises(ValueError, match="resnext50_32x4d"):
        models.load_weights(models.resnet50(), xstate)

    prefixed = {"module." + k: v for k, v in shapes(models.resnet18()).items()}
    with pytest.raises(ValueError, match="module"):
        models.load_weights(models.resnet18(), {k: np.zeros(s, np.float32) for k, s in prefixed.items()})


def test_one_list_of_architectures_and_one_normalization():
    """engine.models.ARCHS names every constructor the package exports, and nothing else does;
    the steps normalize with the models' mean and std."""
    from engine import steps
    from engine.models import resnet

    constructors = [n for n in resnet.__all__ if n not in ("BasicBlock", "Bottleneck", "ResNet", "get_model")]
    assert tuple(constructors) == models.ARCHS
    assert all(callable(getattr(models, a)) for a in models.ARCHS)
    assert steps.MEAN_BGR is models.MEAN_BGR and steps.STD_BGR is models.STD_BGR


# ------------------------------------------------------------------------------------------ hub


def test_hubconf_exposes_constructors():
    """megengine.hub imports hubconf.py with megengine.hub.tools.load_module; do the same."""
    from megengine.hub.tools import load_module

    hubconf = load_module("hubconf", os.path.join(ROOT, "hubconf.py"))
    for name in models.ARCHS + ("ResNet", "BasicBlock", "Bottleneck"):
        assert callable(getattr(hubconf, name)), name
    assert hubconf.resnet18 is models.resnet18
    assert set(hubconf.dependencies) <= {"megengine", "numpy"}
    m = hubconf.resnet18(num_classes=3)
    assert m.fc.weight.shape == (3, 512)
