"""The verdicts of `make gpu-check` and how they are written: `Check` (one PASS/FAIL/SKIP line
with its figures, and its JSON form, which is how a stage's child process hands its checks to
the parent), each check's line, the summary table and line, the JSON last line and the exit
status. Pure functions, tested on a CPU machine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence

__all__ = ["Check", "exit_code", "format_check", "json_line", "skip_check", "summary",
           "summary_table"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    skipped: bool = False
    figures: Dict[str, Any] = field(default_factory=dict)
    seconds: Optional[float] = None  # the stage's wall time, for the summary table

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("pass" if self.ok else "fail")

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.figures:
            out["figures"] = self.figures
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 1)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Check":
        return cls(str(d["name"]), d["status"] != "fail", str(d.get("detail", "")),
                   skipped=d["status"] == "skip", figures=dict(d.get("figures") or {}))



def format_check(c: Check) -> str:
    return "%s  %s: %s" % (c.status.upper(), c.name, c.detail)


def exit_code(checks: Sequence[Check]) -> int:
    """1 when any check failed (a skipped one does not count), else 0."""
    return 1 if any(not c.ok and not c.skipped for c in checks) else 0


def summary(checks: Sequence[Check]) -> str:
    passed = sum(c.ok and not c.skipped for c in checks)
    failed = sum(not c.ok and not c.skipped for c in checks)
    skipped = sum(c.skipped for c in checks)
    return "gpu-check: %d passed, %d failed, %d skipped" % (passed, failed, skipped)


def skip_check(name: str, why: str) -> Check:
    return Check(name, True, why, skipped=True)


def _headline(c: Check, width: int) -> str:
    text = c.detail if len(c.detail) <= width else c.detail[:width - 3] + "..."
    return text


def summary_table(checks: Sequence[Check], width: int = 72) -> str:
    """The table after the check lines: one row per check (status, stage seconds, detail)."""
    rows = [("check", "status", "s", "detail")]
    rows += [(c.name, c.status.upper(), "-" if c.seconds is None else "%.0f" % c.seconds,
              _headline(c, width)) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["%s  %s  %s  %s" % (r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                                 r[2].rjust(widths[2]), r[3]) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def json_line(checks: Sequence[Check], **extra: Any) -> str:
    """The last line: every check with its figures, and `extra` (the build, the log folder)."""
    return json.dumps({"checks": [c.to_json() for c in checks],
                       "passed": sum(c.ok and not c.skipped for c in checks),
                       "failed": sum(not c.ok and not c.skipped for c in checks),
                       "exit_code": exit_code(checks), **extra}, default=str, sort_keys=True)

