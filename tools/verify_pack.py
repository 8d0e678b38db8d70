#!/usr/bin/env python3
"""Check packed shards against their meta.json.

The tool is engine/tools/verify_pack.py; this script runs it in a checkout, as
`python -m engine.tools.verify_pack` does from any folder.
"""
import sys

from engine.tools.verify_pack import main

if __name__ == "__main__":
    sys.exit(main())
