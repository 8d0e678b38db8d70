#!/usr/bin/env python3
"""Pack an ImageNet folder into LMDB shards.

The tool is engine/tools/pack_imagenet.py; this script runs it in a checkout, as
`python -m engine.tools.pack_imagenet` does from any folder.
"""
import sys

from engine.tools.pack_imagenet import main

if __name__ == "__main__":
    sys.exit(main())
