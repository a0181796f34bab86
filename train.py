#!/usr/bin/env python
"""Train Text4VPR: `accelerate launch train.py [--config configs/X.yaml] [key.sub=value ...]`.

With no arguments it runs the packaged demo (text4vpr/configs/demo.yaml): synthetic Street360Loc,
tiny model, CPU-friendly, a few minutes.
"""

import sys

from text4vpr.train import main

if __name__ == "__main__":
    sys.exit(main())
