#!/usr/bin/env python3
"""Loader throughput, side by side on the same JPEGs with the same worker count:
(a) the engine Loader from LMDB shards, (b) the engine Loader from the raw folder, (c) the seed
pipeline (megengine.data.DataLoader + ImageFolder (cv2) + RandomResizedCrop, RandomHorizontalFlip,
Normalize, ToMode("CHW")), and (d) the decode ceiling: one process's full-decode rate (TurboJPEG,
default exact IDCT, no crop or resize) x workers; the same with the fast IDCT, which the engine's
training crops use, is shown too. Each configuration runs --seconds per repeat, the ceilings are
measured in every repeat, interleaved with the loaders; medians are reported."""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_data_args, finish, image_files, log, rate, read_all, sample_data  # noqa: E402

from engine.data import Loader  # noqa: E402

MEAN = [103.530, 116.280, 123.675]
STD = [57.375, 57.120, 58.395]


def measure(batches, seconds: float, batch_size: int) -> float:
    """img/s over `seconds` of steady state (the first batch, i.e. start-up, excluded)."""
    it = iter(batches)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = next(it)[0]
        n += len(x)
    return n / (time.perf_counter() - t0)


def forever(loader):
    while True:
        for b in loader:
            yield b


def seed_pipeline(train_dir: str, batch_size: int, image_size: int, workers: int):
    from megengine.data import DataLoader, Infinite, RandomSampler
    from megengine.data import transform as T
    from megengine.data.dataset import ImageFolder

    ds = ImageFolder(train_dir)
    sampler = Infinite(RandomSampler(ds, batch_size=batch_size, drop_last=True))
    tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                    T.Normalize(mean=MEAN, std=STD), T.ToMode("CHW")])
    return DataLoader(ds, sampler=sampler, transform=tf, num_workers=workers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=8.0, help="per configuration and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-seed", action="store_true", help="skip the MegEngine seed pipeline")
    p.add_argument("--no-roi", action="store_true", help="engine rows without the ROI decoder")
    a = p.parse_args(argv)
    raw, packed = sample_data(a.data, a.packed)
    train_raw, train_packed = os.path.join(raw, "train"), os.path.join(packed, "train")

    from turbojpeg import TJFLAG_FASTDCT, TJPF_BGR, TurboJPEG

    blobs = read_all(image_files(train_raw)[:600])
    tj = TurboJPEG()

    def decode_all(flags):
        def run():
            for b in blobs:
                tj.decode(b, pixel_format=TJPF_BGR, flags=flags)
            return len(blobs)
        return run

    kw = dict(batch_size=a.batch_size, train=True, image_size=a.image_size, workers=a.workers,
              use_roi=not a.no_roi)
    engine = Loader(train_packed, **kw)
    engine_raw = Loader(train_raw, **kw)
    configs = [("engine, LMDB shards", forever(engine)), ("engine, raw folder", forever(engine_raw))]
    if not a.no_seed:
        configs.append(("seed: megengine DataLoader", iter(seed_pipeline(
            train_raw, a.batch_size, a.image_size, a.workers))))
    got = {name: [] for name, _ in configs}
    exact, fast = [], []
    for r in range(a.repeats):
        exact.append(rate(decode_all(0), repeats=1, min_seconds=1.0)[0])
        fast.append(rate(decode_all(TJFLAG_FASTDCT), repeats=1, min_seconds=1.0)[0])
        log("repeat %d full decode, 1 process: %.0f img/s (fast IDCT %.0f)" % (r, exact[-1], fast[-1]))
        for name, batches in configs:
            got[name].append(measure(batches, a.seconds, a.batch_size))
            log("repeat %d %-28s %.0f img/s" % (r, name, got[name][-1]))
    engine.close()
    engine_raw.close()
    ceiling = statistics.median(exact) * a.workers
    ceiling_fast = statistics.median(fast) * a.workers
    med = {k: statistics.median(v) for k, v in got.items()}
    e, er = med["engine, LMDB shards"], med["engine, raw folder"]
    s = med.get("seed: megengine DataLoader")
    rows = [(k, v, "%.2f" % (v / ceiling), "%.2f" % (v / s) if s else "-") for k, v in med.items()]
    rows.append(("decode ceiling (1 core x %d)" % a.workers, ceiling, "1.00",
                 "%.2f" % (ceiling / s) if s else "-"))
    rows.append(("  same, fast IDCT", ceiling_fast, "%.2f" % (ceiling_fast / ceiling),
                 "%.2f" % (ceiling_fast / s) if s else "-"))
    decoder = "ROI (engine.data._jpegroi)" if engine.roi else "PyTurboJPEG (full decode + crop)"
    finish(rows, ["%d workers, batch %d, %d px" % (a.workers, a.batch_size, a.image_size),
                  "img/s (median)", "x ceiling", "x seed"],
           {"engine_img_s": round(e, 1), "engine_raw_img_s": round(er, 1),
            "seed_img_s": round(s, 1) if s else None,
            "decode_ceiling_img_s": round(ceiling, 1),
            "decode_ceiling_fast_idct_img_s": round(ceiling_fast, 1), "workers": a.workers,
            "batch_size": a.batch_size, "image_size": a.image_size, "decoder": decoder},
           "bench_loader: %s (engine decoder: %s)" % (raw, decoder))
    os._exit(0)  # the seed DataLoader's infinite sampler keeps worker threads alive


if __name__ == "__main__":
    main()
