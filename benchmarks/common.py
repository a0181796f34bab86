"""Helpers shared by the benchmarks: timing, the upstream-style train loop, GEMM rate, tables.

The upstream-style loop is the published training step (docs/method.md#engineering): one image and one description
per encoder call, fp32, the text projection frozen in eval mode (a batch of one), the loss on
the stacked vectors, Adam. `bench_model.py` and `bench_train.py` both time it from here.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch

from text4vpr.losses import info_nce
from text4vpr.models import Text4VPR
from text4vpr.models.config import replace

V = 4


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(fn(), seconds), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def time_steps(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of `steps` calls of `fn` after `warmup` untimed ones."""
    times = [timed(fn, device)[1] for _ in range(warmup + steps)]
    return statistics.median(times[warmup:])


def build_upstream(cfg, device: torch.device):
    """Model + Adam as upstream trained it: the text projection frozen at init (it ran in eval
    mode under no_grad for a batch of one, so T5 got no gradient either)."""
    cfg = replace(cfg, text=replace(cfg.text, freeze_projection_at_init=True))
    torch.manual_seed(0)
    model = Text4VPR(cfg).to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def step_upstream(model, opt, images, ids, mask, loss_fn=info_nce) -> None:
    """One upstream-style step on (B, V, 3, H, W) float images and (B, V, L) ids/mask, fp32:
    every image and every description (cut to its length) through its encoder alone."""
    imgs, txts = [], []
    for b in range(images.shape[0]):
        for v in range(V):
            imgs.append(model.encode_images(images[b, v][None])[0])  # one image
            n = int(mask[b, v].sum())
            txts.append(model.encode_texts(ids[b, v, :n][None], mask[b, v, :n][None])[0])  # one text
    loss = loss_fn(torch.stack(imgs), torch.stack(txts))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def gemm_tflops(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None, repeats: int = 10) -> dict:
    """Measured dense matmul rate: n x n x n products (bf16 8192 on CUDA, fp32 1024 on CPU)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = time_steps(lambda: torch.matmul(a, b), max(3, repeats), 3, device)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": sec, "tflops": 2 * n**3 / sec / 1e12}


def machine() -> dict:
    cuda = torch.cuda.is_available()
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if cuda else None}


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> None:
    """Markdown table (right-aligned numbers), ready to paste into RESULTS.md."""
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"
        return str(x)

    if title:
        print(title)
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    for r in rows:
        print("| " + " | ".join(cell(x) for x in r) + " |")
