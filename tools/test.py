#!/usr/bin/env python3
"""Top-1 / top-5 of a model on a val set.

The tool is engine/tools/test.py; this script runs it in a checkout, as
`python -m engine.tools.test` does from any folder.
"""
import sys

from engine.tools.test import main

if __name__ == "__main__":
    sys.exit(main())
