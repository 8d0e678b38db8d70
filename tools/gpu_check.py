#!/usr/bin/env python
"""Check that the installed MegEngine runs this engine on this machine's GPUs: one PASS/FAIL line
per check with its figures, exit status 1 if any check failed. A CPU machine: nothing to check,
exit 0. The logic is engine.gpu_check; `make gpu-check` runs this."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError, run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--no-bench", dest="bench", action="store_false",
                   help="skip the resnet18/resnet50 img/s measurements")
    p.add_argument("--bench-batch", type=int, default=128, help="images per step")
    p.add_argument("--bench-size", type=int, default=224, help="image size (pixels)")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--bench-warmup", type=int, default=5, help="untimed steps first")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    def run() -> int:
        if a.bench_batch < 1 or a.bench_size < 32 or a.bench_steps < 1 or a.bench_warmup < 0:
            raise UserError("need --bench-batch >= 1, --bench-size >= 32, --bench-steps >= 1, "
                            "--bench-warmup >= 0")
        from engine.gpu_check import run_all

        return run_all(bench=a.bench, bench_batch=a.bench_batch, bench_size=a.bench_size,
                       bench_steps=a.bench_steps, bench_warmup=a.bench_warmup)

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
