"""engine.tools.gpu_check's runner and decisions on CPU: every stage in a child process with a
deadline (a hang is killed with the processes it started, a raise or a crash is a FAIL line
with its last words), the summary table, the JSON last line and the exit code; the driver's
CUDA version against the build's; the plan. The stages are stand-ins (tests/gpu_check_fakes.py)
run exactly as the real ones are."""
import json
import os
import time

import pytest
from helpers import ROOT

from engine.tools import (
    gpu_check as gc,
    gpu_check_builds as builds,
    gpu_check_report as report,
    gpu_check_runner as runner,
    gpu_check_verdicts as verdicts,
)

FAKES = "gpu_check_fakes"


@pytest.fixture(autouse=True)
def fakes_importable(monkeypatch):
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.join(ROOT, "tests"), path]))


def stage(fn, deadline=60.0, names=(), **kwargs):
    return runner.Stage(fn, "%s:%s" % (FAKES, fn), deadline, tuple(names), kwargs)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open("/proc/%d/stat" % pid) as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


# ----------------------------------------------------------------------- stages and deadlines

def test_a_stage_returns_its_checks_with_its_time(tmp_path):
    checks = runner.run_stage(stage("passing", names=("a", "b")), str(tmp_path))
    assert [(c.name, c.status) for c in checks] == [("a", "pass"), ("b", "pass")]
    assert checks[0].figures == {"img_s": 12.0} and checks[0].seconds > 0


def test_a_hanging_stage_is_killed_at_its_deadline_with_everything_it_started(tmp_path):
    pids = tmp_path / "pids"
    t0 = time.monotonic()
    checks = runner.run_stage(stage("hanging", 3, ("h", "h2"), pid_file=str(pids)), str(tmp_path))
    assert time.monotonic() - t0 < 30
    assert [(c.name, c.status) for c in checks] == [("h", "fail"), ("h2", "fail")]
    assert "stage hanging no answer within its 3 s deadline: killed" in checks[0].detail
    assert str(tmp_path / "hanging.log") in checks[0].detail
    stage_pid, child_pid = map(int, pids.read_text().split())
    time.sleep(0.5)
    assert not _alive(stage_pid) and not _alive(child_pid)


def test_a_raising_stage_is_one_fail_line_and_its_traceback_stays_in_the_log(tmp_path):
    checks = runner.run_stage(stage("raising", names=("x", "y")), str(tmp_path))
    assert [(c.name, c.status) for c in checks] == [("x", "fail"), ("y", "fail")]
    assert checks[0].detail == ("RuntimeError: CUDA error: an illegal memory access was "
                                "encountered")
    (unnamed,) = runner.run_stage(stage("raising"), str(tmp_path))
    assert unnamed.name == "stage raising" and unnamed.detail == checks[0].detail
    assert "Traceback" in (tmp_path / "raising.log").read_text()
    assert all("\n" not in report.format_check(c) for c in checks)


def test_a_user_error_in_a_stage_reads_as_its_message(tmp_path):
    (c, *_rest) = runner.run_stage(stage("user_error"), str(tmp_path))
    assert c.status == "fail" and c.detail == "--data /x: no such folder"


@pytest.mark.parametrize("fn, why", [("segfault", "died with signal SIGSEGV"),
                                     ("silent_exit", "exited with status 3 and no result")])
def test_a_stage_that_dies_fails_every_check_it_answers_for(tmp_path, fn, why):
    checks = runner.run_stage(stage(fn, names=("p", "q")), str(tmp_path))
    assert [(c.name, c.status) for c in checks] == [("p", "fail"), ("q", "fail")]
    assert why in checks[0].detail
    if fn == "segfault":
        assert "last output: about to crash" in checks[0].detail


# ------------------------------------------------------------------------------- whole runs

def _run_all(tmp_path, build, stages):
    lines = []
    rc = gc.run_all(bench=False, log_dir=str(tmp_path / "logs"), emit=lines.append,
                    build_stage=stage(build, names=("GPUs visible",)), stages=stages)
    return rc, lines


def test_a_run_prints_lines_then_the_table_the_summary_and_the_json_last(tmp_path):
    rc, lines = _run_all(tmp_path, "build_gpu", [
        stage("passing", names=("a", "b")), stage("failing", names=("c",)),
        stage("hanging", 2, ("h",), pid_file=str(tmp_path / "pids")),
        stage("raising", names=("r",))])
    assert rc == 1
    assert lines[0] == "installed: MegEngine 9.9, CUDA 11.8"
    assert lines[1:3] == ["PASS  GPUs visible: MegEngine sees 2 GPU(s)",
                          "PASS  CUDA driver vs build: the driver supports CUDA 12.2"]
    assert "PASS  a: fine, 12 img/s" in lines and "FAIL  c: wrong sum on rank 1" in lines
    assert any(ln.startswith("FAIL  h: stage hanging no answer within its 2 s") for ln in lines)
    header = next(i for i, ln in enumerate(lines) if ln.startswith("check "))
    assert lines[header].split() == ["check", "status", "s", "detail"]
    table = lines[header + 2:header + 2 + 7]
    assert [ln.split()[0] for ln in table] == ["GPUs", "CUDA", "a", "b", "c", "h", "r"]
    assert lines[-2].startswith("gpu-check: 4 passed, 3 failed, 0 skipped in ")
    result = json.loads(lines[-1])
    assert result["exit_code"] == 1 and (result["passed"], result["failed"]) == (4, 3)
    assert [c["name"] for c in result["checks"]] == ["GPUs visible", "CUDA driver vs build",
                                                    "a", "b", "c", "h", "r"]
    assert "FAIL  r: RuntimeError: CUDA error: an illegal memory access was encountered" in lines
    assert result["checks"][2]["figures"] == {"img_s": 12.0}
    assert result["build"]["megengine_gpus"] == 2 and result["log_dir"] == str(tmp_path / "logs")
    assert not (tmp_path / "logs" / "work").exists()  # the data goes, the logs stay
    assert (tmp_path / "logs" / "passing.log").exists()


def test_a_clean_run_exits_0(tmp_path):
    rc, lines = _run_all(tmp_path, "build_gpu", [stage("passing", names=("a", "b"))])
    assert rc == 0 and json.loads(lines[-1])["exit_code"] == 0


def test_a_cpu_machine_has_nothing_to_check(tmp_path):
    rc, lines = _run_all(tmp_path, "build_cpu", [stage("failing")])
    assert rc == 0
    assert lines[0] == ("gpu-check: no CUDA GPU on this machine, nothing to check (installed: "
                        "MegEngine 9.9, CUDA none)")
    assert json.loads(lines[-1])["nothing_to_check"] is True


def test_the_real_build_stage_on_this_machine(tmp_path):
    if builds.driver_gpu_count():
        pytest.skip("a GPU machine")
    (build, *rest) = runner.run_stage(runner.Stage("build", gc.STAGES + ":build_stage", 300,
                                           ("GPUs visible",)), str(tmp_path))
    assert build.name == "build" and build.figures["described"].startswith("MegEngine ")
    if build.figures["megengine_gpus"] == 0:
        assert build.figures["nothing_to_check"] is True and rest == []


def test_unusable_gpus_skip_everything_after_the_build():
    stages, skipped = gc.plan(2, False, gc.GpuCheckConfig(), "/w")
    assert stages == [] and skipped and all(c.skipped for c in skipped)
    assert "bench resnet50 224 px AMP" in [c.name for c in skipped]


def test_the_plan_follows_the_gpu_count_and_the_options():
    stages, skipped = gc.plan(8, True, gc.GpuCheckConfig(), "/w", factor=2.0)
    assert [s.name for s in stages] == ["device", "nccl", "engine", "bench-resnet18",
                                        "bench-resnet50"]
    assert stages[1].kwargs == {"ngpus": 8} and stages[2].kwargs["ngpus"] == 8
    assert stages[0].deadline == 480 and not skipped
    assert sum(s.deadline for s in stages) / 2 <= 1400  # bounded, whatever hangs
    stages, skipped = gc.plan(1, True, gc.GpuCheckConfig(bench=False, bench_size=192), "/w")
    assert [s.name for s in stages] == ["device", "engine"]
    assert [c.name for c in skipped] == ["NCCL all-reduce exact", "NCCL all-reduce bandwidth"]
    stages, _ = gc.plan(2, True, gc.GpuCheckConfig(bench_size=192), "/w")
    assert stages[-1].names == ("bench resnet50 192 px AMP",)


# ---------------------------------------------------------------------------- the decisions

@pytest.mark.parametrize("build, driver, version, ok, needle", [
    (10010, 12020, "535.104.05", True, "supported"),
    (11080, 11080, None, True, "supported"),
    (11080, 11040, "470.82.01", True, "minor-version compatibility"),
    (11080, 11040, "440.33", False, "needs driver >= 450.80.02"),
    (10010, 10000, "410.48", False, ">= 418.39 (CUDA 10.1)"),
    (11080, 10020, "440.33", False, ">= 520.61.05 (CUDA 11.8)"),
    (11010, 0, None, False, "no CUDA driver answered"),
    (0, 12020, None, False, "has no CUDA"),
])
def test_the_driver_against_the_build(build, driver, version, ok, needle):
    c = builds.driver_check(build, driver, version)
    assert c.ok is ok and needle in c.detail, c.detail
    assert c.name == "CUDA driver vs build"


def test_allreduce_and_equality_verdicts():
    exact, bw = verdicts.allreduce_check(8, 0, 0.0, 180.5, 256, 2.0)
    assert exact.ok and bw.ok and "180.5 GB/s" in bw.detail
    exact, bw = verdicts.allreduce_check(8, 1, 3.0, 0.8, 256, 2.0)
    assert not exact.ok and "1 rank(s) got a wrong sum" in exact.detail
    assert not bw.ok and "NCCL_P2P_DISABLE" in bw.detail
    assert verdicts.allreduce_check(2, 0, 0.0, 0.01, 1, None)[1].ok  # no floor on the test backend
    assert not verdicts.allreduce_check(2, 0, 0.0, None, 1, 2.0)[1].ok
    assert verdicts.equality_check("e", 1e-7, 1e-5, "x").ok
    assert not verdicts.equality_check("e", 1e-3, 1e-5, "x").ok
    assert not verdicts.equality_check("e", float("nan"), 1e-5, "x").ok
    assert not verdicts.equality_check("e", None, 1e-5, "x").ok


def test_the_table_shortens_long_details():
    long = report.Check("n", False, "x" * 300)
    long.seconds = 12.4
    lines = report.summary_table([long, report.skip_check("s", "why")], width=40).splitlines()
    assert lines[2].split()[:3] == ["n", "FAIL", "12"] and lines[2].endswith("x...")
    assert len(lines[2].split()[3]) == 40
    assert lines[3].split()[:3] == ["s", "SKIP", "-"]


# ------------------------------------------------- the real stages, one CPU process as the GPU

@pytest.mark.slow
def test_the_engine_and_bench_stages_run_the_training_path_on_cpu(tmp_path):
    """The stages the GPU machine runs, here with one CPU rank (float32, small sizes): the
    trainer's own run on a generated, packed set, counted, retraced, resumed and timed."""
    work = str(tmp_path / "work")
    engine = runner.Stage("engine", gc.STAGES + ":engine_stage", 1200, (), dict(
        ngpus=1, work_dir=work, arch="resnet18", amp=False, batch=2, sizes=[32, 64], workers=0))
    checks = {c.name: c for c in runner.run_stage(engine, str(tmp_path))}
    assert checks["engine: ranks in sync"].skipped
    assert checks["engine: val pass counts"].ok, checks["engine: val pass counts"].detail
    assert checks["engine: val pass counts"].figures["counts"] == [21, 21]
    assert checks["engine: retrace at a second resolution"].ok
    resume = checks["engine: resume equals straight run"]
    assert resume.ok and resume.figures["max_rel_diff"] == 0.0, resume.detail
    bench = runner.Stage("bench", gc.STAGES + ":bench_stage", 1200, (), dict(
        ngpus=1, arch="resnet18", batch=2, size=32, steps=4, warmup=1, work_dir=work, amp=False,
        workers=1))
    (b,) = runner.run_stage(bench, str(tmp_path))
    assert b.ok and b.name == "bench resnet18 32 px float32", b.detail
    assert b.figures["img_s_per_gpu"] > 0 and 0 <= b.figures["data_wait"] <= 1
