#!/usr/bin/env python3
"""Copy packed shards to a node-local folder, verifying checksums.

The tool is engine/tools/stage_shards.py; this script runs it in a checkout, as
`python -m engine.tools.stage_shards` does from any folder.
"""
import sys

from engine.tools.stage_shards import main

if __name__ == "__main__":
    sys.exit(main())
