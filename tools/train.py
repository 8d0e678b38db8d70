#!/usr/bin/env python3
"""Train an ImageNet classifier (MegEngine).

The tool is engine/tools/train.py; this script runs it in a checkout, as
`python -m engine.tools.train` does from any folder.
"""
import sys

from engine.tools.train import main

if __name__ == "__main__":
    sys.exit(main())
