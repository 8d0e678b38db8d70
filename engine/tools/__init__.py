"""The command-line tools. Each module is one tool: a parser derived from a dataclass (engine.cli)
and one engine call, run as `python -m engine.tools.<name>` from any folder once the package is
installed; in a checkout, tools/<name>.py runs the same `main`.

- train, test, inference: train a classifier, score it on a val set, classify one image;
- pack_imagenet, verify_pack, stage_shards: LMDB shards from an ImageNet folder, checked
  against their meta.json, copied to a node-local disk;
- make_sample_imagenet, demo: the real-photo sample set, and every stage run on it;
- gpu_check: does the installed MegEngine build run this engine on this machine's GPUs?
  (the gpu_check_* modules are its parts, not tools of their own).

Every tool reports a user error as one `error: ...` line with exit status 2, and Ctrl-C as one
line with 130 (engine.errors.run_tool).
"""
import os as _os
import sys as _sys

from engine.errors import defer_startup_interrupts as _defer


def _started_as_program() -> bool:
    """Whether a tool is starting as the program: `python -m engine.tools.NAME` (sys.argv[0] is
    "-m" while the module is being located) or a checkout's tools/NAME.py."""
    if _sys.argv[:1] == ["-m"]:
        return True
    main = getattr(_sys.modules.get("__main__"), "__file__", None)
    checkout_tools = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(
        _os.path.abspath(__file__)))), "tools")
    return main is not None and _os.path.dirname(_os.path.abspath(main)) == checkout_tools


if _started_as_program():
    _defer()  # Ctrl-C during the imports below is answered by run_tool (engine.errors)
