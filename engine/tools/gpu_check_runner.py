"""The stage runner of `make gpu-check`: `Stage` (one child process with a deadline and the
checks it answers for), `run_stage` (start it in a process group of its own, kill the group past
its deadline, and turn a death, a hang or an exception into FAIL checks naming the cause and the
log file), its child side `run_stage_child`, and `run_stages`. It takes its stages as an
argument, so it is tested on a CPU machine with stand-in stages.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from engine.errors import UserError
from engine.tools.gpu_check_report import Check, format_check

__all__ = ["Stage", "run_stage", "run_stage_child", "run_stages"]


@dataclass(frozen=True)
class Stage:
    """One child process: `target` ("module:function") called with `kwargs`, returning a list
    of Check; `names` are the checks it answers for, which FAIL with the reason when it dies
    or runs past `deadline` seconds."""

    name: str
    target: str
    deadline: float
    names: Tuple[str, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


_KILL_GRACE_S = 5.0
_CRASH = "stage %s"  # the one check of a stage function that raised


def _engine_root() -> str:
    import engine

    return os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))


def _last_words(log_path: str, limit: int = 300) -> str:
    """The last line of a stage's output that says something (MegEngine's CUDA-loading notes
    and blank lines skipped), shortened to `limit` characters."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines()[-200:]]
    except OSError:
        return ""
    said = [ln for ln in lines if ln and not ln.startswith(("debug:", "info:", "warning:"))]
    text = said[-1] if said else ""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(_KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, log_dir: str) -> List[Check]:
    """Run `stage` in a child process (its own process group, so the ranks it forks go with
    it) and return its checks; a stage past its deadline is killed, and one that dies or
    returns nothing FAILs every check it answers for, naming the cause and its log file."""
    out_path = os.path.join(log_dir, "%s.json" % stage.name)
    log_path = os.path.join(log_dir, "%s.log" % stage.name)
    code = ("import sys; from engine.tools.gpu_check_runner import run_stage_child; "
            "sys.exit(run_stage_child(sys.argv[1:]))")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_engine_root()] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, stage.target, json.dumps(
            dict(stage.kwargs)), out_path], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        try:
            status = proc.wait(stage.deadline)
            why = None
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status, why = None, "no answer within its %.0f s deadline: killed" % stage.deadline
        except BaseException:  # Ctrl-C: take the stage's processes down with this one
            _kill_group(proc)
            raise
    if status is not None:
        _kill_group(proc)  # ranks or servers the stage left behind
    seconds = time.monotonic() - t0
    checks: List[Check] = []
    if why is None:
        try:
            with open(out_path) as f:
                checks = [Check.from_json(d) for d in json.load(f)]
        except (OSError, ValueError, KeyError):
            checks = []
        if not checks:
            if status is not None and status < 0:
                why = "died with signal %s" % signal.Signals(-status).name
            else:
                why = "exited with status %s and no result" % status
    if why is not None:
        words = _last_words(log_path)
        reason = "stage %s %s%s (log: %s)" % (stage.name, why, "; last output: " + words
                                              if words else "", log_path)
        answered = {c.name for c in checks}
        checks += [Check(n, False, reason) for n in stage.names if n not in answered]
    crash = next((c for c in checks if c.name == _CRASH % stage.target.partition(":")[2]), None)
    if crash is not None and stage.names:
        # The stage raised: each check it answers for fails with the exception's line.
        checks = [Check(n, False, crash.detail) for n in stage.names]
    for c in checks:
        c.seconds = seconds
    return checks


def run_stage_child(argv: Sequence[str]) -> int:
    """The child's side of `run_stage`: call the target, write its checks as JSON. An exception
    is one FAIL check (its traceback goes to the stage's log)."""
    import importlib
    import traceback

    target, kwargs, out_path = argv[0], json.loads(argv[1]), argv[2]
    module, _, name = target.partition(":")
    try:
        checks = list(getattr(importlib.import_module(module), name)(**kwargs))
    except BaseException as exc:  # noqa: BLE001 - everything becomes a FAIL line
        traceback.print_exc()
        label = "" if isinstance(exc, UserError) else type(exc).__name__ + ": "
        checks = [Check(_CRASH % name, False, "%s%s" % (label, " ".join(str(exc).split())
                                                       or repr(exc)))]
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump([c.to_json() for c in checks], f, default=str)
    os.replace(tmp, out_path)
    return 0


def run_stages(stages: Sequence[Stage], log_dir: str, emit: Callable[[str], None] = print,
               checks: Optional[List[Check]] = None) -> List[Check]:
    """Run each stage in turn, printing each check's line as its stage completes."""
    out = [] if checks is None else checks
    for stage in stages:
        for c in run_stage(stage, log_dir):
            out.append(c)
            emit(format_check(c))
    return out

