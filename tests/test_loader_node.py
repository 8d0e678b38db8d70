"""Node-scale sizing: worker counts from affinity, cgroup quotas and loaders per node; a ring of
a few slots filled by several workers; eval loaders that hold nothing between passes."""
import dataclasses
import os

import numpy as np
import psutil
import pytest

from helpers import make_imagenet
from engine.data import Loader, LoaderOptions
from engine.data.cpus import cgroup_cpu_limit, default_workers, usable_cores
from engine.data.options import DEFAULT_SLOTS
from engine.data.pack import pack_imagenet
from engine.errors import ConfigError


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("node") / "raw")
    make_imagenet(root, classes=3, train=11, val=4)
    out = str(tmp_path_factory.mktemp("node") / "packed")
    pack_imagenet(root, out, workers=1, shard_size=5, progress=False, log=lambda *a: None)
    return out


def cgroup(tmp_path, files):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path)


def test_cgroup_v2_quota(tmp_path):
    assert cgroup_cpu_limit(cgroup(tmp_path / "a", {"cpu.max": "350000 100000\n"})) == 3.5
    assert cgroup_cpu_limit(cgroup(tmp_path / "b", {"cpu.max": "max 100000\n"})) is None
    assert cgroup_cpu_limit(str(tmp_path / "none")) is None


def test_cgroup_v1_quota(tmp_path):
    root = cgroup(tmp_path / "a", {"cpu/cpu.cfs_quota_us": "800000", "cpu/cpu.cfs_period_us":
                                   "100000"})
    assert cgroup_cpu_limit(root) == 8.0
    root = cgroup(tmp_path / "b", {"cpu,cpuacct/cpu.cfs_quota_us": "-1",
                                   "cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root) is None


def test_usable_cores_is_the_affinity_capped_by_the_quota(tmp_path):
    none = str(tmp_path / "none")
    assert usable_cores(affinity=set(range(64)), cgroup_root=none) == 64
    quota = cgroup(tmp_path / "q", {"cpu.max": "1650000 100000"})  # 16.5 CPUs
    assert usable_cores(affinity=set(range(64)), cgroup_root=quota) == 17
    assert usable_cores(affinity={0, 1, 2, 3}, cgroup_root=quota) == 4
    assert usable_cores() >= 1  # this machine, whatever it is


@pytest.mark.parametrize("cores, lws, workers", [
    (64, 1, 63), (64, 8, 7), (128, 8, 15), (16, 8, 1), (2, 1, 1), (2, 8, 1), (1, 1, 1),
])
def test_default_workers_per_rank(cores, lws, workers):
    assert default_workers(lws, cores=cores) == workers
    # a node of `cores` with lws ranks never runs more processes than cores + ranks, once
    # each rank has at least two cores
    if cores // lws >= 2:
        assert lws * (workers + 1) <= cores


def test_loader_default_workers_follow_local_world_size(packed):
    ld = Loader(os.path.join(packed, "train"), batch_size=4, train=True, local_world_size=8)
    assert ld.workers == default_workers(8) == max(1, usable_cores() // 8 - 1)
    ld1 = Loader(os.path.join(packed, "train"), batch_size=4, train=True)
    assert ld1.workers == max(1, usable_cores() - 1)


def test_shared_memory_is_slots_times_batch_bytes_whatever_the_worker_count(packed):
    for workers in (1, 3):
        with Loader(os.path.join(packed, "train"), batch_size=6, train=True, workers=workers,
                    image_size=40) as ld:
            assert ld.slots == DEFAULT_SLOTS
            batch_bytes = 6 * 3 * 40 * 40 + 6 * 4  # images + int32 labels
            assert ld.shared_memory_bytes == DEFAULT_SLOTS * batch_bytes
            next(iter(ld))
            assert len(ld._ring) == ld.shared_memory_bytes  # the one mapping behind every slot
    inline = Loader(os.path.join(packed, "train"), batch_size=6, train=True, workers=0)
    assert inline.shared_memory_bytes == 0


@pytest.mark.parametrize("train", [True, False])
def test_several_workers_filling_one_slot_give_the_batches_of_workers_0(packed, train):
    split = os.path.join(packed, "train" if train else "val")
    kw = dict(batch_size=7, train=train, image_size=48, seed=11)

    def epochs(workers, n=3):
        out = []
        with Loader(split, workers=workers, **kw) as ld:
            for _ in range(n):
                out.append([(x.copy(), y.copy()) for x, y in ld])
        return out

    ref = epochs(0)
    for workers in (2, 3, 5):  # chunks of 4, 3 and 2 samples
        got = epochs(workers)
        for e_ref, e_got in zip(ref, got):
            assert len(e_ref) == len(e_got)
            for (xa, ya), (xb, yb) in zip(e_ref, e_got):
                np.testing.assert_array_equal(ya, yb)
                np.testing.assert_array_equal(xa, xb)


def test_the_next_epoch_is_already_decoding_when_one_ends(packed):
    with Loader(os.path.join(packed, "train"), batch_size=4, train=True, workers=2,
                image_size=32) as ld:
        for _ in ld:
            pass
        assert ld.state_dict() == {"epoch": 1, "position": 0}
        ahead = sorted(ld._batches)
        assert ahead and ahead[0] == len(ld)  # epoch 1's first batches hold slots already
        assert len(ahead) == ld.slots - 1  # one slot stays with the batch the caller holds


def loader_processes():
    return [c for c in psutil.Process().children(recursive=True)
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_an_eval_loader_holds_no_processes_between_passes(packed):
    ld = Loader(os.path.join(packed, "val"), batch_size=4, train=False, workers=2,
                persistent_workers=False)
    assert not loader_processes()
    seen = 0
    first = []
    for x, y in ld:
        assert len(loader_processes()) == 2  # running during the pass
        first.append(y.copy())
        seen += len(y)
    assert seen == ld.num_samples
    assert not loader_processes() and not ld._procs  # released at its end
    second = [y.copy() for _, y in ld]  # and started again for the next pass
    assert not loader_processes()
    assert all(np.array_equal(a, b) for a, b in zip(first, second)) and len(first) == len(second)


def test_a_folder_index_scanned_once_gives_the_batches_of_the_folder(tmp_path):
    """The trainer scans a raw split once per node and hands the list to its ranks."""
    from engine.data.folder import FolderIndex, index_folder
    from engine.trainer import split_source

    root = make_imagenet(str(tmp_path / "raw"), classes=2, train=5, val=2)
    index = split_source(os.path.join(root, "train"))
    assert isinstance(index, FolderIndex) and len(index.items) == 10
    assert index == index_folder(os.path.join(root, "train"))
    kw = dict(batch_size=3, train=True, image_size=32, workers=0, seed=2, rank=1, world_size=2)
    by_path = [(x.copy(), y.copy()) for x, y in Loader(os.path.join(root, "train"), **kw)]
    by_index = [(x.copy(), y.copy()) for x, y in Loader(index, **kw)]
    assert len(by_path) == len(by_index) > 0
    for (xa, ya), (xb, yb) in zip(by_path, by_index):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    out = str(tmp_path / "packed")
    pack_imagenet(root, out, workers=0, progress=False, log=lambda *a: None)
    assert split_source(os.path.join(out, "train")) == os.path.join(out, "train")


def test_the_step_indexed_stream_is_the_epochs_back_to_back(packed):
    """stream(step): one integer is the whole position; epochs follow each other seamlessly."""
    kw = dict(batch_size=4, train=True, image_size=32, seed=4)
    with Loader(os.path.join(packed, "train"), workers=0, **kw) as ref:
        epochs = [[y.copy() for _, y in ref] for _ in range(3)]
    flat = [y for e in epochs for y in e]
    L = len(epochs[0])
    with Loader(os.path.join(packed, "train"), workers=2, **kw) as ld:
        s = ld.stream(L - 2)  # two batches before the end of epoch 0
        got = [next(s)[1].copy() for _ in range(L + 3)]
        assert ld.state_dict() == {"epoch": 2, "position": 1}
    assert all(np.array_equal(a, b) for a, b in zip(got, flat[L - 2:2 * L + 1]))
    assert ld.sampler.batch_at(L + 1)[0] == 1


def test_a_resolution_schedule_changes_size_at_epoch_boundaries_in_the_same_ring(packed):
    """Progressive resizing: each epoch's batches at its size, identical to a loader built at
    that size, with the workers and the ring (sized for the largest size) kept throughout."""
    def schedule(epoch):  # the stream decodes ahead into epoch 3 too
        return (32, 48, 40)[min(epoch, 2)]

    kw = dict(batch_size=5, train=True, seed=3)
    with Loader(os.path.join(packed, "train"), workers=2, image_size=schedule,
                max_image_size=48, **kw) as ld:
        pids = None
        got = []
        for epoch in range(3):
            got.append([(x.copy(), y.copy()) for x, y in ld])
            pids = pids or [p.pid for p in ld._procs]
            assert [p.pid for p in ld._procs] == pids  # no restart at a size change
        assert ld.shared_memory_bytes == ld.slots * 5 * (3 * 48 * 48 + 4)
    for epoch, size in enumerate((32, 48, 40)):
        with Loader(os.path.join(packed, "train"), workers=0, image_size=size, **kw) as ref:
            ref.set_epoch(epoch)
            want = [(x.copy(), y.copy()) for x, y in ref]
        assert len(want) == len(got[epoch])
        for (xa, ya), (xb, yb) in zip(want, got[epoch]):
            assert xb.shape[-1] == size
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)
    with pytest.raises(Exception, match="needs max_image_size"):
        Loader(os.path.join(packed, "train"), image_size=schedule, **kw)


def test_val_crop_ratio_sets_the_resize_before_the_center_crop(packed):
    """--val-resize-ratio: 1.0 resizes the shorter side to the crop size itself (no border
    cut off), 0.875 is the standard 224/256."""
    split = os.path.join(packed, "val")
    a = next(iter(Loader(split, batch_size=4, train=False, workers=0, image_size=64)))[0]
    b = next(iter(Loader(split, batch_size=4, train=False, workers=0, image_size=64,
                         crop_ratio=1.0)))[0]
    assert a.shape == b.shape == (4, 3, 64, 64) and not np.array_equal(a, b)


def test_options_and_keywords_set_the_same_knobs(packed):
    """LoaderOptions groups how a loader runs; its names also work as keywords, over it."""
    split = os.path.join(packed, "train")
    opts = LoaderOptions(workers=2, slots=3, persistent_workers=False, timeout=30.0,
                         use_roi=False)
    ld = Loader(split, batch_size=4, train=True, image_size=32, options=opts)
    assert (ld.workers, ld.slots, ld.persistent_workers, ld.timeout, ld.roi) == \
        (2, 3, False, 30.0, False)
    assert ld.options == opts
    kw = Loader(split, batch_size=4, train=True, image_size=32, workers=2, slots=3,
                persistent_workers=False, timeout=30.0, use_roi=False)
    assert kw.options == opts
    over = Loader(split, batch_size=4, train=True, image_size=32, options=opts, slots=5)
    assert over.slots == 5 and over.workers == 2 and opts.slots == 3  # opts itself is unchanged
    assert Loader(split, batch_size=4, train=True).options == LoaderOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.slots = 4  # type: ignore[misc]
    # the batches do not depend on how they were asked for
    a = [(x.copy(), y.copy()) for x, y in ld]
    b = [(x.copy(), y.copy()) for x, y in kw]
    assert len(a) == len(b) == len(ld) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


def test_a_bad_option_is_refused_where_it_is_built_and_an_unknown_one_is_a_type_error(packed):
    with pytest.raises(ConfigError, match="slots must be an integer >= 2"):
        LoaderOptions(slots=1)
    with pytest.raises(ConfigError, match="timeout must be > 0"):
        LoaderOptions().updated(timeout=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'prefetch'"):
        Loader(os.path.join(packed, "train"), batch_size=4, train=True, prefetch=3)
