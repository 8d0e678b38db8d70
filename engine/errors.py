"""The one base class for problems a user can fix (bad paths, wrong flags, damaged data, a full
disk, mismatched checkpoints).

Every tool catches `UserError` once, prints `error: <message>` on one line and exits with status
2; anything else is a bug and keeps its traceback. The data side's errors (`LayoutError`,
`ShardError`, `PackError`) subclass it, so a tool never needs to know which layer raised.
This module imports nothing, so `engine.data` can use it without pulling in MegEngine.
"""
from __future__ import annotations

# Not typing: a tool imports this module before Ctrl-C is deferred (defer_startup_interrupts),
# and typing alone takes a tenth of a second on a loaded machine.
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; the message says what was wrong and what to do."""


# A tool program's Ctrl-C outside run_tool: [deferred (defer_startup_interrupts), pressed since].
_deferred = [False, False]


def _note_interrupt(signum: int, frame: object) -> None:
    _deferred[1] = True


def defer_startup_interrupts() -> None:
    """For a tool started as a program, before its imports (engine.tools does this): outside
    run_tool, Ctrl-C is noted rather than raised. The next run_tool answers a noted one like any
    other (one line, 130); one noted after the last, while the interpreter exits, is dropped.

    Raised inside an import, a KeyboardInterrupt can come out as an ImportError of a half-
    initialised extension, or a traceback before any handler exists; raised while the
    interpreter exits (joining worker processes), as "Exception ignored" tracebacks.
    """
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _note_interrupt)
        _deferred[0] = True


# Whether a run_tool body is running, for the redelivery of a Ctrl-C a finaliser swallowed.
_in_body = [False]


def _redeliver_soon() -> None:
    import _thread
    import time

    time.sleep(0.001)  # long enough for the main thread to leave the finaliser
    if _in_body[0]:
        _thread.interrupt_main()


def _keep_swallowed_interrupts(previous: Callable[..., object]) -> Callable[..., None]:
    """A sys.unraisablehook for while a body runs. Ctrl-C raised inside a finaliser (a __del__
    such as multiprocessing's Connection's, a weakref callback) is printed as "Exception ignored"
    and dropped by Python, and the program runs on as if never interrupted: a loop over Loaders
    then never stops. Such an interrupt is delivered again, from a short-lived thread, once the
    finaliser is left (a thread, because raised from here it would only be dropped again);
    everything else goes to `previous`."""
    import _thread

    def hook(args: object) -> None:
        kind = getattr(args, "exc_type", None)
        if isinstance(kind, type) and issubclass(kind, KeyboardInterrupt):
            _thread.start_new_thread(_redeliver_soon, ())
        else:
            previous(args)
    return hook


def run_tool(body: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """A tool's main: `body()`'s exit status (None = 0); a UserError becomes one `error:` line
    and status 2, Ctrl-C one line (`interrupted`) and status 130; anything else is a bug and
    keeps its traceback. MegEngine's cache folder is checked just before `body` first imports
    MegEngine (engine.megengine_env), so a bad MGE_HOME is one line too, and MegEngine's
    CUDA-probing lines on a CPU machine are kept out of the output unless ENGINE_VERBOSE=1."""
    import signal
    import sys

    from engine.megengine_env import guard_import, quiet_megengine

    program = _deferred[0] and signal.getsignal(signal.SIGINT) is _note_interrupt
    hook = sys.unraisablehook
    try:
        if program:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if _deferred[1]:  # pressed before this call
                _deferred[1] = False
                raise KeyboardInterrupt
        guard_import(UserError)
        quiet_megengine()
        sys.unraisablehook, _in_body[0] = _keep_swallowed_interrupts(hook), True
        try:
            status = body()
        finally:
            sys.unraisablehook, _in_body[0] = hook, False
    except UserError as exc:
        print("error: %s" % " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if program:  # the answer is being given: another Ctrl-C must not cut into it
            signal.signal(signal.SIGINT, _note_interrupt)
        print(interrupted, file=sys.stderr)
        return 130
    finally:
        if program:
            signal.signal(signal.SIGINT, _note_interrupt)
    return status or 0


def disk_error_message(exc: OSError, path: str, needed: int = 0) -> str:
    """One line for an OSError met while writing `path` (full disk, read-only, permissions)."""
    import errno
    import os
    import shutil

    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(
                exc.errno, exc.strerror or str(exc))
    msg = "cannot write %s: %s" % (path, what)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        try:
            free = shutil.disk_usage(folder).free
            msg += " (%.1f MB free there" % (free / 1e6)
            msg += ", about %.1f MB needed)" % (needed / 1e6) if needed else ")"
        except OSError:
            pass
        msg += "; free some space or choose another folder, then rerun"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        msg += "; choose a writable folder"
    return msg



def read_error_message(exc: OSError, path: str) -> str:
    """One line for an OSError met while reading `path`, naming it; for a permission problem,
    whose file it is, its mode and what makes it readable (files another user packed or trained
    are the usual case on shared storage)."""
    import errno
    import os
    import stat

    if exc.errno not in (errno.EACCES, errno.EPERM):
        return "cannot read %s: %s" % (path, exc.strerror or exc)
    msg = "cannot read %s: permission denied" % path
    try:
        st = os.stat(path)
    except OSError:  # not even stat-able: a folder above it is closed to this user
        return msg + " (a folder above it does not let this user in); ask its owner to open " \
                     "the folders on the way to it (chmod a+rx, or g+rx for a shared group)"
    folder = stat.S_ISDIR(st.st_mode)
    return ("%s (%s mode %04o, owner uid %d, group gid %d; this process runs as uid %d); ask "
            "its owner to make it readable (chmod %s, or %s for a shared group)"
            % (msg, "folder" if folder else "file", stat.S_IMODE(st.st_mode), st.st_uid,
               st.st_gid, os.geteuid(), "a+rx" if folder else "a+r", "g+rx" if folder else "g+r"))

_SIGNAL_CAUSES = {
    "SIGKILL": "usually the out-of-memory killer: %s",
    "SIGBUS": "a memory-mapped file was truncated or replaced under it, or its disk filled up: "
              "check the data with tools/verify_pack.py",
    "SIGSEGV": "a crash in native code",
    "SIGTERM": "something outside the engine stopped it",
}


def describe_exit(code: int | None,
                  memory_fix: str = "lower the worker count or the batch size") -> str:
    """How a child process ended, from its exit code as multiprocessing reports it (negative:
    the signal that killed it), with what the user can do about a signal: 'was killed by signal
    9 and exited unexpectedly with code -9 (SIGKILL: usually the out-of-memory killer: ...)'.
    `memory_fix` is the advice for the out-of-memory killer, in the caller's own terms."""
    import signal

    if code is None:
        return "stopped answering but has not exited"
    if code >= 0:
        return "exited unexpectedly with code %d" % code
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return "was killed by signal %d and exited unexpectedly with code %d" % (-code, code)
    cause = _SIGNAL_CAUSES.get(name)
    if cause and "%s" in cause:
        cause = cause % memory_fix
    return "was killed by signal %d and exited unexpectedly with code %d (%s)" % (
        -code, code, "%s: %s" % (name, cause) if cause else name)


class ConfigError(UserError, ValueError):
    """An argument out of range or of the wrong kind (a file where a folder is expected)."""


class DataError(UserError, RuntimeError):
    """Data that cannot be read as promised: damaged records, a shard changed while in use."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the user named does not exist."""
