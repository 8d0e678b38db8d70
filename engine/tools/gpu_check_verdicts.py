"""The verdicts of the device, nccl and engine stages, as pure functions of what the stages
measured: losses against eager float32 within a tolerance, bit-identical parameters across
ranks, a sharded val pass that counts every image once, an exact and fast enough all-reduce,
two runs that must agree. Tested on a CPU machine.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from engine.tools.gpu_check_report import Check

__all__ = ["AMP_RTOL", "FP32_RTOL", "allreduce_check", "compare_losses", "count_check",
           "equality_check", "params_check", "split_range"]

#: float32 traced vs eager: same math, possibly other cuDNN algorithms.
FP32_RTOL = 1e-3
#: AMP (float16 convolutions) vs float32 eager.
AMP_RTOL = 2e-2


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-6)


def compare_losses(name: str, reference: Sequence[float], candidate: Sequence[float],
                   rtol: float, skipped_updates: Sequence[bool] = ()) -> Check:
    """Losses of the same steps (same initial weights, same batches) against eager float32.

    Every loss must be finite and within `rtol` (relative) of the reference. After an AMP step
    whose update was skipped (overflow) the trajectories legitimately part, so only the losses
    up to and including that step are compared.
    """
    n = len(reference)
    if len(candidate) != n or n == 0:
        return Check(name, False, "got %d losses for %d reference steps" % (len(candidate), n))
    upto = n
    for i, s in enumerate(skipped_updates):
        if s:
            upto = i + 1
            break
    finite = all(math.isfinite(x) for x in candidate)
    worst = max(abs(c - r) / max(abs(r), 1e-6) for r, c in zip(reference[:upto], candidate[:upto]))
    ok = finite and all(_close(r, c, rtol) for r, c in zip(reference[:upto], candidate[:upto]))
    detail = "losses %s vs eager %s (max rel diff %.2e, tolerance %.0e)%s" % (
        " ".join("%.5f" % x for x in candidate), " ".join("%.5f" % x for x in reference), worst,
        rtol, "" if finite else "; NOT FINITE")
    if upto < n:
        detail += "; update %d skipped by the loss scaler, later steps not compared" % upto
    return Check(name, ok, detail, figures={"losses": list(candidate), "eager": list(reference),
                                            "max_rel_diff": worst})


def params_check(digests: Sequence[Optional[str]], steps: int, name: str = "ranks in sync"
                 ) -> Check:
    """Data-parallel ranks must hold bit-identical parameters after the same steps."""
    ok = len(digests) >= 2 and None not in digests and len(set(digests)) == 1
    detail = "%d ranks, %d steps: parameter sha256 %s" % (
        len(digests), steps, " ".join((d or "missing")[:12] for d in digests))
    if not ok:
        detail += " differ" if None not in digests and len(digests) >= 2 else \
            " (a rank returned nothing, or only one rank ran)"
    return Check(name, ok, detail, figures={"digests": list(digests)})


def split_range(n: int, world: int, rank: int) -> Tuple[int, int]:
    """Rank's contiguous share [start, stop) of n items: disjoint, covering, sizes differ by <= 1
    (no padding, so a val pass counts every image exactly once)."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError("need world >= 1, 0 <= rank < world, n >= 0")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def count_check(counts: Sequence[Optional[int]], expected: int,
                name: str = "val pass counts") -> Check:
    """Each all-reduced image count of a sharded val pass must be exactly `expected`."""
    ok = len(counts) >= 1 and all(c == expected for c in counts)
    return Check(name, ok, "all-reduced image count %s, expected %d" % (list(counts), expected),
                 figures={"counts": list(counts), "expected": expected})


def allreduce_check(world: int, wrong_ranks: int, max_err: float, busbw_gbs: Optional[float],
                    size_mb: float, min_busbw_gbs: Optional[float]) -> List[Check]:
    """The all-reduce's verdicts: exact on every rank, and a bus bandwidth above the floor that
    a working peer-to-peer/NVLink path clears (None: no floor, e.g. the CPU test backend)."""
    exact = Check("NCCL all-reduce exact", wrong_ranks == 0 and world >= 2,
                  "%d ranks: %s (max abs error %.3g)" % (
                      world, "every rank got the exact sum" if wrong_ranks == 0 else
                      "%d rank(s) got a wrong sum" % wrong_ranks, max_err),
                  figures={"world": world, "wrong_ranks": wrong_ranks, "max_err": max_err})
    if busbw_gbs is None:
        return [exact, Check("NCCL all-reduce bandwidth", False, "no timing came back")]
    ok = min_busbw_gbs is None or busbw_gbs >= min_busbw_gbs
    detail = "%.1f GB/s bus bandwidth, %.0f MB float32 across %d GPUs" % (busbw_gbs, size_mb,
                                                                        world)
    if min_busbw_gbs is not None and not ok:
        detail += ("; below %.0f GB/s: the GPUs talk through the host or sockets (check "
                   "nvidia-smi topo -m, NCCL_P2P_DISABLE, NCCL_SHM_DISABLE)" % min_busbw_gbs)
    return [exact, Check("NCCL all-reduce bandwidth", ok, detail,
                         figures={"busbw_gbs": round(busbw_gbs, 2), "size_mb": size_mb})]


def equality_check(name: str, worst: Optional[float], tolerance: float, what: str) -> Check:
    """Two runs that must agree: `worst` is the largest relative difference found (None: one
    run is missing)."""
    if worst is None:
        return Check(name, False, "%s: nothing to compare (a run wrote no checkpoint)" % what)
    ok = math.isfinite(worst) and worst <= tolerance
    return Check(name, ok, "%s: max relative difference %.2e (tolerance %.0e)" % (what, worst,
                                                                               tolerance),
                 figures={"max_rel_diff": worst, "tolerance": tolerance})

