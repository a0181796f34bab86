#!/usr/bin/env python
"""Model throughput: the plain batched train step (eager / SDPA / compiled) vs the upstream loop.

All rows run the same architecture and the same loss (docs/method.md#training-loss) on B locations x 4 views, with a
full optimizer step (Adam; fused on CUDA). "plain batched": every image of the batch through
DINOv2 + Sinkhorn at once, every description through T5 at once (padded, masked max-pool),
one `Text4VPR.forward` under bf16 autocast (fp32 on CPU), with
  eager    - transformers' eager attention in both towers (the issue's 1,251 pairs/s row);
  sdpa     - scaled_dot_product_attention in both towers (T5's relative position bias goes in
             as a float mask), fused AdamW on CUDA (its 1,879 row);
  compiled - sdpa + `model.compile()` (its 3,069 row: the baseline the trainer must beat by 1.3x).
"upstream-style": as the upstream script, one image and one description per encoder call, in
fp32, the text projection in eval mode (batch of one), then the loss on the stacked vectors.
`--config tiny` runs on CPU; `--config paper` (random-init DINOv2-B/14 at 252 px and a
T5-base-shaped encoder, built from configs) is meant for a GPU. The compiled row's first
warm-up step (compilation) is reported apart as `first_step_s`.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from benchmarks.common import V, build_upstream, print_table, step_upstream, time_steps, timed  # noqa: E402
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


PLAIN = ("eager", "sdpa", "compiled")


def step_ours(model, opt, images, ids, mask, amp):
    view_mask = mask.bool().any(-1)  # (B, V): every view present
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        img, txt = model(images, view_mask, ids, mask, views_complete=True)  # (B, V, D) each
        loss = info_nce(img.flatten(0, 1), txt.flatten(0, 1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def build_plain(cfg, device, variant: str):
    """Text4VPR + Adam for one plain variant: attention implementation, fused Adam, compile."""
    torch.manual_seed(0)
    model = Text4VPR(cfg).to(device).train()
    attn = "eager" if variant == "eager" else "sdpa"
    for backbone in (model.image_encoder.backbone, model.text_encoder.backbone):
        backbone.set_attn_implementation(attn)
    fused = device.type == "cuda" and variant != "eager"
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused or None)
    if variant == "compiled":
        model.compile()
    return model, opt


def time_variant(fn, steps: int, warmup: int, device) -> tuple[float, float]:
    """(median step seconds, seconds of the first call: compilation for the compiled row)."""
    first = timed(fn, device)[1]
    return time_steps(fn, steps, max(warmup - 1, 0), device), first


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
    ap.add_argument("--variants", nargs="*", default=list(PLAIN), choices=PLAIN, help="plain batched rows to run")
    ap.add_argument("--no-upstream", action="store_true", help="skip the upstream-style loop")
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
    precision = "bf16" if amp else "fp32"
    if not args.no_upstream:
        model, opt = build_upstream(cfg, device)
        sec = time_steps(lambda: step_upstream(model, opt, images[:ub], ids[:ub], mask[:ub]), args.steps, args.warmup, device)
        rows.append({"method": "upstream-style loop, fp32", "variant": "upstream", "step_s": sec,
                     "pairs_per_s": ub * V / sec, "pairs": ub * V})
        del model, opt
    for variant in args.variants:
        model, opt = build_plain(cfg, device, variant)
        sec, first = time_variant(lambda: step_ours(model, opt, images, ids, mask, amp), args.steps, args.warmup, device)
        rows.append({"method": f"plain batched, {precision}, {variant}", "variant": variant, "step_s": sec,
                     "pairs_per_s": b * V / sec, "pairs": b * V, "first_step_s": first})
        del model, opt
        torch._dynamo.reset()
    base = rows[0]["pairs_per_s"] if rows and rows[0]["variant"] == "upstream" else None
    for r in rows:
        r["speedup"] = r["pairs_per_s"] / base if base else None

    print(f"config={name} device={device} batch={b} locations ({b * V} pairs) text_length={length} "
          f"image={cfg.image.image_size}px threads={torch.get_num_threads()}")
    print_table(["method", "step s", "pairs/s", "vs upstream", "first step s"],
                [[r["method"], r["step_s"], r["pairs_per_s"], f"{r['speedup']:.2f}x" if r["speedup"] else None,
                  r.get("first_step_s")] for r in rows])

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
