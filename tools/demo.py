#!/usr/bin/env python3
"""Run the whole engine on the embedded sample set (`make demo`).

The tool is engine/tools/demo.py; this script runs it in a checkout, as
`python -m engine.tools.demo` does from any folder.
"""
import sys

from engine.tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
