"""Loader: exact val pixels vs the seed pipeline, determinism across worker counts, resume,
rank sharding, faults (corrupt records, dead workers, Ctrl-C), and no leaks."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import psutil
import pytest

from helpers import ROOT, jpeg_bytes, make_imagenet, photo_bgr, write
from engine.data import Loader, shards
from engine.data.decode import roi_available
from engine.data.pack import pack_imagenet
from engine.data.sampler import Sampler


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A raw tiny ImageNet (varied sizes) and its packed twin."""
    root = str(tmp_path_factory.mktemp("data") / "raw")
    make_imagenet(root, classes=3, train=10, val=4)
    # sizes that exercise the DCT scale choice and the val resize/crop rounding
    cat = photo_bgr("chelsea")
    write(os.path.join(root, "train", "n00001000", "big.JPEG"),
          jpeg_bytes(cv2.resize(cat, (1200, 900), interpolation=cv2.INTER_CUBIC)))
    write(os.path.join(root, "val", "n00001001", "odd.JPEG"), jpeg_bytes(cat[:333, :257]))
    write(os.path.join(root, "val", "n00001002", "big.JPEG"),
          jpeg_bytes(cv2.resize(cat, (1000, 750), interpolation=cv2.INTER_CUBIC), quality=80))
    out = str(tmp_path_factory.mktemp("data") / "packed")
    pack_imagenet(root, out, workers=1, shard_size=7, progress=False, log=lambda *a: None)
    return root, out


def collect(loader, n=None):
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x.copy(), y.copy()))
        if n is not None and i + 1 == n:
            break
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


def test_val_pixels_match_the_seed_pipeline(data):
    """cv2 decode + megengine Resize(256) + CenterCrop(224): within 1 grey level per image."""
    from megengine.data import transform as T

    raw, packed = data
    seed_tf = T.Compose([T.Resize(256), T.CenterCrop(224)])
    files = sorted(os.path.relpath(os.path.join(d, f), os.path.join(raw, "val"))
                   for d, _, fs in os.walk(os.path.join(raw, "val")) for f in fs)
    loader = Loader(os.path.join(packed, "val"), batch_size=5, train=False, workers=0)
    got = np.concatenate([x.copy() for x, _ in loader])
    assert got.shape == (len(files), 3, 224, 224)
    for img, rel in zip(got, files):
        ref = seed_tf.apply(cv2.imread(os.path.join(raw, "val", rel), cv2.IMREAD_COLOR))
        diff = np.abs(img.transpose(1, 2, 0).astype(int) - ref.astype(int))
        assert diff.mean() <= 1.0, (rel, diff.mean())


def test_raw_folder_and_shards_give_the_same_val_batches(data):
    raw, packed = data
    a = collect(Loader(os.path.join(raw, "val"), batch_size=4, train=False, workers=0))
    b = collect(Loader(os.path.join(packed, "val"), batch_size=4, train=False, workers=2))
    assert_same(a, b)
    assert len(a) == 4 and len(a[-1][1]) == 2  # 14 images: no drop for val


def test_batches_identical_for_any_worker_count(data):
    _, packed = data
    runs = []
    for w in (0, 1, 2):
        with Loader(os.path.join(packed, "train"), batch_size=4, train=True, workers=w,
                    seed=7, image_size=64) as ld:
            runs.append(collect(ld) + collect(ld))  # two epochs
    assert_same(runs[0], runs[1])
    assert_same(runs[0], runs[2])
    # epochs differ, labels are a permutation of the split, images are real (not blank)
    e0, e1 = runs[0][:len(runs[0]) // 2], runs[0][len(runs[0]) // 2:]
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(e0, e1))
    assert all(x.std() > 10 for x, _ in runs[0])


def test_train_crops_are_random_resized_and_flipped(data):
    _, packed = data
    ld = Loader(os.path.join(packed, "train"), batch_size=31, train=True, workers=0, seed=1,
                image_size=96)
    (x, y), = collect(ld, 1)
    assert x.shape == (31, 3, 96, 96) and x.dtype == np.uint8 and y.dtype == np.int32
    ld2 = Loader(os.path.join(packed, "train"), batch_size=31, train=True, workers=0, seed=2,
                 image_size=96)
    (x2, y2), = collect(ld2, 1)
    assert not np.array_equal(x, x2)


@pytest.mark.skipif(not roi_available(), reason="ROI decoder not built")
def test_roi_decoding_matches_full_decode_then_crop(data):
    _, packed = data
    a = collect(Loader(os.path.join(packed, "train"), batch_size=8, train=True, workers=0,
                       use_roi=True))
    b = collect(Loader(os.path.join(packed, "train"), batch_size=8, train=True, workers=0,
                       use_roi=False))
    assert_same(a, b)


def test_resume_mid_epoch_gives_the_same_following_batches(data):
    _, packed = data
    kw = dict(batch_size=3, train=True, workers=2, seed=3, image_size=48)
    with Loader(os.path.join(packed, "train"), **kw) as ld:
        straight = collect(ld) + collect(ld)
    per_epoch = len(straight) // 2
    with Loader(os.path.join(packed, "train"), **kw) as ld:
        collect(ld)  # epoch 0
        head = collect(ld, 4)  # 4 batches into epoch 1, then "crash"
        state = ld.state_dict()
    assert state == {"epoch": 1, "position": 4}
    assert_same(head, straight[per_epoch:per_epoch + 4])
    with Loader(os.path.join(packed, "train"), **dict(kw, workers=1)) as resumed:
        resumed.load_state_dict(json.loads(json.dumps(state)))
        tail = collect(resumed)
        assert resumed.state_dict() == {"epoch": 2, "position": 0}
    assert_same(tail, straight[per_epoch + 4:])


def test_ranks_are_disjoint_and_equal_in_length():
    """Training shares: equal lengths (a rank with fewer batches would hang the allreduce),
    everything covered, and the only repeats are the first records of the order, wrapped."""
    for n, world, bs, drop in [(103, 4, 5, True), (103, 4, 5, False), (10, 3, 2, False),
                               (100, 4, 5, True)]:
        samplers = [Sampler(n, bs, True, seed=1, rank=r, world_size=world, drop_last=drop)
                    for r in range(world)]
        lens = {len(s) for s in samplers}
        assert len(lens) == 1
        idx = [s.indices(5) for s in samplers]
        assert len({len(i) for i in idx}) == 1
        allidx = np.concatenate(idx)
        assert set(allidx) == set(range(n))  # everything covered
        pad = len(allidx) - n
        assert pad == (-n) % world
        values, counts = np.unique(allidx, return_counts=True)
        order = np.random.default_rng([1, 5]).permutation(n)
        assert sorted(values[counts > 1]) == sorted(order[:pad])


def test_loader_rank_shares(data):
    _, packed = data
    got = []
    for r in range(3):
        ld = Loader(os.path.join(packed, "val"), batch_size=2, train=False, workers=0, rank=r,
                    world_size=3)
        got.append(collect(ld))
    labels = [np.concatenate([y for _, y in g]) for g in got]
    # val shares are exact: 14 records split 4/5/5, none counted twice
    assert [len(l) for l in labels] == [4, 5, 5]


def test_corrupt_record_is_replaced_counted_and_warned(data, tmp_path):
    raw, _ = data
    src = tmp_path / "raw" / "train"
    for cls in ("n00001000", "n00001001"):
        os.makedirs(src / cls)
    good = jpeg_bytes(photo_bgr("coffee")[:300, :400])
    write(str(src / "n00001000" / "a.JPEG"), good)
    write(str(src / "n00001000" / "b.JPEG"), good[: len(good) // 2])  # truncated
    write(str(src / "n00001001" / "c.JPEG"), b"not a jpeg at all")
    write(str(src / "n00001001" / "d.JPEG"), good)
    for w in (0, 2):
        ld = Loader(str(src), batch_size=4, train=False, workers=w)
        with pytest.warns(RuntimeWarning, match="b.JPEG"):
            (x, y), = collect(ld)
        assert ld.num_replaced == 3  # b failed, then c (its stand-in), then c in its own slot
        # b is replaced by c (also bad), then d; c by d: labels follow the replacements
        assert list(y) == [0, 1, 1, 1]
        np.testing.assert_array_equal(x[1], x[3])


def test_errors_for_missing_incomplete_and_unknown_splits(data, tmp_path):
    _, packed = data
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Loader(str(tmp_path / "nope"), batch_size=2, train=False)
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(os.path.join(packed, "val"), bad)
    os.remove(bad / "meta.json")
    with pytest.raises(shards.ShardError, match="incomplete"):
        Loader(str(bad), batch_size=2, train=False)
    meta = json.load(open(os.path.join(packed, "val", "meta.json")))
    meta["version"] = 99
    json.dump(meta, open(bad / "meta.json", "w"))
    with pytest.raises(shards.ShardError, match="version 99"):
        Loader(str(bad), batch_size=2, train=False)


def _shm():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_killed_worker_raises_instead_of_hanging(data):
    _, packed = data
    ld = Loader(os.path.join(packed, "train"), batch_size=2, train=True, workers=2, image_size=32)
    next(iter(ld))
    victim = ld._procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    t0 = time.time()
    with pytest.raises(RuntimeError, match=r"worker 1 .*exited unexpectedly with code -9"):
        while time.time() - t0 < 30:  # whichever batch or epoch it is, it must surface
            for _ in ld:
                pass
    assert time.time() - t0 < 10
    assert not ld._procs and all(not p.is_alive() for p in [victim])


def test_no_shared_memory_or_processes_left_after_an_exception(data):
    _, packed = data
    before = _shm()
    me = psutil.Process()
    with pytest.raises(ZeroDivisionError):
        with Loader(os.path.join(packed, "train"), batch_size=2, train=True, workers=2,
                    image_size=32) as ld:
            for i, _ in enumerate(ld):
                if i == 1:
                    1 / 0
    assert _shm() == before
    time.sleep(0.2)
    assert not [c for c in me.children() if c.name().startswith("python") and
                "engine-loader" in " ".join(c.cmdline())]
    assert not ld._procs


def test_ctrl_c_stops_cleanly(data):
    _, packed = data
    script = textwrap.dedent("""
        import sys; sys.path.insert(0, %r)
        from engine.data import Loader
        ld = Loader(%r, batch_size=2, train=True, workers=2, image_size=32)
        print("ready", flush=True)
        while True:
            for batch in ld:
                pass
    """ % (ROOT, os.path.join(packed, "train")))
    before = _shm()
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    kids = psutil.Process(p.pid).children(recursive=True)
    assert len(kids) == 2
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole group
    _, err = p.communicate(timeout=20)
    assert "KeyboardInterrupt" in err
    psutil.wait_procs(kids, timeout=5)
    assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    assert _shm() == before


def test_memory_stays_flat_over_epochs(data):
    _, packed = data
    ld = Loader(os.path.join(packed, "train"), batch_size=4, train=True, workers=2, image_size=64)
    procs = lambda: [psutil.Process()] + [psutil.Process(p.pid) for p in ld._procs]
    rss = []
    for epoch in range(8):
        for _ in ld:
            pass
        rss.append([p.memory_info().rss for p in procs()])
    ld.close()
    growth = np.array(rss[-1]) - np.array(rss[2])
    assert (growth < 8 * 2**20).all(), growth
    # shared memory is slots x batch bytes
    assert ld.slots == 4


@pytest.mark.parametrize("use_roi", [True, False])
def test_dct_scaled_window_matches_the_scaled_full_decode(use_roi):
    """Both decode paths agree with TurboJPEG's own scaled decode, at every fast scale."""
    from turbojpeg import TJFLAG_FASTDCT, TJPF_BGR, TurboJPEG

    from engine.data.decode import decode_crop, scaled_dim

    if use_roi and not roi_available():
        pytest.skip("ROI decoder not built")
    img = cv2.resize(photo_bgr("astronaut"), (1000, 760), interpolation=cv2.INTER_AREA)
    data = jpeg_bytes(img)
    for fast_dct in (False, True):
        for num, den in [(8, 8), (4, 8), (2, 8), (1, 8)]:
            full = TurboJPEG().decode(data, pixel_format=TJPF_BGR,
                                      scaling_factor=None if num == 8 else (1, den // num),
                                      flags=TJFLAG_FASTDCT if fast_dct else 0)
            assert full.shape[:2] == (scaled_dim(760, num), scaled_dim(1000, num))
            x0, y0, w, h = 3 * num, 5 * num, 40 * num, 30 * num
            got = decode_crop(data, num, x0, y0, w, h, use_roi=use_roi, fast_dct=fast_dct)
            np.testing.assert_array_equal(got, full[y0:y0 + h, x0:x0 + w])
    exact = decode_crop(data, 8, 0, 0, 1000, 760, use_roi=use_roi).astype(int)
    fast = decode_crop(data, 8, 0, 0, 1000, 760, use_roi=use_roi, fast_dct=True).astype(int)
    assert 0 < np.abs(exact - fast).mean() < 1.0  # a different IDCT, visually the same


def test_workers_never_inherit_an_open_environment(data):
    """A split already open in this process (another loader, a verifier) still loads in
    workers, which open their own environments, and stays readable here afterwards."""
    import lmdb

    _, packed = data
    split = shards.Split(os.path.join(packed, "train"))
    first = split.get(0)
    inline = collect(Loader(os.path.join(packed, "train"), batch_size=4, train=True,
                            workers=0, image_size=32))
    with Loader(os.path.join(packed, "train"), batch_size=4, train=True, workers=2,
                image_size=32) as ld:
        assert_same(collect(ld), inline)
        assert not shards._ENVS  # closed before the fork; only the workers read since
    assert split.get(0) == first
    with pytest.raises(lmdb.Error, match="already open"):  # py-lmdb's guard is still there
        lmdb.open(split.files[0], subdir=False, readonly=True, lock=False)
