#!/usr/bin/env python3
"""Loader throughput, side by side on the same JPEGs with the same worker count:
(a) the engine Loader from LMDB shards, (a') the same from shards packed with --restart-markers
(the same pixels; the decoder reads only a crop's pieces), (b) the engine Loader from the raw
folder, (c) the seed
pipeline (megengine.data.DataLoader + ImageFolder (cv2) + RandomResizedCrop, RandomHorizontalFlip,
Normalize, ToMode("CHW")), (d) NVIDIA DALI's CPU pipeline when it is installed (file reader,
decoders.image_random_crop with area 0.08-1 and ratio 3/4-4/3, resize, crop_mirror_normalize to
uint8 CHW with a random mirror, num_threads = workers, device_id=None), and (e) the decode
ceiling: one process's full-decode rate (TurboJPEG, default exact IDCT, no crop or resize) x
workers; the same with the fast IDCT, which the engine's training crops use, is shown too. Each
configuration runs --seconds per repeat, the ceilings are measured in every repeat, interleaved
with the loaders; medians are reported. Beside img/s, CPU time per image: summed over this
process and all its descendants (the workers; DALI's threads), counted from an idle moment with
the prefetch full to the next one after the window, so refills are included; for a ceiling, the
decoding process's own CPU time.

--cold drops the shards' pages from the page cache (posix_fadvise DONTNEED) before every
measurement and compares LMDB with OS readahead off and on (the engine's choice)."""
import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_data_args,
    finish,
    image_files,
    log,
    md_table,
    mean_file_kb,
    rate,
    ratio,
    read_all,
    restart_pack,
    sample_data,
    settle,
    show,
    tree_cpu,
    tree_pids,
)

from engine.data import Loader, shards  # noqa: E402

RST = "engine, LMDB, restart markers"


def measure(batches, seconds: float, batch_size: int) -> Tuple[float, float]:
    """(img/s, CPU ms per image) over `seconds` of steady state (the first batch, i.e.
    start-up, excluded). CPU is summed over this process and all its descendants (the
    loaders' workers; DALI's threads are this process's), from a moment the pipeline is idle
    with its prefetch full to the next such moment after the last batch: the work counted is
    then exactly the consumed batches' (other pipelines in this process sit idle meanwhile)."""
    it = iter(batches)
    next(it)
    settle()
    pids = tree_pids()
    cpu0 = tree_cpu(pids)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = next(it)[0]
        n += len(x)
    wall = time.perf_counter() - t0
    settle(pids)
    return n / wall, (tree_cpu(pids) - cpu0) / n * 1e3


def seed_pipeline(train_dir: str, batch_size: int, image_size: int, workers: int):
    from megengine.data import DataLoader, Infinite, RandomSampler
    from megengine.data import transform as T
    from megengine.data.dataset import ImageFolder

    from engine.models.specs import MEAN_BGR, STD_BGR

    ds = ImageFolder(train_dir)
    sampler = Infinite(RandomSampler(ds, batch_size=batch_size, drop_last=True))
    tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                    T.Normalize(mean=list(MEAN_BGR), std=list(STD_BGR)), T.ToMode("CHW")])
    return DataLoader(ds, sampler=sampler, transform=tf, num_workers=workers)


def dali_pipeline(train_dir: str, batch_size: int, image_size: int, workers: int, seed: int = 0):
    """DALI's CPU-only equivalent of the training transform (None when DALI is absent)."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None

    @pipeline_def(batch_size=batch_size, num_threads=workers, device_id=None, seed=seed + 1,
                  prefetch_queue_depth=2)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=train_dir, random_shuffle=True, name="files")
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.BGR,
                                               random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW",
                                          mirror=fn.random.coin_flip())
        return images, labels

    p = pipe()
    p.build()

    def batches():
        while True:
            images, labels = p.run()
            yield images.as_array(), labels.as_array()
    return batches()


def drop_cache(split_dir: str) -> None:
    """Evict a split's shard files from the page cache, as if read for the first time."""
    for name in os.listdir(split_dir):
        if name.endswith(".lmdb"):
            fd = os.open(os.path.join(split_dir, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cold_epoch(split_dir: str, readahead: bool, kw) -> float:
    """img/s of one whole epoch read from a cold page cache, readahead off or on."""
    shards.close_all_envs()
    default, shards.READAHEAD = shards.READAHEAD, readahead
    try:
        drop_cache(split_dir)
        with Loader(split_dir, **kw) as ld:
            t0, n = time.perf_counter(), 0
            for x, _ in ld:
                n += len(x)
            return n / (time.perf_counter() - t0)
    finally:
        shards.READAHEAD = default
        shards.close_all_envs()


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
    p.add_argument("--no-dali", action="store_true", help="skip DALI even when installed")
    p.add_argument("--no-restart-markers", action="store_true",
                   help="skip the row of shards packed with --restart-markers")
    p.add_argument("--cold", action="store_true",
                   help="also time whole epochs from a cold page cache, readahead off vs on")
    a = p.parse_args(argv)
    raw, packed = sample_data(a.data, a.packed, imagenet_like=a.imagenet_like)
    train_raw, train_packed = os.path.join(raw, "train"), os.path.join(packed, "train")

    from turbojpeg import TJFLAG_FASTDCT, TJPF_BGR, TurboJPEG

    files = image_files(train_raw)
    blobs = read_all(files[:600])
    tj = TurboJPEG()

    ceiling_cpu: Dict[int, List[float]] = {0: [], TJFLAG_FASTDCT: []}

    def decode_all(flags):
        def run():
            c0 = time.process_time()
            for b in blobs:
                tj.decode(b, pixel_format=TJPF_BGR, flags=flags)
            ceiling_cpu[flags].append((time.process_time() - c0) / len(blobs) * 1e3)
            return len(blobs)
        return run

    kw = dict(batch_size=a.batch_size, train=True, image_size=a.image_size, workers=a.workers,
              use_roi=not a.no_roi)
    engine = Loader(train_packed, **kw)
    engine_raw = Loader(train_raw, **kw)
    configs = [("engine, LMDB shards", engine.stream())]
    engine_rst = None
    if not a.no_restart_markers and engine.roi:
        engine_rst = Loader(os.path.join(restart_pack(raw, packed), "train"), **kw)
        configs.append((RST, engine_rst.stream()))
    configs.append(("engine, raw folder", engine_raw.stream()))
    dali = None if a.no_dali else dali_pipeline(train_raw, a.batch_size, a.image_size,
                                                   a.workers)
    if dali is not None:
        configs.append(("DALI CPU pipeline", dali))
    else:
        log("DALI not installed (pip install nvidia-dali-cuda120): no DALI row")
    if not a.no_seed:
        configs.append(("seed: megengine DataLoader", iter(seed_pipeline(
            train_raw, a.batch_size, a.image_size, a.workers))))
    got: Dict[str, List[float]] = {name: [] for name, _ in configs}
    cpu: Dict[str, List[float]] = {name: [] for name, _ in configs}
    exact, fast = [], []
    for r in range(a.repeats):
        exact.append(rate(decode_all(0), repeats=1, min_seconds=1.0)[0])
        fast.append(rate(decode_all(TJFLAG_FASTDCT), repeats=1, min_seconds=1.0)[0])
        log("repeat %d full decode, 1 process: %.0f img/s (fast IDCT %.0f)" % (r, exact[-1], fast[-1]))
        for name, batches in configs:
            img_s, ms = measure(batches, a.seconds, a.batch_size)
            got[name].append(img_s)
            cpu[name].append(ms)
            log("repeat %d %-28s %.0f img/s, %.2f CPU ms/img" % (r, name, img_s, ms))
    engine.close()
    engine_raw.close()
    if engine_rst is not None:
        engine_rst.close()
    cold = {}
    if a.cold:
        ckw = dict(kw, train=True)
        for r in range(a.repeats):
            for ra in (False, True):
                cold.setdefault(ra, []).append(cold_epoch(train_packed, ra, ckw))
                log("repeat %d cold epoch, readahead %s: %.0f img/s"
                    % (r, "on" if ra else "off", cold[ra][-1]))
    ceiling = statistics.median(exact) * a.workers
    ceiling_fast = statistics.median(fast) * a.workers
    med = {k: statistics.median(v) for k, v in got.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    ceiling_ms = statistics.median(ceiling_cpu[0])
    ceiling_fast_ms = statistics.median(ceiling_cpu[TJFLAG_FASTDCT])
    e, er = med["engine, LMDB shards"], med["engine, raw folder"]
    s = med.get("seed: megengine DataLoader")
    d = med.get("DALI CPU pipeline")

    def row(name, v, ms):
        return (name, v, ms, 1e3 / ms if ms else "-", "%.2f" % (v / ceiling),
                "%.2f" % (v / s) if s else "-", "%.2f" % (v / d) if d else "-")
    rows = [row(k, v, mcpu[k]) for k, v in med.items()]
    rows.append(row("decode ceiling (1 core x %d)" % a.workers, ceiling, ceiling_ms))
    rows.append(row("  same, fast IDCT", ceiling_fast, ceiling_fast_ms))
    for ra, rates in sorted(cold.items()):
        v = statistics.median(rates)
        rows.append(("engine, cold cache, readahead %s" % ("on" if ra else "off"), v, "-", "-",
                     "%.2f" % (v / ceiling), "-", "-"))

    def ms_of(name):
        return round(mcpu[name], 3) if name in mcpu else None
    decoder = "ROI (engine.data._jpegroi)" if engine.roi else "PyTurboJPEG (full decode + crop)"
    finish(rows, ["%d workers, batch %d, %d px" % (a.workers, a.batch_size, a.image_size),
                  "img/s (median)", "CPU ms/img", "img per CPU-s", "x ceiling", "x seed",
                  "x DALI"],
           {"engine_img_s": round(e, 1), "engine_raw_img_s": round(er, 1),
            "engine_cpu_ms": ms_of("engine, LMDB shards"),
            "engine_raw_cpu_ms": ms_of("engine, raw folder"),
            "engine_restarts_img_s": round(med[RST], 1) if RST in med else None,
            "engine_restarts_cpu_ms": ms_of(RST),
            "seed_cpu_ms": ms_of("seed: megengine DataLoader"),
            "dali_cpu_ms": ms_of("DALI CPU pipeline"),
            "decode_ceiling_cpu_ms": round(ceiling_ms, 3),
            "decode_ceiling_fast_idct_cpu_ms": round(ceiling_fast_ms, 3),
            "repeats": a.repeats,
            "seed_img_s": round(s, 1) if s else None,
            "dali_img_s": round(d, 1) if d else None,
            "cold_readahead_off_img_s": round(statistics.median(cold[False]), 1) if cold else None,
            "cold_readahead_on_img_s": round(statistics.median(cold[True]), 1) if cold else None,
            "mean_file_kb": round(mean_file_kb(files), 1),
            "imagenet_like": a.imagenet_like and a.data is None,
            "decode_ceiling_img_s": round(ceiling, 1),
            "decode_ceiling_fast_idct_img_s": round(ceiling_fast, 1), "workers": a.workers,
            "batch_size": a.batch_size, "image_size": a.image_size, "decoder": decoder,
            "data": show(raw), "files": len(files)},
           "bench_loader: %s, mean file %.0f KB (engine decoder: %s)"
           % (show(raw), mean_file_kb(files), decoder))
    os._exit(0)  # the seed DataLoader's infinite sampler keeps worker threads alive


def markdown(results: Sequence[Dict[str, Any]]) -> List[str]:
    """BENCHMARKS.md lines for one or more results of this script (its JSON last lines): one
    row per run, then the cold-cache rows of the runs made with --cold."""
    def config(r: Dict[str, Any]) -> str:
        kb = r.get("mean_file_kb")
        return "%d px, %d workers, batch %d%s" % (
            r["image_size"], r["workers"], r["batch_size"],
            ", %s%s" % (r.get("data", "sample set"), " (%.0f KB files)" % kb if kb else "")
            if r.get("data") or kb else "")

    rows = []
    for r in results:
        e = r["engine_img_s"]
        rows.append((config(r), e, r["engine_raw_img_s"], r.get("seed_img_s"),
                     r.get("dali_img_s"), r["decode_ceiling_img_s"],
                     ratio(e, r["decode_ceiling_img_s"]), ratio(e, r.get("seed_img_s")),
                     ratio(e, r.get("dali_img_s")), e / max(1, r["workers"])))
    out = md_table(["config", "engine, LMDB shards", "engine, raw folder", "seed DataLoader",
                    "DALI CPU", "decode ceiling", "engine / ceiling", "x seed", "x DALI",
                    "engine per core"], rows)
    timed = [r for r in results if r.get("engine_cpu_ms") is not None]
    if timed:
        out += ["", "The same runs per CPU-second: CPU milliseconds per image, summed over the "
                "main process and every worker (or DALI thread), ring refills included, beside "
                "img/s; for the ceiling, the decoding process's own:", ""]
        out += md_table(
            ["config", "engine img/s", "engine CPU ms/img", "engine img per CPU-s",
             "DALI img/s", "DALI CPU ms/img", "seed CPU ms/img", "ceiling CPU ms/img",
             "engine / ceiling per CPU-s", "engine / DALI per CPU-s"],
            [(config(r), r["engine_img_s"], r["engine_cpu_ms"], 1e3 / r["engine_cpu_ms"],
              r.get("dali_img_s"), r.get("dali_cpu_ms"), r.get("seed_cpu_ms"),
              r.get("decode_ceiling_cpu_ms"),
              ratio(r.get("decode_ceiling_cpu_ms"), r["engine_cpu_ms"]),
              ratio(r.get("dali_cpu_ms"), r["engine_cpu_ms"])) for r in timed])
    marked = [r for r in results if r.get("engine_restarts_img_s") is not None]
    if marked:
        out += ["", "The same runs from shards packed with `--restart-markers` (the same pixels; "
                "the decoder reads only the pieces of each JPEG that cover its crop), beside the "
                "plain pack:", ""]
        out += md_table(
            ["config", "plain img/s", "restart markers img/s", "x plain", "x ceiling",
             "plain CPU ms/img", "restart markers CPU ms/img", "x ceiling per CPU-s",
             "per core"],
            [(config(r), r["engine_img_s"], r["engine_restarts_img_s"],
              ratio(r["engine_restarts_img_s"], r["engine_img_s"]),
              ratio(r["engine_restarts_img_s"], r["decode_ceiling_img_s"]),
              r.get("engine_cpu_ms"), r.get("engine_restarts_cpu_ms"),
              ratio(r.get("decode_ceiling_cpu_ms"), r.get("engine_restarts_cpu_ms")),
              r["engine_restarts_img_s"] / max(1, r["workers"])) for r in marked])
    cold = [r for r in results if r.get("cold_readahead_on_img_s") is not None]
    if cold:
        out += ["", "Whole epochs from a cold page cache (shard pages dropped before each), "
                "LMDB with OS readahead off and on (the engine's choice), against the warm "
                "rate above:", ""]
        out += md_table(["config", "cold, readahead off", "cold, readahead on",
                         "on / off", "cold on / warm"],
                        [(config(r), r["cold_readahead_off_img_s"], r["cold_readahead_on_img_s"],
                          ratio(r["cold_readahead_on_img_s"], r["cold_readahead_off_img_s"]),
                          ratio(r["cold_readahead_on_img_s"], r["engine_img_s"]))
                         for r in cold])
    if results:
        out += ["", "img/s, medians. Engine decoder: %s. A DALI cell is empty where the run had "
                "no DALI (`pip install nvidia-dali-cuda120` adds it)."
                % results[-1].get("decoder", "?")]
    return out


if __name__ == "__main__":
    main()
