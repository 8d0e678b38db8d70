"""Check packed shards against their meta.json: VerifyConfig from the command line ->
engine.data.verify.verify -> one line per split, and each mismatch."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from engine.cli import parse
from engine.data.verify import SplitReport, VerifyConfig, verify
from engine.errors import UserError, run_tool

DESCRIPTION = ("Check packed shards against their meta.json: files present, sizes, checksums, "
               "record counts, and that every record decodes. Exit 0 if all is well, 2 with the "
               "mismatches listed otherwise.")


def report_line(r: SplitReport) -> str:
    rate = r.checksummed_bytes / 1e6 / r.seconds if r.seconds > 0 else 0.0
    sums = {"present": "checksums checked (%.0f MB/s)" % rate,
            "partial": "checksums checked where recorded (%.0f MB/s)" % rate,
            "absent": "checksums absent (packed before they were recorded)"}[r.checksums]
    decoded = "not decoded (--fast)" if r.fast else "%d decoded" % r.decoded
    return ("%s: %d records in %d shards, %.1f MB; %s; %s; %d mismatch(es); %.1f s"
            % (r.split_dir, r.records, r.shards, r.bytes / 1e6, sums, decoded,
               len(r.mismatches), r.seconds))


def main(argv: Optional[Sequence[str]] = None) -> int:
    c = parse(VerifyConfig, argv, DESCRIPTION)

    def run() -> None:
        if c.sample is not None and c.sample < 0:
            raise UserError("--sample must be >= 0")
        problems = 0
        for r in verify(c.path, sample=c.sample, fast=c.fast, seed=c.seed):
            print(report_line(r))
            for m in r.mismatches:
                print("  MISMATCH %s" % m)
            problems += len(r.mismatches)
        if problems:
            raise UserError("%d mismatch(es) found in %s (listed above); to repack only the "
                            "damaged shards, rerun tools/pack_imagenet.py with the arguments the "
                            "pack was made with and --repair (a staged copy: rerun "
                            "tools/stage_shards.py from the intact source, which copies them "
                            "again)" % (problems, c.path))

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
