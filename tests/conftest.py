"""Fixtures and collection hooks; the shared helpers themselves are in helpers.py."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # so that every test file (and a forked child) can import helpers
    sys.path.insert(0, HERE)

from helpers import ROOT, make_imagenet  # noqa: E402

__all__ = ["ROOT", "make_imagenet"]


_GPU_COUNT = None


def _cuda_gpu_count() -> int:
    """GPUs MegEngine sees, asked in a child process: this process may fork launchers later and
    must not have initialised CUDA."""
    global _GPU_COUNT
    if _GPU_COUNT is None:
        import subprocess

        code = "import megengine as m; print(m.device.get_device_count('gpu'))"
        try:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=300).stdout.split()
            _GPU_COUNT = int(out[-1]) if out else 0
        except (OSError, subprocess.SubprocessError, ValueError):
            _GPU_COUNT = 0
    return _GPU_COUNT


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.gpu tests are skipped, with a reason, where MegEngine sees no CUDA GPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and _cuda_gpu_count() == 0:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (MegEngine sees none)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def tiny_imagenet(tmp_path):
    return make_imagenet(str(tmp_path / "imagenet"))
