"""MetricsLog.drop_after: on resume the records past the checkpoint go (the resumed run redoes
them), every record up to it stays as written, and a torn last line from a crash is not carried
over."""
import json
import os

from engine.metrics import MetricsLog, read_jsonl


def records(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_drop_after_keeps_the_records_up_to_the_step_and_drops_the_rest(tmp_path):
    path = str(tmp_path / "run" / "metrics.jsonl")
    log = MetricsLog(path)
    written = [{"kind": "train", "step": s, "loss": 7.0 - s / 10} for s in (10, 20, 30, 40)]
    written.insert(2, {"kind": "eval", "step": 20, "top1": 0.25, "top5": float("nan")})
    for r in written:
        log.write(r)
    log.drop_after(20)
    kept = records(path)
    assert [(r["kind"], r["step"]) for r in kept] == [("train", 10), ("train", 20), ("eval", 20)]
    assert kept[2]["top5"] is None  # as written: JSON has no nan
    assert kept[:2] == written[:2]
    assert os.listdir(str(tmp_path / "run")) == ["metrics.jsonl"]  # nothing left beside it
    log.write({"kind": "train", "step": 30, "loss": 4.0})  # the resumed run appends after it
    assert [r["step"] for r in read_jsonl(path)] == [10, 20, 20, 30]


def test_drop_after_at_the_last_step_or_past_it_keeps_everything(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for s in (5, 10):
        log.write({"kind": "train", "step": s})
    for step in (10, 99):
        log.drop_after(step)
        assert [r["step"] for r in records(path)] == [5, 10]
    log.drop_after(0)  # a resume from step 0 (a fresh start into an old folder) drops all
    assert records(path) == []


def test_drop_after_drops_a_torn_last_line_and_keeps_records_without_a_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"kind": "config", "arch": "resnet18"}) + "\n")
        f.write(json.dumps({"kind": "train", "step": 10}) + "\n")
        f.write('{"kind": "train", "st')  # the process died mid-line
    MetricsLog(path).drop_after(10)
    assert records(path) == [{"kind": "config", "arch": "resnet18"}, {"kind": "train", "step": 10}]


def test_drop_after_without_a_file_or_when_disabled_touches_nothing(tmp_path):
    missing = str(tmp_path / "new" / "metrics.jsonl")
    MetricsLog(missing).drop_after(10)
    assert not os.path.exists(missing)
    path = str(tmp_path / "metrics.jsonl")
    MetricsLog(path).write({"kind": "train", "step": 30})
    before = open(path).read()
    MetricsLog(path, enabled=False).drop_after(10)  # ranks other than 0
    assert open(path).read() == before
