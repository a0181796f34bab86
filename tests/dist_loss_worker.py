"""Helper for test_losses.py: run under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank encodes its share of a batch with a DDP-wrapped tiny Text4VPR and computes
ContrastiveLoss; every rank also computes the single-process loss on the whole batch with
its own copy and checks loss and parameter gradients agree (<= 1e-5 relative). The loss math
runs on float64 copies of the (float32) embeddings there: float32 loss gradients are a few
ulps off either way, and aggregation.tau's gradient, a sum of terms ~20x its size, turns
that into ~1e-5 (docs/models.md#the-loss); the float32 loss is compared on its own
embedding gradients instead (`check_fp32`).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from text4vpr.losses import ContrastiveLoss
from text4vpr.models import Text4VPR, tiny_config
from text4vpr.utils.distributed import exit_process, shutdown_distributed


def make_batch(b=5, v=4, size=28, length=9):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, v, 3, size, size, generator=g)
    view_mask = torch.ones(b, v, dtype=torch.bool)
    view_mask[4, 3] = False  # unequal pair counts per rank
    ids = torch.randint(3, 300, (b, v, length), generator=g)
    mask = (torch.arange(length)[None, None] < torch.randint(3, length + 1, (b, v, 1), generator=g)).long()
    mask[~view_mask] = 0
    index = torch.arange(b)
    return images, view_mask, ids, mask, index


def pairs(model, images, view_mask, ids, mask, index):
    """Valid (image, text) pairs (n, D) and their location ids (n,)."""
    img, txt = model(images, view_mask, ids, mask)  # (B, V, D) each
    groups = index[:, None].expand_as(view_mask)
    return img[view_mask], txt[view_mask], groups[view_mask]


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name, loss_kwargs, model, ddp, batch, rank, world, cache=False):
    ref_model = copy.deepcopy(model)
    ref_loss_fn = ContrastiveLoss(**loss_kwargs, distributed=False)
    i, t, g = pairs(ref_model, *batch)
    ref = ref_loss_fn(i.double(), t.double(), g)
    ref.backward()

    loss_fn = ContrastiveLoss(**loss_kwargs)
    lo = rank * 3  # rank 0: locations 0..2, rank 1: 3..4
    hi = 3 if rank == 0 else 5
    local = [x[lo:hi] for x in batch]
    model.zero_grad(set_to_none=True)
    if cache:
        with torch.no_grad():
            i, t, g = pairs(ddp, *local)
        loss, gi, gt = loss_fn.loss_and_grads(i.double(), t.double(), g)
        i, t, _ = pairs(ddp, *local)
        torch.autograd.backward([i, t], [gi.float(), gt.float()])
    else:
        i, t, g = pairs(ddp, *local)
        loss = loss_fn(i.double(), t.double(), g)
        loss.backward()
    assert rel(loss.detach(), ref.detach()) <= 1e-5, (name, float(loss), float(ref))
    ref_params = dict(ref_model.named_parameters())
    # grads that are analytically zero (attention key biases, per-cluster score biases that
    # Sinkhorn cancels) are fp32 noise: compare those on the scale of the whole gradient
    total = torch.stack([p.grad.norm() for p in ref_params.values() if p.grad is not None]).norm()
    n = 0
    for pname, p in model.named_parameters():
        if p.grad is None:
            assert ref_params[pname].grad is None, (name, pname)
            continue
        ref_grad = ref_params[pname].grad
        diff = float((p.grad - ref_grad).norm())
        if float(ref_grad.norm()) < 1e-6 * float(total):
            assert diff <= 1e-6 * float(total), (name, pname, diff)
            continue
        e = diff / float(ref_grad.norm())
        assert e <= 1e-5, (name, pname, e)
        n += 1
    assert n > 10, n
    if loss_fn.log_scale.requires_grad:
        assert rel(loss_fn.log_scale.grad, ref_loss_fn.log_scale.grad) <= 1e-5, name
    got, want = float(loss.detach()), float(ref.detach())
    print(f"rank {rank} {name}: loss {got:.6f} ref {want:.6f}, {n} grads match", flush=True)


def check_fp32(name, loss_kwargs, model, batch, rank, world):
    """The float32 loss: value and d loss/d this rank's embeddings equal the single-process ones."""
    with torch.no_grad():
        i, t, g = pairs(model, *batch)
        lo, hi = (0, 3) if rank == 0 else (3, 5)
        li, lt, lg = pairs(model, *[x[lo:hi] for x in batch])
    ref, ri, rt = ContrastiveLoss(**loss_kwargs, distributed=False).loss_and_grads(i, t, g)
    loss, gi, gt = ContrastiveLoss(**loss_kwargs).loss_and_grads(li, lt, lg)
    rows = slice(0, len(li)) if rank == 0 else slice(len(i) - len(li), len(i))
    assert rel(loss, ref) <= 1e-5, (name, float(loss), float(ref))
    for got, want in ((gi, ri[rows]), (gt, rt[rows])):  # world x: DDP's averaging divides it back
        assert rel(got / world, want) <= 1e-5, (name, rel(got / world, want))
    print(f"rank {rank} {name} fp32: loss and embedding gradients match", flush=True)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Text4VPR(tiny_config(image_size=28)).eval()  # eval: no dropout, BatchNorm running stats
    ddp = DDP(model)
    batch = make_batch()
    check("plain", {}, model, ddp, batch, rank, world)
    check("tiled+learnable+exclude", {"tiled": True, "learnable": True, "exclude_same_location": True,
                                       "block_size": 4}, model, ddp, batch, rank, world)
    check("gradient-cache", {"learnable": True}, model, ddp, batch, rank, world, cache=True)
    for name, kwargs in (("plain", {}), ("tiled+exclude", {"tiled": True, "exclude_same_location": True, "block_size": 4})):
        check_fp32(name, kwargs, model, batch, rank, world)
    Path(out_dir, f"ok-{rank}").write_text("ok\n")
    shutdown_distributed()


if __name__ == "__main__":
    exit_process(main(sys.argv[1]) or 0)
