"""Readers check what they trust: a shard swapped for another, another split's meta.json, an
Environment the caller holds, a broken optional package and an unwritable MegEngine cache are
each refused with one true line. Each runs in a subprocess with a deadline: a crash, a hang or
a run that trains on the wrong images is the failure."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, make_imagenet
from engine.data import shards
from engine.data.pack import pack_imagenet
from engine.data.stage import StageError, stage

TOOLS = os.path.join(ROOT, "tools")
DEADLINE = 300  # a tool run is seconds; a hang or a run that trains on is the failure
TRAIN_ARGS = ["-b", "2", "--image-size", "32", "-j", "0", "--no-progress", "--max-steps", "1"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """train: 18 records in shards of 4, 4, 4, 4, 2; val: 6 records in shards of 4, 2."""
    raw = make_imagenet(str(tmp_path_factory.mktemp("raw") / "r"), classes=3, train=6, val=2)
    out = tmp_path_factory.mktemp("packed") / "p"
    pack_imagenet(raw, str(out), workers=0, shard_size=4, progress=False, log=lambda *a: None)
    return out


@pytest.fixture
def data(packed, tmp_path):
    """A private copy of the pack to damage."""
    dst = tmp_path / "p"
    shutil.copytree(packed, dst)
    return dst


def env_with(path_first=None, **extra):
    """This environment, the worktree first on PYTHONPATH (after `path_first`), with `extra`
    set (a value of None unsets it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(([path_first] if path_first else []) +
                                                      [ROOT]))
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(cmd, env=None, timeout=DEADLINE):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or env_with())


def tool(name, *args, env=None):
    return run([sys.executable, os.path.join(TOOLS, name), *map(str, args)], env=env)


def one_error_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# A child that reads a whole split through the real Loader; exit 3 with the message on a
# refusal, 0 with the record count read otherwise.
READ = """
import sys
from engine.data import Loader, shards
split, workers = sys.argv[1], int(sys.argv[2])
try:
    with Loader(split, batch_size=2, train=False, image_size=32, workers=workers) as ld:
        n = sum(len(y) for _, y in ld)
except shards.ShardError as exc:
    print("refused:", exc)
    sys.exit(3)
print("read", n)
"""


def read_split(split, workers=0, prelude=""):
    return run([sys.executable, "-c", prelude + READ, str(split), str(workers)])


def swap_in_val_shard(data):
    """val's first shard (4 records) copied over train's third (4 records): the same count."""
    victim = data / "train" / "shard-00002.lmdb"
    meta = shards.read_meta(str(data / "train"))
    assert meta["shards"][2]["num_samples"] == 4
    shutil.copyfile(data / "val" / "shard-00000.lmdb", victim)
    assert os.path.getsize(victim) != meta["shards"][2]["size"]
    return victim


# ------------------------------------------------------------ 4: a shard replaced by another

def test_intact_split_reads_whole(data):
    r = read_split(data / "train")
    assert r.returncode == 0 and "read 18" in r.stdout, (r.stdout, r.stderr)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_swapped_shard_of_the_same_count_is_refused_by_the_loader(data, workers):
    swap_in_val_shard(data)
    r = read_split(data / "train", workers)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "shard-00002.lmdb is" in r.stdout and "but meta.json records" in r.stdout
    assert "stage it again" in r.stdout and "repack" in r.stdout


def test_a_shard_swapped_after_the_split_was_opened_is_refused_by_the_workers(data):
    """Workers open shards themselves, after the fork: each checks a shard when it opens it."""
    code = """
import shutil, sys
from engine.data import Loader, shards
train, val = sys.argv[1], sys.argv[2]
ld = Loader(train, batch_size=2, train=False, image_size=32, workers=2)
shutil.copyfile(val + "/shard-00000.lmdb", train + "/shard-00002.lmdb")
try:
    n = sum(len(y) for _, y in ld)
except Exception as exc:
    print("refused:", type(exc).__name__, exc)
    sys.exit(3)
finally:
    ld.close()
print("read", n)
"""
    r = run([sys.executable, "-c", code, str(data / "train"), str(data / "val")])
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "shard-00002.lmdb is" in r.stdout and "but meta.json records" in r.stdout


def test_train_on_a_swapped_shard_exits_2_instead_of_training(data, tmp_path):
    swap_in_val_shard(data)
    r = tool("train.py", "-d", data, "--save", tmp_path / "run", *TRAIN_ARGS)
    one_error_line(r, str(data / "train" / "shard-00002.lmdb"), "but meta.json records")
    assert not (tmp_path / "run" / "checkpoint.pkl").exists()


def test_a_pack_without_recorded_sizes_still_reads_and_is_checked_by_its_header(data):
    """Packs written before meta.json recorded sizes: nothing to compare the size with, so the
    record count in each shard's LMDB header is compared with meta.json instead."""
    meta_path = data / "train" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for e in meta["shards"]:
        del e["size"], e["checksum"]
    meta_path.write_text(json.dumps(meta))
    assert read_split(data / "train").stdout.strip() == "read 18"
    shutil.copyfile(data / "val" / "shard-00001.lmdb", data / "train" / "shard-00001.lmdb")
    r = read_split(data / "train")
    assert r.returncode == 3 and "shard-00001.lmdb holds 2 records, but meta.json says 4" \
        in r.stdout, (r.stdout, r.stderr)


# --------------------------------------------------------- 5: a meta.json of another split

def test_val_meta_in_train_is_refused_naming_both(data):
    shutil.copyfile(data / "val" / "meta.json", data / "train" / "meta.json")
    r = read_split(data / "train")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "train/meta.json is the val split's (6 records in 2 shards), not train's" in r.stdout


def test_train_with_val_meta_in_train_exits_2_instead_of_training_on_val(data, tmp_path):
    shutil.copyfile(data / "val" / "meta.json", data / "train" / "meta.json")
    r = tool("train.py", "-d", data, "--save", tmp_path / "run", *TRAIN_ARGS)
    one_error_line(r, "the val split's", "not train's")
    r = tool("verify_pack.py", data / "train", "--fast")  # the verifier agrees
    assert r.returncode == 2 and "the val split's" in r.stdout, r.stdout


def test_another_splits_meta_in_a_folder_of_any_name_is_refused_by_its_shard_list(data,
                                                                                  tmp_path):
    """A staged copy may have any name; val's meta.json there leaves train's shards unlisted."""
    local = tmp_path / "imagenet-train-local"
    shutil.copytree(data / "train", local)
    shutil.copyfile(data / "val" / "meta.json", local / "meta.json")
    r = read_split(local)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "holds 3 shard file(s) its meta.json (split 'val'" in r.stdout
    assert "does not list, e.g. shard-00002.lmdb" in r.stdout


def test_a_meta_json_listing_files_outside_its_folder_is_refused(data):
    meta_path = data / "train" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["shards"][0]["file"] = "../val/shard-00000.lmdb"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(shards.ShardError, match="not a plain file name of its folder"):
        shards.Split(str(data / "train"))


def test_stage_agrees_with_the_readers(data, tmp_path):
    """The stager refuses to put a split into a folder named after another one, and removes a
    shard an earlier, bigger copy left, which the readers would otherwise refuse."""
    with pytest.raises(StageError, match="stage it into a folder named val"):
        stage(str(data / "val"), str(tmp_path / "local" / "train"), log=lambda *a: None)
    dst = tmp_path / "local" / "val"
    shutil.copytree(data / "train", dst)  # an older copy with more shards
    os.remove(dst / "meta.json")
    stage(str(data / "val"), str(dst), log=lambda *a: None)
    assert sorted(f for f in os.listdir(dst) if f.endswith(".lmdb")) == \
        ["shard-00000.lmdb", "shard-00001.lmdb"]
    assert read_split(dst).stdout.strip() == "read 6"


# ------------------------------------------------------------ 6: an Environment the caller holds

HOLD = """
import lmdb
held = lmdb.open(sys.argv[1] + "/shard-00001.lmdb", subdir=False, readonly=True, lock=False)
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_an_environment_the_caller_holds_is_explained_truly(data, workers):
    r = read_split(data / "train", workers, prelude="import sys\n" + HOLD)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "shard-00001.lmdb is already open in this process" in r.stdout
    assert "the data is fine" in r.stdout and "Close that Environment" in r.stdout
    assert "repack" not in r.stdout and "stage it again" not in r.stdout


def test_two_paths_to_one_shard_file_share_an_environment(data, tmp_path):
    """A hard-linked copy of a split read beside the original in one process: py-lmdb guards
    files, not paths, so the reader's cache must key on the file too."""
    linked = tmp_path / "linked" / "train"
    linked.mkdir(parents=True)
    for f in os.listdir(data / "train"):
        os.link(data / "train" / f, linked / f)
    code = """
import sys
from engine.data import shards
a, b = shards.Split(sys.argv[1]), shards.Split(sys.argv[2])
assert [a.get(i) for i in range(len(a))] == [b.get(i) for i in range(len(b))]
print("same", len(a))
"""
    r = run([sys.executable, "-c", code, str(data / "train"), str(linked)])
    assert r.returncode == 0 and "same 18" in r.stdout, (r.stdout, r.stderr)


# ------------------------------------------------------- 10: an optional package that is broken

def test_a_tensorboardx_that_fails_on_import_is_one_line(data, tmp_path):
    broken = tmp_path / "site" / "tensorboardX"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise TypeError("Descriptors cannot be created directly.\\nIf this call came from a '
        '_pb2.py file, your generated code is out of date")\n')
    env = env_with(str(tmp_path / "site"))
    r = tool("train.py", "-d", data, "--save", tmp_path / "run", *TRAIN_ARGS, "--tensorboard",
             env=env)
    one_error_line(r, "tensorboardX is installed and fails on import (TypeError: Descriptors "
                      "cannot be created directly. If this call", "without --tensorboard")
    r = tool("train.py", "-d", data, "--save", tmp_path / "run2", *TRAIN_ARGS, env=env)
    assert r.returncode == 0, r.stderr  # not asked for: the broken package is never imported


# ---------------------------------------------------------- 11: MegEngine's own cache folder

@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


def test_mge_home_below_a_regular_file_is_one_line_naming_the_variable(a_file, tmp_path):
    image = tmp_path / "x.jpg"
    r = tool("inference.py", "-i", image, env=env_with(MGE_HOME=str(a_file / "mge")))
    one_error_line(r, "MegEngine cannot create its kernel cache in %s" % (a_file / "mge"),
                   "a part of that path is a file", "set MGE_HOME to a writable folder")
    r = tool("test.py", "-d", tmp_path, env=env_with(MGE_HOME=None, XDG_CACHE_HOME=str(a_file)))
    one_error_line(r, "under XDG_CACHE_HOME, as MGE_HOME is unset",
                   "set MGE_HOME to a writable folder")
    r = tool("test.py", "--help", env=env_with(MGE_HOME=str(a_file)))
    assert r.returncode == 0 and "usage:" in r.stdout  # help needs no MegEngine


def test_mge_home_only_matters_to_the_tools_that_import_megengine(a_file, data):
    env = env_with(MGE_HOME=str(a_file))
    r = tool("verify_pack.py", data, "--fast", env=env)
    assert r.returncode == 0, r.stderr
    r = tool("inference.py", "-i", data / "nothing.jpg",
             env=env_with(MGE_HOME=str(a_file), MGE_FASTRUN_CACHE_TYPE="MEMORY"))
    assert "kernel cache" not in r.stderr and "--image" in r.stderr, r.stderr


def test_a_read_only_mge_home_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a folder of mode 0o555, and no read-only file system is "
                    "at hand; the path-below-a-file test covers the same check")
    home = tmp_path / "ro"
    home.mkdir()
    home.chmod(0o555)
    try:
        r = tool("inference.py", "-i", tmp_path / "x.jpg", env=env_with(MGE_HOME=str(home)))
    finally:
        home.chmod(0o755)
    one_error_line(r, "permission denied", "set MGE_HOME to a writable folder")
