#!/usr/bin/env python3
"""Make a small ImageNet-layout folder of real photos.

The tool is engine/tools/make_sample_imagenet.py; this script runs it in a checkout, as
`python -m engine.tools.make_sample_imagenet` does from any folder.
"""
import sys

from engine.tools.make_sample_imagenet import main

if __name__ == "__main__":
    sys.exit(main())
