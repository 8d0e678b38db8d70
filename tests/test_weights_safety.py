"""Weight files and checkpoints are unpickled with an allow-list: a file that would run code is
refused with a one-line UserError naming the global, and every real format still loads.

"Real" means written by the code that writes them: megengine.save of state dicts (numpy values,
and Tensors/Parameters with keep_var=True), the official train.py's {"epoch", "state_dict"},
and engine.checkpoint.write with a real optimizer and GradScaler state.
"""
import datetime
import io
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

import megengine as mge
import megengine.amp as amp
import megengine.optimizer as optim
from megengine.autodiff import GradManager

from engine import checkpoint as ckpt
from engine.errors import UserError
from engine.models import get_model, load_weights
from engine.models import hub, weights
from engine.models.weights import SAFE_GLOBALS, TRUST_PICKLE_ENV, UnsafePickleError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecordingUnpickler(pickle.Unpickler):
    """A plain unpickler that notes every global a file names."""

    def __init__(self, f):
        super().__init__(f)
        self.names = set()

    def find_class(self, module, name):
        self.names.add((module, name))
        return super().find_class(module, name)


def globals_named(path: str) -> set:
    with open(path, "rb") as f:
        u = RecordingUnpickler(f)
        u.load()
    return u.names


class RunsCommand:
    """What a hostile weight file holds: unpickling it calls os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, ("touch %s" % self.marker,)


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)


@pytest.fixture(scope="module")
def trained():
    """resnet18 (3 classes) after one real SGD step with AMP's scaler: optimizer state has
    momentum buffers, the scaler its state."""
    mge.random.seed(0)
    model = get_model("resnet18", num_classes=3)
    gm = GradManager().attach(model.parameters())
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = amp.GradScaler()
    x = mge.tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32))
    with gm:
        loss = model(x).mean()
        gm.backward(loss)
    opt.step().clear_grad()
    return model, opt, scaler


def engine_checkpoint(model, opt, scaler) -> dict:
    """Every entry the trainer writes (engine/loop.py), version 2, with an EMA."""
    return {
        "format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 17, "steps_per_epoch": 8,
        "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": {"decay": 0.999, "warmup": True, "updates": 17,
                "state_dict": OrderedDict(model.state_dict())},
        "config": {"arch": "resnet18", "num_classes": 3, "classes": ["a", "b", "c"],
                   "image_size": 32, "dtr": None, "learning_rate": 0.1, "amp": True},
        "metrics": {"best_top1": np.float64(33.3)},
    }


# ---------------------------------------------------------------------------- refused files


def test_a_file_that_runs_a_command_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"state_dict": {"fc.weight": RunsCommand(str(marker))}}))
    for load in (weights.read_file, ckpt.read, weights.read, weights.unpickle):
        with pytest.raises(UnsafePickleError) as info:
            load(str(path))
        msg = str(info.value)
        assert isinstance(info.value, UserError) and "\n" not in msg
        assert "%s.system" % os.system.__module__ in msg  # the global, as the file names it
        assert str(path) in msg and TRUST_PICKLE_ENV in msg and "trusted=True" in msg
    assert not marker.exists()


def test_load_model_refuses_it_too(tmp_path):
    from engine.models import load_model

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(RunsCommand(str(marker)), protocol=2))
    with pytest.raises(UserError, match="refusing to load .*system"):
        load_model("resnet18", str(path))
    assert not marker.exists()


def test_a_url_is_refused_after_download(tmp_path, monkeypatch):
    """--model URL: the fetched file goes through the same allow-list."""
    monkeypatch.setenv("MGE_HOME", str(tmp_path / "home"))
    marker = tmp_path / "ran"
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps(RunsCommand(str(marker))))
    with pytest.raises(UnsafePickleError, match="system"):
        weights.read(src.as_uri())
    assert not marker.exists()


def test_the_inference_tool_prints_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(RunsCommand(str(marker))))
    image = tmp_path / "x.png"
    import cv2

    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    env = {k: v for k, v in os.environ.items() if k != TRUST_PICKLE_ENV}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inference.py"), "-m", str(path),
                        "-i", str(image)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "refusing to load" in errors[0] and "system" in errors[0], p.stderr
    assert "Traceback" not in p.stderr and not marker.exists()


def test_trust_pickle_flag_of_the_tools_opts_out(tmp_path):
    """--trust-pickle: a file naming a global off the list (a harmless Counter here) is
    refused without the flag and unpickled with it (it then fails later, as a non-model)."""
    from collections import Counter

    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps({"state_dict": {"fc.weight": Counter(a=1)}}))
    image = tmp_path / "x.png"
    import cv2

    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    env = {k: v for k, v in os.environ.items() if k != TRUST_PICKLE_ENV}
    run = lambda *flags: subprocess.run(  # noqa: E731
        [sys.executable, os.path.join(ROOT, "tools", "inference.py"), "-m", str(path), "-i",
         str(image), *flags], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    refused, trusted = run(), run("--trust-pickle")
    assert refused.returncode == 2 and "refusing to load" in refused.stderr
    assert "--trust-pickle" in refused.stderr
    assert "refusing to load" not in trusted.stderr and "Traceback" not in trusted.stderr


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_protocol_is_checked(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([1, RunsCommand(str(marker))], protocol=protocol))
    with pytest.raises(UnsafePickleError, match="system"):
        weights.read_file(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("payload,named", [
    (b"c__builtin__\neval\n(S'1+1'\ntR.", "__builtin__.eval"),  # protocol 0, Python 2 name
    (b"cbuiltins\ngetattr\n(cbuiltins\nset\nS'add'\ntR.", "builtins.getattr"),
    (b"\x80\x02cbuiltins\nexec\nq\x00.", "builtins.exec"),
    (b"\x80\x04\x8c\x02os\x94\x8c\x05popen\x94\x93\x94.", "os.popen"),  # STACK_GLOBAL
])
def test_other_callables_are_named(tmp_path, payload, named):
    path = tmp_path / "x.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError) as info:
        weights.read_file(str(path))
    assert named in str(info.value)


def test_hidden_inside_an_object_array_or_a_persistent_id(tmp_path):
    marker = tmp_path / "ran"
    arr = np.empty(1, dtype=object)
    arr[0] = RunsCommand(str(marker))
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps({"w": arr}))
    with pytest.raises(UnsafePickleError, match="system"):
        weights.read_file(str(path))

    class PersistentPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "x" if isinstance(obj, str) and obj == "ref" else None

    buf = io.BytesIO()
    PersistentPickler(buf).dump({"w": "ref"})
    path.write_bytes(buf.getvalue())
    with pytest.raises(UnsafePickleError, match="persistent"):
        weights.read_file(str(path))
    assert not marker.exists()


# ---------------------------------------------------------------------------- trusted opt-out


def test_trusted_files_load_with_the_flag_or_the_env_var(tmp_path, monkeypatch):
    """A global outside the allow-list (harmless here) loads only when the caller trusts it."""
    path = tmp_path / "dated.pkl"
    path.write_bytes(pickle.dumps({"when": datetime.date(2020, 3, 12)}))
    with pytest.raises(UnsafePickleError, match="datetime.date"):
        weights.read_file(str(path))
    assert weights.read_file(str(path), trusted=True)["when"] == datetime.date(2020, 3, 12)
    assert weights.read(str(path), trusted=True)["when"].year == 2020
    monkeypatch.setenv(TRUST_PICKLE_ENV, "1")
    assert weights.read_file(str(path))["when"].month == 3
    with pytest.raises(UnsafePickleError):  # an explicit False beats the environment
        weights.read_file(str(path), trusted=False)


# ---------------------------------------------------------------------------- real files load


def test_allow_list_covers_what_megengine_and_the_engine_write(tmp_path, trained):
    model, opt, scaler = trained
    files = {"bare": str(tmp_path / "bare.pkl"), "keep_var": str(tmp_path / "vars.pkl"),
             "optimizer": str(tmp_path / "opt.pkl"), "official_train": str(tmp_path / "train.pkl")}
    mge.save(model.state_dict(), files["bare"])
    mge.save(model.state_dict(keep_var=True), files["keep_var"])
    mge.save(opt.state_dict(), files["optimizer"])
    mge.save({"epoch": 90, "state_dict": model.state_dict()}, files["official_train"])
    files["engine"] = ckpt.dump(engine_checkpoint(model, opt, scaler),
                                           str(tmp_path / "engine.pkl"))
    named = set()
    for path in files.values():
        named |= globals_named(path)
    assert named <= SAFE_GLOBALS, named - SAFE_GLOBALS
    # the tensor reconstruction really is what MegEngine writes
    assert {("megengine.tensor", "Parameter"), ("collections", "OrderedDict")} <= named


def test_tensors_come_back_as_megengine_load_returns_them(tmp_path, trained):
    model = trained[0]
    path = str(tmp_path / "vars.pkl")
    mixed = {"p": model.fc.weight, "t": mge.tensor([1, 2], dtype="int32"),
             "h": mge.tensor([0.5], dtype="float16"), "n": np.arange(3)}
    mge.save(mixed, path)
    ours, theirs = weights.unpickle(path), mge.load(path)
    assert type(ours["p"]) is type(theirs["p"]) is mge.Parameter
    for k in mixed:
        assert type(ours[k]) is type(theirs[k])
        np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]))
        assert ours[k].dtype == theirs[k].dtype
        if k != "n":
            assert ours[k].device == theirs[k].device


def test_official_bare_and_train_formats_load_into_the_model(tmp_path, trained):
    model = trained[0]
    sd = model.state_dict()
    bare = str(tmp_path / "bare.pkl")
    mge.save(sd, bare)
    train = str(tmp_path / "train.pkl")
    mge.save({"epoch": 90, "state_dict": sd}, train)
    keep_var = str(tmp_path / "vars.pkl")
    mge.save(model.state_dict(keep_var=True), keep_var)
    for path in (bare, train, keep_var):
        fresh = get_model("resnet18", num_classes=3)
        assert load_weights(fresh, weights.read_file(path)) == ([], [], [])
        for k, v in fresh.state_dict().items():
            np.testing.assert_array_equal(v, sd[k])


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_engine_checkpoint_resumes_optimizer_and_scaler(tmp_path, trained, protocol):
    """As the trainer writes it (highest protocol), and as older Pythons or other writers
    would (protocols 0-4): weights, optimizer, scaler and EMA state restore."""
    model, opt, scaler = trained
    path = str(tmp_path / "engine.pkl")
    if protocol == pickle.HIGHEST_PROTOCOL:
        ckpt.dump(engine_checkpoint(model, opt, scaler), path)
    else:
        with open(path, "wb") as f:
            pickle.dump(ckpt._to_host(engine_checkpoint(model, opt, scaler)), f, protocol=protocol)
    state = weights.read_file(path)
    assert state["format"] == ckpt.FORMAT and state["version"] == ckpt.VERSION
    saved = ckpt.read(path)  # what a resume reads
    assert saved.ema["updates"] == 17 and isinstance(saved.ema["state_dict"], OrderedDict)
    assert isinstance(saved.model, OrderedDict)
    fresh = get_model("resnet18", num_classes=3)
    fresh_opt = optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    fresh_scaler = amp.GradScaler()
    saved.restore(fresh, fresh_opt, fresh_scaler)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v, model.state_dict()[k])
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for i, buffers in want["state"].items():
        np.testing.assert_array_equal(got["state"][i]["momentum_buffer"], buffers["momentum_buffer"])
    assert fresh_scaler.state_dict() == scaler.state_dict()
    assert saved.metrics["best_top1"] == 33.3 and (saved.step, saved.steps_per_epoch) == (17, 8)


def test_published_weights_path_reads_safely(tmp_path, monkeypatch):
    """pretrained=True reads the (hash-checked) cache file with the allow-list too."""
    import hashlib

    monkeypatch.setenv("MGE_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "WEIGHTS_URL_BASE", "http://127.0.0.1:9/models/weights/")
    data = pickle.dumps({"x": RunsCommand(str(tmp_path / "ran"))})
    monkeypatch.setitem(hub.PRETRAINED_FILES, "resnet18",
                        "resnet18_test_%s.pkl" % hashlib.sha256(data).hexdigest()[:8])
    path = hub.pretrained_cache_path("resnet18")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(UnsafePickleError, match="system"):
        get_model("resnet18", pretrained=True)
    assert not (tmp_path / "ran").exists()
