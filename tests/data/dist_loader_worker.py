"""Run under torchrun (2 processes, gloo): each rank builds loaders with rank/world size taken
from torch.distributed; rank 0 writes what every rank saw to argv[3] as JSON."""

import json
import sys

import torch.distributed as dist

from text4vpr.data.loader import LoaderConfig, batches_per_epoch, build_loader
from text4vpr.utils.distributed import exit_process, shutdown_distributed


def main() -> None:
    shards, tokenizer, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    cfg = LoaderConfig(shards=shards, tokenizer=tokenizer, batch_size=3, image_size=32, num_workers=2,
                       max_text_length=24, shuffle_buffer=4)
    eval_seen = [i for b in build_loader(cfg, "eval") for i in b["index"].tolist()]
    train_steps = sum(1 for _ in build_loader(cfg, "train", epoch=1))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"eval": eval_seen, "train_steps": train_steps, "expected": batches_per_epoch(cfg)})
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    shutdown_distributed()


if __name__ == "__main__":
    exit_process(main() or 0)
