"""metrics.jsonl: only ever appended, each record whole or not at all and stamped with its
time; a torn last line from a killed process stays a line of its own that readers skip; a full
disk costs records, never the run; readers get each step once (the last record, with a resume
discarding what it redoes)."""
import json
import os
import subprocess
import sys

from engine.metrics import MetricsLog, latest_records, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metrics_are_appended_whole_with_a_time_and_read_back_once_per_step(tmp_path):
    path = str(tmp_path / "m.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"kind": "train", "step": 1, "loss": 3.0}) + "\n")
        f.write('{"kind": "train", "step": 2, "lo')  # a process killed mid-line
    log = MetricsLog(path)
    assert log.write({"kind": "resume", "step": 1})
    for s in (2, 3):
        assert log.write({"kind": "train", "step": s, "loss": 2.0})
    assert log.write({"kind": "eval", "step": 3, "top1": float("nan")})
    text = open(path).read()
    assert text.startswith(json.dumps({"kind": "train", "step": 1, "loss": 3.0}) + "\n"
                           + '{"kind": "train", "step": 2, "lo\n')  # kept, and ended
    recs = read_jsonl(path)
    assert [(r["kind"], r["step"]) for r in recs] == [("train", 1), ("resume", 1), ("train", 2),
                                                      ("train", 3), ("eval", 3)]
    assert all("time" in r for r in recs[1:]) and recs[-1]["top1"] is None
    # a resume discards the steps past it that were logged before it; the last record of a step
    # wins; events stay
    history = [{"kind": "train", "step": s, "v": "old"} for s in (1, 2, 3)] + \
              [{"kind": "eval", "step": 3, "v": "old"}, {"kind": "resume", "step": 2}] + \
              [{"kind": "train", "step": s, "v": "new"} for s in (3, 4)] + \
              [{"kind": "train", "step": 4, "v": "newer"}]
    assert [(r["kind"], r["step"], r.get("v")) for r in latest_records(history)] == [
        ("train", 1, "old"), ("train", 2, "old"), ("resume", 2, None), ("train", 3, "new"),
        ("train", 4, "newer")]


def test_a_full_disk_costs_records_not_the_run(tmp_path):
    os.symlink("/dev/full", str(tmp_path / "m.jsonl"))  # every write: ENOSPC
    warnings = []
    log = MetricsLog(str(tmp_path / "m.jsonl"), warn=warnings.append)
    assert not log.write({"kind": "train", "step": 1}) and not log.write({"kind": "train", "step": 2})
    assert len(warnings) == 1 and "the disk is full" in warnings[0] and "\n" not in warnings[0]
    # a line that does not fit is cut back: whole records or none (a file size limit stands in
    # for the disk filling up mid-line)
    path = str(tmp_path / "limited.jsonl")
    code = (
        "import resource, signal, sys\n"
        "sys.path.insert(0, %r)\n"
        "from engine.metrics import MetricsLog\n"
        "log = MetricsLog(%r, warn=print)\n"
        "log.write({'kind': 'train', 'step': 1})\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "import os; size = os.path.getsize(%r)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, size + 100))\n"
        "print(log.write({'kind': 'train', 'step': 2, 'pad': 'x' * 300}))\n"
        "print(log.write({'kind': 'train', 'step': 3}))\n" % (ROOT, path, path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].startswith("warning: cannot write %s" % path)
    assert p.stdout.splitlines()[1:] == ["False", "note: %s is written again (1 record lost)"
                                         % path, "True"]
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]
    assert all(json.loads(line) for line in open(path))  # no torn line
