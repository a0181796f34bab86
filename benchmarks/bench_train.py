#!/usr/bin/env python
"""Training throughput: the real step from shards vs in memory vs the upstream-style loop.

One run measures, with the trainer's own pieces (`text4vpr.train.data` for data and loaders,
`text4vpr.train.model.build_model`, `ContrastiveLoss`, `build_optimizer` (AdamW),
`text4vpr.train.step.plain_backward` under Accelerate's autocast):
  (a) full step fed from shards through the real loader (decode, tokenise, copy included):
      pairs/s over the timed steps (loader waits included) and the median step time;
  (b) model only: the same step on one batch already on the device;
  (c) the upstream-style loop of the same architecture (one image and one description per
      encoder call, fp32, same loss over the batch's pairs; `benchmarks/common.py`);
  (d) cached epochs (`train.frozen_cache=true`, the trainer's `FrozenTrunkCache`): one untimed
      epoch fills the cache of the frozen DINOv2 blocks' tokens, then steps of later epochs
      (all hits) run only the trained blocks, the aggregation and the text tower; from shards
      as (a), and model only as (b). The loader still decodes the images (the trainer's does);
  (e) loader capacity: batches/s the train loader alone delivers, against the step's demand
      (1 / model-only step time).
Ratios are against (c). Writes JSON.

MFU = FLOPs per step / step time / measured dense matmul rate (bf16 8192^3 torch.matmul on
CUDA, timed in the same run; fp32 on CPU, for reference only). FLOPs (multiply-add = 2),
per present view / description, with the shapes read from the built model:
  image, n = 1 + h*w tokens of width C, MLP ratio m, patch p:
    patch embedding   2*h*w*(3*p*p)*C
    each DINOv2 block 2*n*(4*C^2 + 2*m*C^2) + 4*n^2*C        (q,k,v,o + MLP; QK^T and AV)
    aggregation       2*h*w*(C*H + H*Dc) + 2*h*w*(C*H + H*K) + 2*Dc*K*h*w   (two 1x1 conv heads, einsum)
  text, L = padded tokens as fed to the model (max_text_length unless dynamic padding), width d,
  inner = heads*d_kv, FFN f (x3 when gated):
    each T5 layer     2*L*(4*d*inner + 2*d*f) + 4*L^2*inner
    head              2*d*E + per residual layer 2*(4*E^2 + 2*E*F_res)   (sequence of one)
  loss, P pairs       2*P^2*E (the logits)
  step = 1 x (patch embedding + frozen blocks)   [no gradient]
       + 3 x (trained blocks + aggregation + text head + loss)   [forward + backward = 3x forward]
       + 3 x T5 layers if T5 is trained, else 1 x.
  A cached step drops the 1 x term. Norms, softmax, Sinkhorn and the optimizer are not counted.

    python benchmarks/bench_train.py                                   # tiny config, CPU, ~1-2 min
    python benchmarks/bench_train.py --config configs/street360loc.yaml --device cuda \\
        data.synthetic.locations=1200 data.synthetic.image_size=252     # paper shapes, random init
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from benchmarks.common import V, build_upstream, gemm_tflops, machine, print_table, step_upstream, sync, time_steps  # noqa: E402
from text4vpr.config import load_config  # noqa: E402
from text4vpr.data.transforms import normalize_images  # noqa: E402
from text4vpr.losses import ContrastiveLoss  # noqa: E402
from text4vpr.train.config import RunConfig, TrainConfig  # noqa: E402
from text4vpr.train.data import prepare_data, train_loader  # noqa: E402
from text4vpr.train.model import build_model  # noqa: E402
from text4vpr.train.optim import build_optimizer  # noqa: E402
from text4vpr.train.step import cached_backward, plain_backward  # noqa: E402
from text4vpr.utils.atomic import atomic_write_json  # noqa: E402

DEFAULT_CONFIG = "configs/tiny_test.yaml"
TINY_OVERRIDES = ["data.synthetic.locations=160", "data.loader.batch_size=16"]  # 7 batches per epoch
PARTS = ("full", "model", "cached", "upstream", "loader")


# ----------------------------------------------------------------------------- setup


def load_run_config(args, device: torch.device) -> RunConfig:
    """YAML + overrides; the device decides train.cpu (and fp32 on CPU); synthetic data when no
    shards are given (random-init model of the config's shapes: nothing is downloaded)."""
    base = TINY_OVERRIDES if args.config == DEFAULT_CONFIG else []
    dev = ["train.cpu=true", "train.mixed_precision='no'"] if device.type == "cpu" else ["train.cpu=false"]
    cfg = load_config(RunConfig, args.config, base + dev + list(args.overrides))
    d = cfg.data
    if not d.train_shards and d.synthetic.locations <= 0:
        batches = args.warmup + args.steps + args.loader_batches
        d.synthetic.locations = math.ceil(batches * d.loader.batch_size / 0.7) + 8
        d.synthetic.image_size = d.loader.image_size
        print(f"no shards given: synthetic data, {d.synthetic.locations} locations at {d.synthetic.image_size} px")
    return cfg


class Setup:
    """Accelerator, data, model, loss and optimizer exactly as the trainer builds them."""

    def __init__(self, cfg: RunConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cfg.train.cpu)
        set_seed(cfg.train.seed)
        self.device = self.acc.device
        self.paths = prepare_data(cfg.data, self.acc)
        model, self.tokenizer = build_model(cfg.model, self.paths.tokenizer, cfg.data.loader, cfg.train, 1)
        self.loss_fn = ContrastiveLoss(**dataclasses.asdict(cfg.loss)).to(self.device)
        optimizer = build_optimizer(model, cfg.optim, extra=list(self.loss_fn.parameters()))
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.raw = self.acc.unwrap_model(self.model)

    def to_device(self, batch: dict) -> dict:
        """As the trainer does: host-side flags first, then the tensors to the device."""
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        return {**out, "views_complete": bool(batch["view_mask"].all()), "index_host": batch["index"].tolist()}

    def step(self, batch: dict, cache=None) -> float:
        """The trainer's step (`Trainer.step` minus its bookkeeping): cached frozen tokens, forward,
        backward, the gradient norm (clipped when optim.grad_clip > 0), the finite check, AdamW."""
        self.model.train()
        if cache is not None:
            with self.acc.autocast():
                batch = {**batch, "frozen_tokens": cache.tokens(batch, batch["index_host"])}
        if self.cfg.train.micro_batches > 1:
            loss = cached_backward(self.model, batch, self.loss_fn, self.acc.backward, self.acc.autocast,
                                   self.cfg.train.micro_batches, self.acc.no_sync)
        else:
            loss = plain_backward(self.model, batch, self.loss_fn, self.acc.backward, self.acc.autocast)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), clip)
        if bool(torch.isfinite(loss)) and bool(torch.isfinite(torch.as_tensor(grad_norm))):  # syncs, as the trainer's check
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def batches(self, first_epoch: int = 0):
        """Endless train batches, epoch after epoch (a fresh loader per epoch, as the trainer does)."""
        for epoch in itertools.count(first_epoch):
            yield from train_loader(self.paths, self.cfg.data.loader, self.acc, epoch, 0)


# ----------------------------------------------------------------------------- measurements


def measure_full(s: Setup, steps: int, warmup: int, cache=None) -> dict:
    """(a) Steps fed by the loader: total pairs / total time, loader waits included. With a
    frozen-trunk cache (d), one untimed epoch fills it first, so every timed step is a hit."""
    first_epoch = 0
    if cache is not None:
        for batch in train_loader(s.paths, s.cfg.data.loader, s.acc, 0, 0):
            s.step(s.to_device(batch), cache)
        first_epoch = 1
    stream = s.batches(first_epoch)
    times, waits, pairs = [], [], 0
    for i in range(warmup + steps):
        sync(s.device)
        t0 = time.perf_counter()
        host = next(stream)
        t1 = time.perf_counter()
        s.step(s.to_device(host), cache)
        sync(s.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            waits.append(t1 - t0)
            pairs += int(host["view_mask"].sum())
    total = sum(times)
    out = {"pairs_per_s": pairs / total, "step_s": statistics.median(times), "steps": steps,
           "loader_wait_fraction": sum(waits) / total, "pairs": pairs}
    if cache is not None:
        st = cache.stats()
        out.update(cache_stats=st, cache_bytes_per_1000_locations=st["bytes"] / max(st["locations"], 1) * 1000)
    return out


def measure_model_only(s: Setup, batch: dict, steps: int, warmup: int, cache=None) -> dict:
    """(b) The same step on one batch already on the device (with a cache: its hits only)."""
    if cache is not None:
        s.step(batch, cache)  # fills the cache for this batch
    sec = time_steps(lambda: s.step(batch, cache), steps, warmup, s.device)
    return {"pairs_per_s": int(batch["view_mask"].sum()) / sec, "step_s": sec, "steps": steps}


def frozen_cache(s: Setup):
    """(cache or None, note): the trainer's FrozenTrunkCache, as train.frozen_cache=true builds it."""
    if "frozen_cache" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return None, "not available: train.frozen_cache is not in this trainer"
    from text4vpr.train.frozen_cache import FrozenCacheError, FrozenTrunkCache

    t = s.cfg.train
    try:
        device = s.device if t.frozen_cache_device == "auto" else t.frozen_cache_device
        return FrozenTrunkCache(s.raw, device, t.frozen_cache_dtype), f"train.frozen_cache, dtype {t.frozen_cache_dtype}"
    except FrozenCacheError as e:
        return None, f"not available: {e}"


def measure_upstream(s: Setup, batch: dict, locations: int, steps: int, warmup: int) -> dict:
    """(c) One image / one description per call, fp32, on the first `locations` of the batch."""
    model, opt = build_upstream(s.raw.config, s.device)
    images = normalize_images(batch["images"][:locations]) if batch["images"].dtype == torch.uint8 \
        else batch["images"][:locations].float()
    ids, mask = batch["input_ids"][:locations], batch["attention_mask"][:locations]
    sec = time_steps(lambda: step_upstream(model, opt, images, ids, mask, s.loss_fn), steps, warmup, s.device)
    del model, opt
    return {"pairs_per_s": locations * V / sec, "step_s": sec, "steps": steps, "locations": locations}


def measure_loader(s: Setup, batches: int) -> dict:
    """(e) The loader alone: batches/s from its first batch (worker start-up excluded)."""
    stream = s.batches(first_epoch=1)
    next(stream)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        next(stream)
        n += 1
    sec = time.perf_counter() - t0
    return {"batches_per_s": n / sec, "batches": n, "workers": s.cfg.data.loader.num_workers}


# ----------------------------------------------------------------------------- FLOPs


def step_flops(model, batch: dict, cached: bool = False) -> dict:
    """FLOPs of one training step by the formula in the module docstring."""
    img_n = int(batch["view_mask"].sum())
    txt_n = int(batch["attention_mask"].bool().any(-1).sum())
    L = batch["input_ids"].shape[-1]
    enc = model.image_encoder
    bc = enc.backbone.config
    C, m, p = bc.hidden_size, bc.mlp_ratio, bc.patch_size
    hw = (batch["images"].shape[-2] // p) * (batch["images"].shape[-1] // p)
    n = 1 + hw
    block = 2 * n * (4 * C * C + 2 * m * C * C) + 4 * n * n * C
    patch = 2 * hw * 3 * p * p * C
    a = model.config.aggregation
    agg = 2 * hw * (C * a.hidden_dim + a.hidden_dim * a.cluster_dim) + 2 * hw * (C * a.hidden_dim + a.hidden_dim * a.num_clusters) \
        + 2 * a.cluster_dim * a.num_clusters * hw
    tc = model.text_encoder.backbone.config
    inner = tc.num_heads * tc.d_kv
    ffn = (3 if getattr(tc, "is_gated_act", False) else 2) * tc.d_model * tc.d_ff
    t5_layer = 2 * L * (4 * tc.d_model * inner + ffn) + 4 * L * L * inner
    E = model.config.embed_dim
    t = model.config.text
    head = 2 * tc.d_model * E + len(model.text_encoder.layers) * 2 * (4 * E * E + 2 * E * t.residual_ff)
    t5_trained = any(q.requires_grad for q in model.text_encoder.backbone.parameters())
    frozen = 0 if cached else img_n * (patch + enc.num_frozen * block)
    trained_img = img_n * ((bc.num_hidden_layers - enc.num_frozen) * block + agg)
    t5 = txt_n * tc.num_layers * t5_layer
    loss = 2 * img_n * img_n * E
    total = frozen + 3 * (trained_img + txt_n * head + loss) + (3 if t5_trained else 1) * t5
    return {"total": float(total), "frozen_image_fwd": float(frozen), "trained_image_fwd": float(trained_img),
            "t5_fwd": float(t5), "text_head_fwd": float(txt_n * head), "loss_fwd": float(loss),
            "t5_trained": t5_trained, "text_tokens_per_description": L}


# ----------------------------------------------------------------------------- driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"run config YAML (default {DEFAULT_CONFIG}, "
                   f"with {' '.join(TINY_OVERRIDES)})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=int, default=20, help="timed steps of (a), (b), (d)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--upstream-steps", type=int, default=2, help="timed steps of (c) (after one warm-up)")
    p.add_argument("--upstream-locations", type=int, default=None,
                   help="locations per upstream-style step (default: the batch on CPU, 16 on CUDA; "
                        "its time per pair does not depend on it)")
    p.add_argument("--loader-batches", type=int, default=10, help="batches timed for (e)")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/bench_train_<config>_<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_run_config(args, device)
    s = Setup(cfg)
    first = next(iter(train_loader(s.paths, cfg.data.loader, s.acc, 0, 0)))
    batch = s.to_device(first)
    pairs = int(batch["view_mask"].sum())
    print(f"config={args.config} device={s.device} batch={batch['view_mask'].shape[0]} locations ({pairs} pairs) "
          f"image={batch['images'].shape[-1]}px text={batch['input_ids'].shape[-1]} tokens "
          f"(mean real {float(first['attention_mask'].sum(-1).float().mean()):.0f}) "
          f"precision={cfg.train.mixed_precision} compile={cfg.train.compile} workers={cfg.data.loader.num_workers}")

    res: dict = {}
    if "full" not in args.skip:
        res["full"] = measure_full(s, args.steps, args.warmup)
    if "model" not in args.skip:
        res["model"] = measure_model_only(s, batch, args.steps, args.warmup)
    cache, note = frozen_cache(s)
    res["cached"] = {"available": cache is not None, "note": note}
    res["cached_model"] = {"available": cache is not None, "note": note}
    if cache is not None and "cached" not in args.skip:
        res["cached"].update(measure_full(s, args.steps, args.warmup, cache))
        res["cached_model"].update(measure_model_only(s, batch, args.steps, args.warmup, cache))
        del cache
    if "loader" not in args.skip:
        res["loader"] = measure_loader(s, args.loader_batches)
    if "upstream" not in args.skip:
        u = args.upstream_locations or (16 if s.device.type == "cuda" else batch["view_mask"].shape[0])
        res["upstream"] = measure_upstream(s, batch, min(u, batch["view_mask"].shape[0]), args.upstream_steps, 1)

    gemm = gemm_tflops(s.device)
    flops = step_flops(s.raw, batch)
    cflops = step_flops(s.raw, batch, cached=True)
    for key, f in (("full", flops), ("model", flops), ("cached", cflops), ("cached_model", cflops)):
        if "step_s" in res.get(key, {}):
            res[key]["tflops"] = f["total"] / res[key]["step_s"] / 1e12
            res[key]["mfu"] = res[key]["tflops"] / gemm["tflops"]
    up = res.get("upstream", {}).get("pairs_per_s")
    demand = 1 / res["model"]["step_s"] if "model" in res else None

    rows = []
    labels = {"upstream": "(c) upstream-style loop: one item per call, fp32",
              "full": "(a) full step from shards (loader included)",
              "model": "(b) model only, batch on the device",
              "cached": f"(d) cached epoch from shards [{note}]",
              "cached_model": "(d) cached, model only, batch on the device"}
    for key in ("upstream", "full", "model", "cached", "cached_model"):
        r = res.get(key)
        if r is None or "pairs_per_s" not in r:
            rows.append([labels[key], None, None, None, None, "not measured" if r is None or r.get("available") else note])
            continue
        vs_b = f"{r['pairs_per_s'] / res['model']['pairs_per_s']:.2f}x (b)" if key.startswith("cached") and "model" in res else ""
        rows.append([labels[key], r["step_s"], r["pairs_per_s"], f"{r['pairs_per_s'] / up:.2f}x" if up else None,
                     f"{100 * r['mfu']:.1f} %" if "mfu" in r else None, vs_b])
    print_table(["path", "step s", "pairs/s", "vs upstream", "MFU", "note"], rows)
    if "loader" in res:
        cap = res["loader"]["batches_per_s"]
        res["loader"]["step_demand_batches_per_s"] = demand
        res["loader"]["capacity_over_demand"] = cap / demand if demand else None
        print(f"(e) loader capacity {cap:.2f} batches/s ({cfg.data.loader.num_workers} workers) against a demand of "
              f"{demand:.2f} batches/s (model-only step): {cap / demand:.2f}x" if demand else f"(e) loader {cap:.2f} batches/s")
    if "full" in res:
        print(f"(a) time waiting for the loader: {100 * res['full']['loader_wait_fraction']:.1f} % of the step")
    print(f"matmul {gemm['n']}^3 {gemm['dtype']}: {gemm['tflops']:.2f} TFLOP/s; FLOPs per step {flops['total']:.3e} "
          f"(cached {cflops['total']:.3e}); MFU {'vs bf16 GEMM' if s.device.type == 'cuda' else 'vs fp32 GEMM, CPU: reference only'}")
    if res["cached"].get("cache_bytes_per_1000_locations"):
        print(f"frozen-trunk cache: {res['cached']['cache_bytes_per_1000_locations'] / 1e9:.3f} GB per 1,000 locations "
              f"({note})")

    name = Path(args.config).stem
    out = Path(args.out or f"benchmarks/results/bench_train_{name}_{s.device.type}.json")
    summary = {
        "train_pairs_per_s": res.get("full", {}).get("pairs_per_s"),
        "train_mfu": res.get("full", {}).get("mfu"),
        "model_only_pairs_per_s": res.get("model", {}).get("pairs_per_s"),
        "model_only_mfu": res.get("model", {}).get("mfu"),
        "train_cached_pairs_per_s": res["cached"].get("pairs_per_s"),
        "upstream_loop_pairs_per_s": up,
        "gemm_tflops": gemm["tflops"],
        "loader_capacity_over_demand": res.get("loader", {}).get("capacity_over_demand"),
        "train_cached_model_pairs_per_s": res["cached_model"].get("pairs_per_s"),
        "cache_gb_per_1000_locations": (res["cached"].get("cache_bytes_per_1000_locations") or 0) / 1e9 or None,
    }
    atomic_write_json(out, {"summary": summary, "results": res, "gemm": gemm, "flops_per_step": flops,
                            "flops_per_cached_step": cflops, "config": args.config, "overrides": args.overrides,
                            "resolved": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                            "batch_pairs": pairs, "text_tokens_mean": float(first["attention_mask"].sum(-1).float().mean()),
                            "device": str(s.device), "machine": machine(),
                            "command": " ".join(sys.argv)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
