"""2-rank worker (torchrun): one Trainer.step with a different number of views per rank; writes
the pair count the step reports and the true global count (pairs-rank<r>.json)."""

import json
import sys
from pathlib import Path

from text4vpr.config import load_config
from text4vpr.train.config import RunConfig
from text4vpr.train.trainer import Trainer
from text4vpr.utils.distributed import leave

REPO = Path(__file__).resolve().parents[2]

cache, out = sys.argv[1], sys.argv[2]
cfg = load_config(RunConfig, REPO / "configs" / "tiny_test.yaml",
                  [f"data.synthetic.cache_dir={cache}", f"train.output_dir={out}", "train.max_steps=1", "eval.final=false"])
trainer = Trainer(cfg)
rank = trainer.acc.process_index
batch = next(iter(trainer.epoch_loader(0, 0)))
batch["view_mask"][0, rank + 1:] = False  # rank r keeps r + 1 views of its first location
local = int(batch["view_mask"].sum())
_, pairs, _ = trainer.step(batch)
import torch.distributed as dist  # noqa: E402

counts = [None] * dist.get_world_size()
dist.all_gather_object(counts, local)
# one file per rank: two ranks printing at once can share a line
Path(out, f"pairs-rank{rank}.json").write_text(json.dumps({"rank": rank, "reported": pairs, "true": sum(counts)}))
trainer.log.close()
leave(0)  # ranks leave together, skipping gloo's exit-time teardown (utils.distributed.exit_process)
