#!/usr/bin/env python
"""Model throughput: our batched train step vs an upstream-style one-item-at-a-time loop.

Both run the same architecture and the same SPEC loss on B locations x 4 views, with a full
optimizer step (Adam). "ours": every image of the batch through DINOv2 + Sinkhorn at once,
every description through T5 at once (padded, masked max-pool). "upstream-style": as the
upstream script, one image and one description per encoder call, in fp32, the text
projection in eval mode (batch of one), then the loss on the stacked vectors.
`--config tiny` runs on CPU; `--config paper` (random-init DINOv2-B/14 at 252 px and a
T5-base-shaped encoder, built from configs) is meant for a GPU.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from benchmarks.common import V, build_upstream, step_upstream, time_steps  # noqa: E402
from text4vpr.losses import info_nce  # noqa: E402
from text4vpr.models import Text4VPR, paper_config, tiny_config  # noqa: E402
from text4vpr.utils.atomic import atomic_write_json  # noqa: E402


def make_batch(cfg, b: int, length: int, device):
    g = torch.Generator().manual_seed(0)
    size = cfg.image.image_size
    images = torch.randn(b, V, 3, size, size, generator=g)  # (B, V, 3, H, W)
    ids = torch.randint(3, cfg.text.vocab_size, (b, V, length), generator=g)  # (B, V, L)
    lengths = torch.randint(length // 2, length + 1, (b, V, 1), generator=g)
    mask = (torch.arange(length)[None, None] < lengths).long()
    return images.to(device), ids.to(device), mask.to(device)


def step_ours(model, opt, images, ids, mask, amp):
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        img = model.encode_images(images)  # (B, V, D)
        txt = model.encode_texts(ids, mask)  # (B, V, D)
        loss = info_nce(img.flatten(0, 1), txt.flatten(0, 1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def build(cfg, device, upstream: bool):
    if upstream:  # upstream: batch of one, so the projection ran in eval mode, never trained
        return build_upstream(cfg, device)
    torch.manual_seed(0)
    model = Text4VPR(cfg).to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["tiny", "paper"], default=None, help="default: paper on CUDA, else tiny")
    ap.add_argument("--batch", type=int, default=None, help="locations per step (default 16 tiny, 64 paper)")
    ap.add_argument("--text-length", type=int, default=None, help="tokens (default 48 tiny, 128 paper)")
    ap.add_argument("--upstream-batch", type=int, default=None,
                    help="locations per upstream-style step (default: --batch; its cost per pair does not depend on it)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for ours (default on CUDA)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.config or ("paper" if device.type == "cuda" else "tiny")
    cfg = paper_config() if name == "paper" else tiny_config(vocab_size=300, image_size=56)
    b = args.batch or (64 if name == "paper" else 16)
    length = args.text_length or (128 if name == "paper" else 48)
    amp = args.amp or device.type == "cuda"
    images, ids, mask = make_batch(cfg, b, length, device)

    rows = []
    ub = min(args.upstream_batch or b, b)
    upstream_step = lambda model, opt, images, ids, mask, amp: step_upstream(  # noqa: E731
        model, opt, images[:ub], ids[:ub], mask[:ub])
    for label, fn, use_amp, upstream, n in (("upstream-style loop, fp32", upstream_step, False, True, ub),
                                            (f"ours batched{', bf16' if amp else ', fp32'}", step_ours, amp, False, b)):
        model, opt = build(cfg, device, upstream)
        sec = time_steps(lambda: fn(model, opt, images, ids, mask, use_amp), args.steps, args.warmup, device)
        rows.append({"method": label, "step_s": sec, "pairs_per_s": n * V / sec, "pairs": n * V})
        del model, opt
    base = rows[0]["pairs_per_s"]
    for r in rows:
        r["speedup"] = r["pairs_per_s"] / base

    print(f"config={name} device={device} batch={b} locations ({b * V} pairs) text_length={length} "
          f"image={cfg.image.image_size}px threads={torch.get_num_threads()}")
    print(f"{'method':34s} {'step s':>9s} {'pairs/s':>10s} {'speedup':>8s}")
    for r in rows:
        print(f"{r['method']:34s} {r['step_s']:9.3f} {r['pairs_per_s']:10.1f} {r['speedup']:7.2f}x")

    out = Path(args.out or f"benchmarks/results/bench_model_{name}_{device.type}.json")
    atomic_write_json(out, {
        "config": name, "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "batch_locations": b, "upstream_batch_locations": ub, "pairs": b * V, "text_length": length, "image_size": cfg.image.image_size,
        "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__, "platform": platform.platform(),
        "threads": torch.get_num_threads(), "results": rows,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
