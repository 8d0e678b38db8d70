"""Installing without root: tools/bootstrap.sh finds libjpeg-turbo where a user has it (a conda
prefix, TURBOJPEG_LIB), builds the ROI decoder against headers found there, skips it with one
line where there are none, and stops with the ways to get the runtime library when it is nowhere.
The script's checks run as the unprivileged user `nobody` (the engine's own Python lives where
nobody cannot read it, so the engine and the build run as this user with only the environment a
user would set); the system's own copies are hidden in a private mount namespace where a case
needs them gone."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import ROOT

BOOTSTRAP = os.path.join(ROOT, "tools", "bootstrap.sh")
SYS_LIB = "/usr/lib/x86_64-linux-gnu"
AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare")
    or not os.path.exists(os.path.join(SYS_LIB, "libturbojpeg.so.0"))
    or not os.path.exists("/usr/include/jpeglib.h"),
    reason="needs root (to become nobody and hide the system's copies), setpriv, unshare and "
           "the system's libjpeg-turbo to copy into a user prefix")


def _can_unshare():
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def prefix():
    """A conda-like prefix of a user's own: libjpeg-turbo's libraries and headers, readable by
    nobody; and one with the runtime library only."""
    top = tempfile.mkdtemp(prefix="engine-prefix-")
    full, lib_only = os.path.join(top, "full"), os.path.join(top, "libonly")
    for p in (full, lib_only):
        os.makedirs(os.path.join(p, "lib"))
        for f in glob.glob(os.path.join(SYS_LIB, "libturbojpeg.so*")) + \
                glob.glob(os.path.join(SYS_LIB, "libjpeg.so*")):
            shutil.copy(f, os.path.join(p, "lib"), follow_symlinks=True)
    os.makedirs(os.path.join(full, "include"))
    for h in ("jpeglib.h", "jmorecfg.h", "jerror.h"):
        shutil.copy(os.path.join("/usr/include", h), os.path.join(full, "include"))
    jconfig = glob.glob("/usr/include/*/jconfig.h") + glob.glob("/usr/include/jconfig.h")
    shutil.copy(jconfig[0], os.path.join(full, "include"))
    for d, dirs, files in os.walk(top):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o755)
    yield full, lib_only
    shutil.rmtree(top, ignore_errors=True)


def as_nobody(cmd, env=None, hide=(), timeout=300, user=True):
    """Run cmd as nobody (`user`), with only `env` set beyond a minimal environment; each path
    in `hide` is covered by an empty folder (or /dev/null) in a private mount namespace first."""
    base = {"PATH": os.environ["PATH"], "HOME": "/tmp", "PYTHONPATH": ROOT, "LANG": "C.UTF-8"}
    inner = (AS_NOBODY if user else []) + ["env", "-i"] + [
        "%s=%s" % kv for kv in {**base, **(env or {})}.items()]
    if not hide:
        full = inner + list(cmd)
    else:
        if not _can_unshare():
            pytest.skip("no private mount namespace here (unshare -m refused)")
        empty = tempfile.mkdtemp(prefix="engine-empty-")
        mounts = " && ".join("mount --bind %s %s" % ("/dev/null" if os.path.isfile(h) else empty,
                                                     h) for h in hide)
        full = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                mounts + ' && exec "$@"', "sh"] + inner + list(cmd)
    p = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def test_as_nobody_a_conda_prefix_is_found_for_the_library_and_the_headers(prefix):
    full, _ = prefix
    rc, out, err = as_nobody([BOOTSTRAP, "--check-jpeg"], env={"CONDA_PREFIX": full})
    assert rc == 0, out + err
    assert "libturbojpeg: %s/lib/libturbojpeg.so.0 (from CONDA_PREFIX)" % full in out
    assert "ROI decoder: built against %s/include (from CONDA_PREFIX, linking %s/lib)" \
        % (full, full) in out
    assert "apt-get install" not in out.replace("as root: apt-get install libturbojpeg0 "
                                                "libjpeg62-turbo-dev", "")


def test_as_nobody_without_headers_the_roi_decoder_is_skipped_in_one_line(prefix):
    _, lib_only = prefix
    lib = os.path.join(lib_only, "lib", "libturbojpeg.so.0")
    hide = ["/usr/include/jpeglib.h"] + glob.glob("/usr/local/include/jpeglib.h")
    rc, out, err = as_nobody([BOOTSTRAP, "--check-jpeg"], env={"TURBOJPEG_LIB": lib}, hide=hide)
    assert rc == 0, out + err
    lines = out.strip().splitlines()
    assert lines[0] == "libturbojpeg: %s (from TURBOJPEG_LIB)" % lib
    skipped = [line for line in lines if line.startswith("ROI decoder:")]
    assert len(skipped) == 1 and "skipped" in skipped[0] and "PyTurboJPEG" in skipped[0]
    assert "conda install -c conda-forge libjpeg-turbo" in skipped[0]


def test_as_nobody_without_the_runtime_library_it_stops_saying_how_to_get_it(prefix):
    hide = [os.path.realpath(os.path.join(SYS_LIB, "libturbojpeg.so.0"))]
    rc, out, err = as_nobody([BOOTSTRAP, "--check-jpeg"], hide=hide)
    assert rc == 1, out + err
    last = out.strip().splitlines()[-1]
    assert last.startswith("cannot continue: libturbojpeg")
    for way in ("conda install -c conda-forge libjpeg-turbo", "module load libjpeg-turbo",
                "TURBOJPEG_LIB="):
        assert way in last


def test_the_engine_decodes_with_the_users_own_library(prefix):
    full, _ = prefix
    lib = os.path.join(full, "lib", "libturbojpeg.so.0")
    code = ("import cv2, numpy as np\n"
            "from engine.data.decode import decode_bgr\n"
            "ok, buf = cv2.imencode('.jpg', np.full((16, 24, 3), 90, np.uint8))\n"
            "assert decode_bgr(buf.tobytes()).shape == (16, 24, 3)\n"
            "print(''.join(l for l in open('/proc/self/maps') if 'libturbojpeg' in l))\n")
    rc, out, err = as_nobody([sys.executable, "-c", code], env={"TURBOJPEG_LIB": lib},
                             user=False)
    assert rc == 0, err
    assert lib in out and SYS_LIB + "/libturbojpeg" not in out


def test_the_roi_decoder_builds_against_the_users_prefix(prefix):
    full, _ = prefix
    build = tempfile.mkdtemp(prefix="engine-build-")
    os.chmod(build, 0o777)
    hide = ["/usr/include/jpeglib.h"]
    rc, out, err = as_nobody([sys.executable, "setup.py", "-q", "build_ext", "--build-lib",
                              os.path.join(build, "lib"), "--build-temp",
                              os.path.join(build, "tmp")],
                             env={"CONDA_PREFIX": full}, hide=hide, user=False)
    try:
        assert rc == 0, out + err
        (so,) = glob.glob(os.path.join(build, "lib", "engine", "data", "_jpegroi*.so"))
        deps = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
        assert "%s/lib/libjpeg.so" % full in deps, deps  # linked and run against the prefix
    finally:
        shutil.rmtree(build, ignore_errors=True)
