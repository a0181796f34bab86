"""Test worker: `train.py ARGS` under DeepSpeed on CPU, with no C++ op compiled at run time.

On the CPU accelerator DeepSpeed's communication backend JIT-compiles its shared-memory
all-reduce op (`deepspeed_shm_comm`, minutes of g++ on a first run) whenever that op
probes as compatible. Declaring no op compatible makes DeepSpeed use torch.distributed
(gloo) as it does on any machine without the op; the run is the same single-process
ZeRO-2 step. The test optimizer is the trainer's torch AdamW, so nothing else compiles.
"""

import os
import runpy
import sys

import deepspeed.ops

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "train.py")

deepspeed.ops.__compatible_ops__ = {}  # the probe result DeepSpeed consults before building an op
sys.argv = [TRAIN, *sys.argv[1:]]
sys.path[0] = os.path.dirname(os.path.abspath(TRAIN))
runpy.run_path(TRAIN, run_name="__main__")
