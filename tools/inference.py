#!/usr/bin/env python3
"""Classify one image, printing the official inference.py lines.

The tool is engine/tools/inference.py; this script runs it in a checkout, as
`python -m engine.tools.inference` does from any folder.
"""
import sys

from engine.tools.inference import main

if __name__ == "__main__":
    sys.exit(main())
