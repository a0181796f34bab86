"""Run by test_retrieval_cli.py under `torchrun --nproc_per_node 2` (gloo): distributed
`evaluate`, `build_index`, then `evaluate` from each rank's own rows of that index, on the
synthetic shards. Usage: MODEL SHARDS OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from text4vpr.data.loader import LoaderConfig, build_loader
from text4vpr.models import Text4VPR
from text4vpr.retrieval.evaluate import evaluate
from text4vpr.retrieval.index import build_index, load_index, rank_rows
from text4vpr.utils.distributed import exit_process, shutdown_distributed


def main(model_dir: str, shards: str, out: str) -> int:
    dist.init_process_group("gloo")
    model = Text4VPR.from_pretrained(model_dir)
    cfg = LoaderConfig(shards=shards, tokenizer=model_dir, batch_size=4, image_size=56, num_workers=0)
    results = {mode: evaluate(model, build_loader(cfg, "eval"), (1, 2, 5), (5, 10, 30, 1000), mode).metrics
               for mode in ("upstream", "cosine", "any-heading")}
    header = build_index(model, build_loader(cfg, "eval"), Path(out) / "index")
    rows = rank_rows(header["count"], dist.get_rank(), dist.get_world_size())
    index = load_index(Path(out) / "index", model.config_hash(), model.embed_dim, rows=rows)
    from_index = evaluate(model, build_loader(cfg, "eval"), (1, 2, 5), (5, 10, 30, 1000), "upstream", index=index).metrics
    if dist.get_rank() == 0:
        (Path(out) / "metrics.json").write_text(json.dumps({"metrics": results, "header": header, "from_index": from_index}))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main(*sys.argv[1:4]) or 0)
