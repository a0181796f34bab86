#!/usr/bin/env python
"""Train Text4VPR: `accelerate launch train.py [--config configs/X.yaml] [key.sub=value ...]`,
the same command line as `text4vpr train` (default: the packaged demo)."""

import sys

from text4vpr.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
