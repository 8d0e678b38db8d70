"""engine.data._jpegroi under AddressSanitizer.

The fuzz test in test_jpegroi.py only notices a memory error that crashes the process; a read
or write a few bytes past a buffer usually does not crash and goes unseen. Here the extension
is rebuilt with -fsanitize=address by setup.py itself (same sources, same libjpeg flags; the
sanitizer comes in through CFLAGS/LDFLAGS, which distutils appends), into a temporary folder,
and test_jpegroi.py (the fuzz corpus, every window and scale, the threaded decodes) and
test_restarts.py (the restart-marker rewrite, and seeking in its files) run
against that build in a child Python with libasan preloaded: an uninstrumented interpreter
needs the ASan runtime loaded first. Any ASan report fails the test.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow

TESTS = os.path.join(ROOT, "tests")
ASAN_FLAGS = "-fsanitize=address -fno-omit-frame-pointer -g"
# Leak checking would report the interpreter's own never-freed allocations at exit.
ASAN_OPTIONS = "detect_leaks=0:abort_on_error=0:exitcode=23"

# The child loads the ASan build under the extension's own module name before anything imports
# engine.data, so that engine.data.decode and test_jpegroi both get it, then runs the tests.
CHILD = textwrap.dedent("""
    import importlib.util, sys
    so, tests = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location("engine.data._jpegroi", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["engine.data._jpegroi"] = mod
    import pytest
    rc = pytest.main(["-q", "-rA", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
                      "--rootdir", tests, *sys.argv[3:]])
    from engine.data import decode, _jpegroi
    assert _jpegroi is mod and decode._jpegroi is mod, "the ASan build was not the one tested"
    print("asan-child: tested", mod.__file__)
    sys.exit(int(rc))
""")

LEAKY_C = r"""
#include <stdlib.h>
int overflow(int n) {
    char *p = malloc(n);
    int v = p[n];  /* one byte past the block: silent without ASan */
    free(p);
    return v;
}
"""


def libasan() -> str:
    """Path of the ASan runtime that gcc links, or skip."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot build an AddressSanitizer extension")
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                          text=True, timeout=60).stdout.strip()
    # gcc echoes the bare name back when it has no such library.
    if not os.path.isabs(path) or not os.path.exists(path):
        pytest.skip("libasan is not installed (Debian: apt-get install libasan8)")
    return os.path.realpath(path)


def asan_env(lib: str) -> dict:
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS=ASAN_OPTIONS, PYTHONPATH=ROOT)
    env.pop("PYTHONSTARTUP", None)
    return env


@pytest.fixture(scope="module")
def asan_so(tmp_path_factory) -> str:
    lib = libasan()
    if not os.path.exists("/usr/include/jpeglib.h"):
        pytest.skip("libjpeg headers not installed: the extension is not built at all")
    out = tmp_path_factory.mktemp("asan")
    env = dict(os.environ, CFLAGS=ASAN_FLAGS, LDFLAGS="-fsanitize=address")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext",
                        "--build-lib", str(out / "lib"), "--build-temp", str(out / "tmp")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    built = [os.path.join(d, f) for d, _, fs in os.walk(out / "lib") for f in fs
             if f.startswith("_jpegroi") and f.endswith(".so")]
    # setup.py turns a failed build into a warning; here it is a failure.
    assert r.returncode == 0 and len(built) == 1, r.stdout[-2000:] + r.stderr[-3000:]
    with open(built[0], "rb") as f:
        assert b"__asan_report" in f.read(), "built without AddressSanitizer instrumentation"
    assert lib  # the runtime exists; the children preload it
    return built[0]


def test_asan_harness_reports_an_overflow(tmp_path):
    """The set-up below (preloaded runtime, options, output check) does catch a one-byte
    heap overread in a C library loaded into Python."""
    lib = libasan()
    src = tmp_path / "leaky.c"
    src.write_text(LEAKY_C)
    so = tmp_path / "leaky.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O0"] + ASAN_FLAGS.split()
                   + [str(src), "-o", str(so)], check=True, timeout=120)
    code = "import ctypes, sys; ctypes.CDLL(sys.argv[1]).overflow(16)"
    r = subprocess.run([sys.executable, "-c", code, str(so)], env=asan_env(lib),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 23 and "heap-buffer-overflow" in r.stderr, r.stderr[-2000:]


def test_jpegroi_tests_pass_under_asan(asan_so):
    lib = libasan()
    r = subprocess.run([sys.executable, "-c", CHILD, asan_so, TESTS,
                        os.path.join(TESTS, "test_jpegroi.py"),
                        os.path.join(TESTS, "test_restarts.py")],
                       cwd=ROOT, env=asan_env(lib), capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert "AddressSanitizer" not in out, out[-6000:]
    assert r.returncode == 0, out[-4000:]
    assert "asan-child: tested " + asan_so in r.stdout
    passed = [l for l in r.stdout.splitlines() if l.startswith("PASSED")]
    assert any("test_fuzz_hostile_input_never_crashes" in l for l in passed), r.stdout[-3000:]
    assert any("test_seeking_reads_only_the_pieces" in l for l in passed), r.stdout[-3000:]
    # pytest's own verdict lines (the packer's log, which the pack tests print, says "skipped")
    verdicts = [l for l in r.stdout.splitlines() if l.startswith(("FAILED", "SKIPPED", "ERROR"))]
    assert not verdicts, "\n".join(verdicts)
