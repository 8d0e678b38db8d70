#!/usr/bin/env python3
"""Check packed shards against their meta.json: files present, sizes, checksums, record counts,
and that every record decodes. Exit 0 if all is well, 2 with the mismatches listed otherwise."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.verify import verify  # noqa: E402
from engine.errors import run_tool  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("path", help="a packed split (OUT/train) or a pack's root (OUT)")
    p.add_argument("--fast", action="store_true",
                   help="sizes and checksums only (runs at disk speed, decodes nothing)")
    p.add_argument("--sample", type=int, default=None, metavar="K",
                   help="decode K random records per split instead of all")
    p.add_argument("--seed", type=int, default=0, help="which records --sample picks")
    a = p.parse_args(argv)
    if a.sample is not None and a.sample < 0:
        print("error: --sample must be >= 0", file=sys.stderr)
        return 2
    reports: list = []
    status = run_tool(lambda: reports.extend(verify(a.path, sample=a.sample, fast=a.fast,
                                                    seed=a.seed)))
    if status:
        return status
    problems = 0
    for r in reports:
        mb = r["bytes"] / 1e6
        rate = r["checksummed_bytes"] / 1e6 / r["seconds"] if r["seconds"] > 0 else 0.0
        sums = {"present": "checksums checked (%.0f MB/s)" % rate,
                "partial": "checksums checked where recorded (%.0f MB/s)" % rate,
                "absent": "checksums absent (packed before they were recorded)"}[r["checksums"]]
        decoded = "not decoded (--fast)" if r["fast"] else "%d decoded" % r["decoded"]
        print("%s: %d records in %d shards, %.1f MB; %s; %s; %d mismatch(es); %.1f s"
              % (r["split_dir"], r["records"], r["shards"], mb, sums, decoded,
                 len(r["mismatches"]), r["seconds"]))
        for m in r["mismatches"]:
            print("  MISMATCH %s" % m)
        problems += len(r["mismatches"])
    if problems:
        print("error: %d mismatch(es) found in %s (listed above); repack or restage the damaged "
              "shards" % (problems, a.path), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
