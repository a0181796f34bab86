#!/usr/bin/env python
"""Build WebDataset shards from Street360Loc: same as `text4vpr shards build ...`.

Example: python shards/build_shards.py --xlsx DATA/test_description.xlsx \
    --images DATA/Street360Loc_images --out shards/test --resize 252 --workers 8
"""

import sys
from pathlib import Path

try:
    from text4vpr.cli import main
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from text4vpr.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "build", *sys.argv[1:]]))
