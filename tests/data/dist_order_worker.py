"""Run under torchrun (gloo): every rank builds train loaders for epochs 0 and 1 with 0, 1 and 3
workers; rank 0 writes {workers: {epoch: [global batch location ids]}} to argv[4] as JSON."""

import json
import sys

import torch.distributed as dist

from text4vpr.data.loader import LoaderConfig, build_loader
from text4vpr.utils.distributed import exit_process, shutdown_distributed


def main() -> None:
    shards, tokenizer, global_batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    seen = {}
    for workers in (0, 1, 3):
        cfg = LoaderConfig(shards=shards, tokenizer=tokenizer, batch_size=global_batch // world, image_size=16,
                           num_workers=workers, max_text_length=16, shuffle_window=3)
        seen[workers] = {e: [b["index"].tolist() for b in build_loader(cfg, "train", epoch=e)] for e in (0, 1)}
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    if dist.get_rank() == 0:  # global batch j: every rank's batch j, in rank order
        result = {w: {e: [sum((r[w][e][j] for r in gathered), []) for j in range(len(seen[w][e]))] for e in (0, 1)}
                  for w in (0, 1, 3)}
        with open(out, "w") as f:
            json.dump(result, f)
    shutdown_distributed()


if __name__ == "__main__":
    exit_process(main() or 0)
