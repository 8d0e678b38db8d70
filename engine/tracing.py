"""How every graph of the engine is compiled: `compile_step(fn, trace)`.

The train step, the eval step and the EMA update all go through here, so they are compiled
alike and a resumed run computes bit for bit what the uninterrupted one does.
"""
from __future__ import annotations

from typing import Callable

from megengine import jit

__all__ = ["TRACE_OPT_LEVEL", "compile_step"]

# Level 2, MegEngine's default, adds global rewrites of the graph's arithmetic before it is
# compiled, and in MegEngine 1.13 what they produce depends on the tensors' values when the trace
# is recorded: a step traced while the momentum buffers are zero (step 0 of a fresh run) rounds
# the SGD update (momentum, weight decay) exactly as eager execution does, one traced while they
# are not (the first step after a resume) rounds it differently by about one unit in the last
# place, and small-batch BatchNorm amplifies that into visibly different weights within a few
# steps. Level 1 rounds as eager execution does whatever the values, so a resume is exact.
TRACE_OPT_LEVEL = 1


def compile_step(fn: Callable, trace: bool) -> Callable:
    """`fn` compiled with jit.trace(symbolic=True) at TRACE_OPT_LEVEL, or `fn` itself."""
    return jit.trace(fn, symbolic=True, opt_level=TRACE_OPT_LEVEL) if trace else fn
