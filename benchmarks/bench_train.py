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
      as (a), and model only as (b). As in the trainer, the loader does not decode cached images;
  (e) loader capacity: batches/s the train loader alone delivers, against the step's demand
      (1 / model-only step time); and in cached epochs, where the cached locations' JPEGs are
      not decoded, against the cached step's demand;
  (f) the profile: the model-only step split into phases (frozen image blocks, trained image
      blocks + aggregation, text tower, loss, each tower's backward, clip + AdamW), each timed
      alone between syncs, with its share and achieved TFLOP/s (what to fix next);
  (g) torch.profiler over model-only trainer steps: the ops (on CUDA the kernels) with the most
      self time, per step and as a share.
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
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from benchmarks.common import V, build_upstream, gemm_tflops, machine, print_table, step_upstream, sync, time_steps, timed  # noqa: E402
from text4vpr.config import load_config  # noqa: E402
from text4vpr.data.transforms import normalize_images  # noqa: E402
from text4vpr.train.config import RunConfig  # noqa: E402
from text4vpr.train.data import train_loader  # noqa: E402
from text4vpr.train.step import pairs  # noqa: E402
from text4vpr.utils.atomic import atomic_write_json  # noqa: E402

DEFAULT_CONFIG = "configs/tiny_test.yaml"
TINY_OVERRIDES = ["data.synthetic.locations=160", "data.loader.batch_size=16"]  # 7 batches per epoch
PARTS = ("full", "model", "cached", "upstream", "loader", "phases", "ops")


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
    """The real `Trainer` (its Accelerator, data, model, loss, optimizer), run folder in a temp dir;
    every timed step is `Trainer.step`, the step `train()` runs (minus logging and checkpoints)."""

    def __init__(self, cfg: RunConfig, run_dir: str):
        from text4vpr.train.trainer import Trainer

        cfg.train.output_dir, cfg.train.resume = run_dir, ""
        cfg.train.tensorboard = cfg.train.progress = False
        cfg.train.frozen_cache = False  # (d) attaches its own cache
        self.cfg = cfg
        self.trainer = Trainer(cfg)
        self.acc, self.paths, self.loss_fn = self.trainer.acc, self.trainer.paths, self.trainer.loss_fn
        self.device = self.acc.device
        self.raw = self.acc.unwrap_model(self.trainer.model)

    def step(self, host_batch: dict, cache=None) -> None:
        self.trainer.frozen_cache = cache
        self.trainer.step(host_batch)

    def on_device(self, host_batch: dict) -> dict:
        """A batch for model-only steps: the big tensors already on the device; the mask and the
        location ids stay on the host, where the trainer reads them (no device sync)."""
        return {k: v if k in ("view_mask", "index") else v.to(self.device) for k, v in host_batch.items()}

    def batches(self, first_epoch: int = 0, cache=None):
        """Endless train batches, epoch after epoch (a fresh loader per epoch, as the trainer
        does; with a cache, its locations come undecoded, as in the trainer's cached epochs)."""
        for epoch in itertools.count(first_epoch):
            self.trainer.frozen_cache = cache
            yield from self.trainer.epoch_loader(epoch, 0)


# ----------------------------------------------------------------------------- measurements


def measure_full(s: Setup, steps: int, warmup: int, cache=None) -> dict:
    """(a) Steps fed by the loader: total pairs / total time, loader waits included. With a
    frozen-trunk cache (d), one untimed epoch fills it first, so every timed step is a hit."""
    first_epoch = 0
    if cache is not None:
        for batch in train_loader(s.paths, s.cfg.data.loader, s.acc, 0, 0):
            s.step(batch, cache)
        first_epoch = 1
    stream = s.batches(first_epoch, cache)
    times, waits, pairs = [], [], 0
    for i in range(warmup + steps):
        sync(s.device)
        t0 = time.perf_counter()
        host = next(stream)
        t1 = time.perf_counter()
        s.step(host, cache)
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


def measure_loader(s: Setup, batches: int, cache=None) -> dict:
    """(e) The loader alone: batches/s from its first batch (worker start-up excluded); with a
    full cache, as in cached epochs: the cached locations' JPEGs are not decoded."""
    stream = s.batches(1, cache)
    next(stream)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        next(stream)
        n += 1
    sec = time.perf_counter() - t0
    s.trainer.frozen_cache = None
    return {"batches_per_s": n / sec, "batches": n, "workers": s.cfg.data.loader.num_workers}


class PhaseTimer:
    """Seconds per named phase, each timed alone between device syncs (after `skip` rounds)."""

    def __init__(self, device: torch.device, skip: int = 1):
        self.device, self.skip, self.round = device, skip, 0
        self.seconds: dict[str, list[float]] = {}

    def __call__(self, name: str, fn):
        out, sec = timed(fn, self.device)
        if self.round >= self.skip:
            self.seconds.setdefault(name, []).append(sec)
        return out

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.seconds.items()}


PHASE_FLOPS = {  # phase -> (step_flops key, multiple of its forward FLOPs)
    "image frozen fwd (no grad)": ("frozen_image_fwd", 1), "image trained fwd": ("trained_image_fwd", 1),
    "text fwd": ("text_fwd", 1), "loss fwd+bwd": ("loss_fwd", 3), "image bwd": ("trained_image_fwd", 2),
    "text bwd": ("text_bwd", 1),
}


def measure_phases(s: Setup, batch: dict, steps: int, flops: dict) -> dict:
    """(f) Where the model-only step's time goes: the step split into phases, each timed between
    syncs (eager pieces of the model, so the sum exceeds a compiled step). Backward is split by
    detaching the two towers' outputs: loss backward first, then each tower from its gradient."""
    raw, t = s.raw, s.trainer
    dev = {k: v.to(s.device) for k, v in batch.items()}
    vm = dev["view_mask"]
    timer = PhaseTimer(s.device)
    for timer.round in range(steps + 1):
        raw.train()
        with t.strategy.autocast():
            tokens = timer("image frozen fwd (no grad)", lambda: raw.frozen_image_tokens(dev["images"], vm))
            img = timer("image trained fwd", lambda: raw.encode_images_from_tokens(tokens, vm, True).float())
            txt = timer("text fwd", lambda: raw.encode_texts(dev["input_ids"], dev["attention_mask"], True).float())
        img_l, txt_l = img.detach().requires_grad_(), txt.detach().requires_grad_()

        def loss_fwd_bwd():
            i, x, g = pairs(dev, img_l, txt_l)
            s.acc.backward(s.loss_fn(i, x, g))
        timer("loss fwd+bwd", loss_fwd_bwd)
        timer("image bwd", lambda: img.backward(img_l.grad))
        timer("text bwd", lambda: txt.backward(txt_l.grad))
        timer("clip + optimizer", lambda: (t.strategy.clip(t.model), t.optimizer.step(), t.optimizer.zero_grad(set_to_none=True)))
    med = timer.medians()
    total = sum(med.values())
    out = {}
    for name, sec in med.items():
        key, mult = PHASE_FLOPS.get(name, (None, 0))
        tf = flops[key] * mult / sec / 1e12 if key else None
        out[name] = {"seconds": sec, "fraction": sec / total, "tflops": tf}
    return {"phases": out, "sum_s": total, "steps": steps}


def measure_ops(s: Setup, batch: dict, steps: int, top: int = 15) -> dict:
    """(g) torch.profiler over `steps` model-only trainer steps: the ops (CUDA: the kernels) with
    the most self time, per step and as a share of all self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = s.device.type == "cuda"
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    s.step(batch)  # warm (and compiled, when compiling)
    sync(s.device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            s.step(batch)
        sync(s.device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    rows = [{"op": e.key, "ms_per_step": getattr(e, attr) / 1e3 / steps, "share": getattr(e, attr) / total,
             "calls_per_step": e.count / steps} for e in events[:top]]
    return {"clock": "device" if cuda else "cpu", "steps": steps, "self_ms_per_step": total / 1e3 / steps, "top": rows}


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
            "t5_fwd": float(t5), "text_head_fwd": float(txt_n * head), "text_fwd": float(t5 + txt_n * head),
            "text_bwd": float(2 * txt_n * head + (2 * t5 if t5_trained else 0)), "loss_fwd": float(loss),
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
    p.add_argument("--phase-steps", type=int, default=3, help="timed rounds of the phase profile (f)")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/bench_train_<config>_<device>.json)")
    return p.parse_intermixed_args(argv)  # overrides may sit before and after options


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_run_config(args, device)
    s = Setup(cfg, tempfile.mkdtemp(prefix="bench_train_"))
    first = next(iter(train_loader(s.paths, cfg.data.loader, s.acc, 0, 0)))
    batch = s.on_device(first)
    print(f"config={args.config} device={s.device} batch={batch['view_mask'].shape[0]} locations "
          f"({int(batch['view_mask'].sum())} pairs) image={batch['images'].shape[-1]}px "
          f"text={batch['input_ids'].shape[-1]} tokens (mean real {float(first['attention_mask'].sum(-1).float().mean()):.0f}) "
          f"precision={cfg.train.mixed_precision} compile={cfg.train.compile} workers={cfg.data.loader.num_workers}")
    gemm = gemm_tflops(s.device)
    flops = {"step": step_flops(s.raw, batch), "cached": step_flops(s.raw, batch, cached=True)}
    out = Path(args.out or f"benchmarks/results/bench_train_{Path(args.config).stem}_{s.device.type}.json")
    res: dict = {}

    def save() -> None:  # after every part: a timeout later keeps what was measured
        add_rates(res, flops, gemm)
        write_results(out, args, cfg, s, res, gemm, flops, first)

    note = measure_parts(s, args, batch, first, flops, res, save)
    print_report(s, cfg, res, note, gemm, flops)
    save()
    print(f"wrote {out}")
    return 0


def measure_parts(s: Setup, args, batch: dict, first: dict, flops: dict, res: dict, save) -> str:
    """(a)-(g) into `res`, in order, `save()` after each; returns the frozen cache's note."""
    if "full" not in args.skip:
        res["full"] = measure_full(s, args.steps, args.warmup)
        save()
    if "model" not in args.skip:
        res["model"] = measure_model_only(s, batch, args.steps, args.warmup)
        save()
    cache, note = frozen_cache(s)
    res["cached"] = {"available": cache is not None, "note": note}
    res["cached_model"] = {"available": cache is not None, "note": note}
    if cache is not None and "cached" not in args.skip:
        res["cached"].update(measure_full(s, args.steps, args.warmup, cache))
        res["cached_model"].update(measure_model_only(s, batch, args.steps, args.warmup, cache))
        if "loader" not in args.skip:
            res["loader_cached"] = measure_loader(s, args.loader_batches, cache)
        s.trainer.frozen_cache = None
        del cache
        save()
    if "loader" not in args.skip:
        res["loader"] = measure_loader(s, args.loader_batches)
        save()
    if "upstream" not in args.skip:
        u = args.upstream_locations or (16 if s.device.type == "cuda" else batch["view_mask"].shape[0])
        res["upstream"] = measure_upstream(s, batch, min(u, batch["view_mask"].shape[0]), args.upstream_steps, 1)
        save()
    if "phases" not in args.skip:
        res["phases"] = measure_phases(s, first, args.phase_steps, flops["step"])
        save()
    if "ops" not in args.skip:
        res["ops"] = measure_ops(s, batch, args.phase_steps)
    return note


def add_rates(res: dict, flops: dict, gemm: dict) -> None:
    """TFLOP/s and MFU of each timed path; the loader's capacity against the model-only demand."""
    for key, f in (("full", "step"), ("model", "step"), ("cached", "cached"), ("cached_model", "cached")):
        if "step_s" in res.get(key, {}):
            res[key]["tflops"] = flops[f]["total"] / res[key]["step_s"] / 1e12
            res[key]["mfu"] = res[key]["tflops"] / gemm["tflops"]
    for loader, step in (("loader", "model"), ("loader_cached", "cached_model")):
        if loader in res and "step_s" in res.get(step, {}):
            demand = 1 / res[step]["step_s"]
            res[loader]["step_demand_batches_per_s"] = demand
            res[loader]["capacity_over_demand"] = res[loader]["batches_per_s"] / demand


def print_report(s: Setup, cfg: RunConfig, res: dict, note: str, gemm: dict, flops: dict) -> None:
    up = res.get("upstream", {}).get("pairs_per_s")
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
    for key, what in (("loader", "model-only step"), ("loader_cached", "cached model-only step, no JPEG decode")):
        if key in res:
            ld = res[key]
            print(f"(e) loader capacity {ld['batches_per_s']:.2f} batches/s ({cfg.data.loader.num_workers} workers) against "
                  f"a demand of {ld['step_demand_batches_per_s']:.2f} batches/s ({what}): {ld['capacity_over_demand']:.2f}x"
                  if "capacity_over_demand" in ld else f"(e) loader {ld['batches_per_s']:.2f} batches/s ({what})")
    if "phases" in res:
        ph = res["phases"]
        print_table(["phase (eager, timed alone)", "ms", "share", "TFLOP/s", "of GEMM"],
                    [[name, 1e3 * r["seconds"], f"{100 * r['fraction']:.1f} %", r["tflops"],
                      f"{100 * r['tflops'] / gemm['tflops']:.0f} %" if r["tflops"] else None]
                     for name, r in ph["phases"].items()],
                    title=f"(f) where the model-only step goes: phases sum to {1e3 * ph['sum_s']:.1f} ms")
    if "ops" in res:
        op = res["ops"]
        print_table(["op (self time)", "ms/step", "share", "calls/step"],
                    [[r["op"][:60], r["ms_per_step"], f"{100 * r['share']:.1f} %", r["calls_per_step"]] for r in op["top"]],
                    title=f"(g) torch.profiler, {op['clock']} self time: {op['self_ms_per_step']:.1f} ms per model-only step")
    if "full" in res:
        print(f"(a) time waiting for the loader: {100 * res['full']['loader_wait_fraction']:.1f} % of the step")
    print(f"matmul {gemm['n']}^3 {gemm['dtype']}: {gemm['tflops']:.2f} TFLOP/s; FLOPs per step {flops['step']['total']:.3e} "
          f"(cached {flops['cached']['total']:.3e}); MFU {'vs bf16 GEMM' if s.device.type == 'cuda' else 'vs fp32 GEMM, CPU: reference only'}")
    if res["cached"].get("cache_bytes_per_1000_locations"):
        print(f"frozen-trunk cache: {res['cached']['cache_bytes_per_1000_locations'] / 1e9:.3f} GB per 1,000 locations "
              f"({note})")


def write_results(out: Path, args, cfg: RunConfig, s: Setup, res: dict, gemm: dict, flops: dict, first: dict) -> None:
    cached = res.get("cached", {})
    summary = {
        "train_pairs_per_s": res.get("full", {}).get("pairs_per_s"),
        "train_mfu": res.get("full", {}).get("mfu"),
        "model_only_pairs_per_s": res.get("model", {}).get("pairs_per_s"),
        "model_only_mfu": res.get("model", {}).get("mfu"),
        "train_cached_pairs_per_s": cached.get("pairs_per_s"),
        "upstream_loop_pairs_per_s": res.get("upstream", {}).get("pairs_per_s"),
        "gemm_tflops": gemm["tflops"],
        "loader_capacity_over_demand": res.get("loader", {}).get("capacity_over_demand"),
        "loader_cached_capacity_over_demand": res.get("loader_cached", {}).get("capacity_over_demand"),
        "train_cached_model_pairs_per_s": res.get("cached_model", {}).get("pairs_per_s"),
        "cache_gb_per_1000_locations": (cached.get("cache_bytes_per_1000_locations") or 0) / 1e9 or None,
    }
    atomic_write_json(out, {"summary": summary, "results": res, "gemm": gemm, "flops_per_step": flops["step"],
                            "flops_per_cached_step": flops["cached"], "config": args.config, "overrides": args.overrides,
                            "resolved": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                            "batch_pairs": int(first["view_mask"].sum()),
                            "text_tokens_mean": float(first["attention_mask"].sum(-1).float().mean()),
                            "device": str(s.device), "machine": machine(), "command": " ".join(sys.argv)})


if __name__ == "__main__":
    sys.exit(main())
