#!/usr/bin/env python3
"""Does the installed MegEngine run this engine on these GPUs? (`make gpu-check`).

The tool is engine/tools/gpu_check.py; this script runs it in a checkout, as
`python -m engine.tools.gpu_check` does from any folder.
"""
import sys

from engine.tools.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
