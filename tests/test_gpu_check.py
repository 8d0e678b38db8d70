"""engine.tools.gpu_check: the decisions of `make gpu-check`, tested on CPU with the installed MegEngine's
real build figures; the full check itself runs only where a CUDA GPU is (marked gpu)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.tools import (
    gpu_check as gc,
    gpu_check_builds as builds,
    gpu_check_report as report,
    gpu_check_verdicts as verdicts,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The -gencode lists of MegEngine's build script (scripts/whl/manylinux2014/build_wheel_common.sh)
CU118_1130 = " ".join("-gencode arch=compute_%d,code=sm_%d" % (s, s)
                      for s in (61, 70, 75, 80, 86, 89)) + " -gencode arch=compute_89,code=compute_89"
CU118_1134 = " ".join("-gencode arch=compute_%d,code=sm_%d" % (s, s)
                      for s in (61, 70, 75, 80, 86, 89, 90)) + " -gencode arch=compute_90,code=compute_90"


@pytest.fixture(scope="module")
def installed():
    return builds.build_info()


def test_installed_build_is_read_from_megengine(installed):
    import megengine as mge

    assert installed["version"] == mge.__version__
    sms = builds.kernel_sms(installed["gencode"])
    text = builds.describe_build(installed["version"], installed["cuda"], installed["cudnn"],
                             installed["gencode"])
    assert text.startswith("MegEngine %s, CUDA " % mge.__version__)
    if installed["cuda"] == 10010:  # the PyPI wheel this project installs by default
        assert sms == [52, 60, 61, 70, 75]
        assert "CUDA 10.1, cuDNN 7.6.3" in text and "(+PTX compute_75)" in text


def test_kernel_sms_counts_only_compiled_kernels_not_ptx():
    assert builds.kernel_sms(CU118_1130) == [61, 70, 75, 80, 86, 89]
    assert builds.kernel_sms("-gencode arch=compute_75,code=compute_75") == []
    assert builds.kernel_sms("-1") == [] and builds.kernel_sms("") == []


def test_version_numbers():
    assert builds.format_cuda_version(10010) == "10.1"
    assert builds.format_cuda_version(11080) == "11.8"
    assert builds.format_cudnn_version(7603) == "7.6.3"
    assert builds.format_cudnn_version(8600) == "8.6.0"
    assert builds.format_cuda_version(0) == "none"


@pytest.mark.parametrize("cc,ok", [(70, True), (75, True), (80, False), (86, False), (89, False),
                                   (90, False)])
def test_compute_capability_against_the_installed_build(installed, cc, ok):
    if installed["cuda"] != 10010:
        pytest.skip("this table is the PyPI cu101 wheel's")
    c = builds.compute_capability_check(0, "GPU", cc, installed["gencode"])
    assert c.ok is ok and ("sm_%d" % cc) in c.detail
    assert report.format_check(c).startswith("PASS" if ok else "FAIL")


def test_which_build_each_generation_needs():
    volta = builds.compute_capability_check(0, "Tesla V100", 70, CU118_1130)
    assert volta.ok
    assert "PyPI" in builds._advice(70) and "PyPI" in builds._advice(75)
    ampere = builds._advice(80)
    assert "cu111" in ampere and "cu118" in ampere and "PyPI" not in ampere
    ada = builds._advice(89)
    assert "cu118" in ada and "cu111" not in ada
    hopper = builds._advice(90)
    assert "1.13.4" in hopper and "1.13.0-1.13.3" not in hopper
    assert builds.compute_capability_check(0, "H100", 90, CU118_1134).ok
    h100_old = builds.compute_capability_check(0, "H100", 90, CU118_1130)
    assert not h100_old.ok and "1.13.4" in h100_old.detail
    assert "from source" in builds._advice(100)
    assert [b.sdk for b in builds.required_builds(86)] == ["cu111", "cu112", "cu114", "cu118",
                                                       "cu118"]


def test_visibility():
    assert builds.visibility_check(0, None) is None  # a CPU machine: nothing to check
    assert builds.visibility_check(0, 0) is None
    assert not builds.visibility_check(0, 2).ok  # the driver sees GPUs, MegEngine does not
    assert not builds.visibility_check(1, 2).ok
    assert builds.visibility_check(2, 2).ok and builds.visibility_check(1, None).ok


def test_compare_losses_tolerance_finiteness_and_skips():
    ref = [6.9, 6.8, 6.7]
    assert verdicts.compare_losses("t", ref, [6.9, 6.8, 6.7], verdicts.FP32_RTOL).ok
    assert verdicts.compare_losses("t", ref, [6.9 * (1 + 5e-4), 6.8, 6.7], verdicts.FP32_RTOL).ok
    assert not verdicts.compare_losses("t", ref, [6.9 * 1.01, 6.8, 6.7], verdicts.FP32_RTOL).ok
    assert verdicts.compare_losses("a", ref, [6.9 * 1.01, 6.8, 6.7], verdicts.AMP_RTOL).ok
    bad = verdicts.compare_losses("a", ref, [float("nan"), 6.8, 6.7], verdicts.AMP_RTOL)
    assert not bad.ok and "NOT FINITE" in bad.detail
    # an overflow-skipped AMP update: later losses are not compared, the skipped step is
    c = verdicts.compare_losses("a", ref, [6.9, 6.85, 9.0], verdicts.AMP_RTOL, [False, True, False])
    assert c.ok and "skipped" in c.detail
    assert not verdicts.compare_losses("a", ref, [6.9, 7.5, 9.0], verdicts.AMP_RTOL, [False, True, False]).ok
    assert not verdicts.compare_losses("t", ref, [6.9], verdicts.FP32_RTOL).ok


def test_params_and_counts():
    assert verdicts.params_check(["ab" * 32, "ab" * 32], 3).ok
    assert not verdicts.params_check(["ab" * 32, "cd" * 32], 3).ok
    assert not verdicts.params_check(["ab" * 32, None], 3).ok
    assert not verdicts.params_check(["ab" * 32], 3).ok  # one rank proves nothing
    assert verdicts.count_check([37, 37], 37).ok
    assert not verdicts.count_check([38, 38], 37).ok  # padding counted twice
    assert not verdicts.count_check([37, None], 37).ok


@pytest.mark.parametrize("n", [0, 1, 7, 37, 50000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_split_range_is_disjoint_covering_and_balanced(n, world):
    parts = [verdicts.split_range(n, world, r) for r in range(world)]
    covered = [i for a, b in parts for i in range(a, b)] if n < 1000 else None
    if covered is not None:
        assert covered == list(range(n))
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(parts[i][1] == parts[i + 1][0] for i in range(world - 1))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1


def test_split_range_rejects_bad_arguments():
    for args in [(10, 0, 0), (10, 2, 2), (10, 2, -1), (-1, 2, 0)]:
        with pytest.raises(ValueError):
            verdicts.split_range(*args)


def test_report_lines_and_exit_code():
    ok, bad, skip = report.Check("a", True, "x 1"), report.Check("b", False, "y 2"), report.skip_check("c", "z")
    assert report.format_check(ok) == "PASS  a: x 1"
    assert report.format_check(bad) == "FAIL  b: y 2"
    assert report.format_check(skip) == "SKIP  c: z"
    assert report.exit_code([ok, skip]) == 0
    assert report.exit_code([ok, bad, skip]) == 1
    assert report.exit_code([]) == 0
    assert report.summary([ok, bad, skip]) == "gpu-check: 1 passed, 1 failed, 1 skipped"


@pytest.mark.slow
def test_eager_and_traced_steps_agree_on_cpu():
    """The runner the GPU check uses, on MegEngine's CPU backend (float32 only: AMP needs CUDA)."""
    from engine.models import get_model

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, (2,)).astype(np.int32)
    state = get_model("resnet18", num_classes=10).state_dict()
    eager, _ = gc.step_losses("eager", state, images, labels, 2, num_classes=10)
    traced, skips = gc.step_losses("trace", state, images, labels, 2, num_classes=10)
    assert all(math.isfinite(x) for x in eager) and eager[0] != eager[1]  # the update happened
    c = verdicts.compare_losses("traced float32 step", eager, traced, verdicts.FP32_RTOL, skips)
    assert c.ok, c.detail


@pytest.mark.skipif(builds.driver_gpu_count() not in (None, 0), reason="a GPU machine runs the check")
def test_tool_on_a_cpu_machine_has_nothing_to_check():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if "nothing to check" not in r.stdout:
        pytest.skip("MegEngine sees a GPU here")
    assert r.returncode == 0, r.stderr
    assert "installed: MegEngine " in r.stdout and ", CUDA " in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"),
                        "--bench-steps", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ")


@pytest.mark.gpu
def test_gpu_check_passes_on_this_gpu_machine():
    """The whole check, minus the benchmarks; its lines are in the captured output on failure."""
    lines = []
    rc = gc.run_all(bench=False, emit=lines.append)
    print("\n".join(lines))
    assert rc == 0, "\n".join(lines)
    assert any(line.startswith("PASS  traced AMP step") for line in lines)


def _plan(venv, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEGENGINE_")}
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "bootstrap.sh"), "--megengine-plan"],
                       env={**base, "ENGINE_VENV": str(venv), **env}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_bootstrap_takes_the_megengine_requirement_from_the_environment(tmp_path):
    """--megengine-plan: what bootstrap would install; it installs nothing, so this is cheap."""
    venv = tmp_path / "venv"
    venv.mkdir()
    assert _plan(venv) == "megengine: install: pip install megengine==1.13.0"  # PyPI default
    (venv / ".engine-megengine").write_text("megengine==1.13.0\n")
    assert _plan(venv) == "megengine: up to date: megengine==1.13.0"
    cu118 = {"MEGENGINE_SPEC": "megengine==1.13.4+cu118",
             "MEGENGINE_FIND_LINKS": builds.INDEX_URL}
    assert _plan(venv, **cu118) == (
        "megengine: reinstall (was: megengine==1.13.0): pip install --force-reinstall --no-deps "
        "megengine==1.13.4+cu118 -f " + builds.INDEX_URL)
    (venv / ".engine-megengine").write_text("megengine==1.13.4+cu118 -f %s\n" % builds.INDEX_URL)
    assert _plan(venv, **cu118).startswith("megengine: up to date")
    # back to the default: forced, because the +cu118 build also satisfies ==1.13.0
    assert _plan(venv).startswith("megengine: reinstall (was: megengine==1.13.4+cu118")
    assert _plan(venv, MEGENGINE_INDEX_URL="https://mirror.example/simple").endswith(
        "megengine==1.13.0 --extra-index-url https://mirror.example/simple")
    assert sorted(os.listdir(venv)) == [".engine-megengine"]  # the plan changed nothing
