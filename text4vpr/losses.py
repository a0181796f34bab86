"""Symmetric InfoNCE (docs/method.md): one routine for one process, many ranks, plain or tiled.

The loss for N pairs: i, t L2-normalised, logits = s * i @ t.T with s = 1/temperature,
loss = (1/N) * sum_n [CE(row n, n) + CE(column n, n)] (the SUM of both directions).

`contrastive_loss` computes it in one path, whatever the world size:
1. normalise this rank's (n, D) image and text embeddings (fp32, autocast off);
2. gather every rank's embeddings (never logits) with gradients flowing back to their
   owners (`utils.distributed.gather_rows`; the embeddings themselves in one process);
3. log-sum-exp of this rank's rows (its images vs all texts) and columns (its texts vs all
   images) of the global logits, by tiles whose backward recomputes them (`_RowLSE`):
   `tiled=True` uses block_size tiles, memory O(N * D); plain uses one tile.
The value returned is the global loss on every rank; its gradient is scaled so that DDP's
usual gradient *averaging* yields exactly the single-process gradient (a gathered-with-grad
full loss, or a local loss without the x world_size factor, is off by a factor of world_size).

- `exclude_same_location=True` with `group_ids` (n,): the other views of the same location
  are removed from the negatives (upstream keeps them as negatives; so does our default).
- `ContrastiveLoss.loss_and_grads(...)` / `info_nce_and_grads(...)`: gradient caching.
  Given detached embeddings of the whole (local) batch it returns (loss, d/d image_emb,
  d/d text_emb); the trainer re-encodes each micro-batch and calls
  `torch.autograd.backward(emb, grad)`, so accumulation never shrinks the negatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from text4vpr.utils.distributed import all_reduce_sum, average_grad, distributed_world, gather_rows, gather_sizes

DEFAULT_BLOCK = 4096
MAX_SCALE = 100.0


# ---------------------------------------------------------------------- row log-sum-exp by tiles
class _RowLSE(torch.autograd.Function):
    """(n,) log-sum-exp of each row of scale * q @ k.T, queries q (n, D) vs keys k (M, D), by
    (block x block) tiles; the backward recomputes the tiles, so the (n, M) logits never exist
    at once unless block covers them. Keys that are other views of the query's location are
    left out when groups are given."""

    @staticmethod
    def forward(ctx, q, k, scale, q_pos, q_groups, k_groups, block: int):
        s = scale.detach()
        lse = q.new_empty(q.shape[0])
        for a in range(0, q.shape[0], block):
            m = q.new_full((q[a : a + block].shape[0],), float("-inf"))  # running max
            acc = torch.zeros_like(m)  # running sum of exp(logit - max)
            for b in range(0, k.shape[0], block):
                logits = _tile(q, k, s, a, b, block, q_pos, q_groups, k_groups)[1]
                m, acc = _online_update(m, acc, logits)
            lse[a : a + block] = m + torch.log(acc)
        ctx.save_for_backward(q, k, s, lse, q_pos, *(() if q_groups is None else (q_groups, k_groups)))
        ctx.block = block
        return lse

    @staticmethod
    def backward(ctx, g_lse):
        q, k, s, lse, q_pos, *groups = ctx.saved_tensors
        q_groups, k_groups = groups if groups else (None, None)
        block, want_ds = ctx.block, ctx.needs_input_grad[2]
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        ds = torch.zeros((), dtype=q.dtype, device=q.device)
        for a in range(0, q.shape[0], block):
            for b in range(0, k.shape[0], block):
                dots, logits = _tile(q, k, s, a, b, block, q_pos, q_groups, k_groups)  # (bq, bk)
                w = torch.exp(logits - lse[a : a + block, None]) * g_lse[a : a + block, None]  # d/d logits, 0 if masked
                dq[a : a + block] += (w @ k[b : b + block]) * s
                dk[b : b + block] += (w.T @ q[a : a + block]) * s
                if want_ds:
                    ds += (w * dots).sum()
        return dq, dk, (ds if want_ds else None), None, None, None, None


def _tile(q, k, s, a: int, b: int, block: int, q_pos, q_groups, k_groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile (a, b): the dot products (bq, bk) and the logits s * dots, with the excluded
    same-location keys at -inf (a key is never excluded from its own query's row)."""
    dots = q[a : a + block] @ k[b : b + block].T  # (bq, bk)
    logits = dots * s
    if q_groups is None:
        return dots, logits
    cols = torch.arange(b, b + dots.shape[1], device=q.device)
    same = q_groups[a : a + block, None] == k_groups[None, b : b + block]  # (bq, bk)
    return dots, logits.masked_fill(same & (q_pos[a : a + block, None] != cols[None, :]), float("-inf"))


def _online_update(m: torch.Tensor, acc: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the streaming log-sum-exp over a tile's rows; -inf-safe."""
    m_new = torch.maximum(m, logits.amax(dim=1))
    shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    return m_new, acc * torch.exp(m - shift) + torch.exp(logits - shift[:, None]).sum(dim=1)


# ---------------------------------------------------------------------- the loss
def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scale: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    tiled: bool = False,
    block_size: int = DEFAULT_BLOCK,
    distributed: bool = True,
) -> torch.Tensor:
    """SPEC loss of this rank's pairs against all ranks' pairs (see module docstring).

    `scale` = 1/temperature (0-dim tensor, may require grad). `group_ids` (n,) enables the
    same-location exclusion. With one process this is exactly `info_nce`.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"expected two (N, D) tensors of equal shape, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    rank, world = distributed_world() if distributed else (0, 1)
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        i = F.normalize(image_emb.float(), dim=-1)  # (n, D)
        t = F.normalize(text_emb.float(), dim=-1)  # (n, D)
        n = i.shape[0]
        sizes = gather_sizes(n, i.device, world)  # [n] in one process
        start, total = sum(sizes[:rank]), sum(sizes)
        i_all, t_all = gather_rows(i, sizes, rank), gather_rows(t, sizes, rank)  # (N, D); i, t in one process
        groups = None if group_ids is None else group_ids.to(i.device)
        groups_all = None if groups is None else gather_rows(groups, sizes, rank)
        scale = average_grad(scale.float(), world)  # shared by every rank: their mean gradient
        block = block_size if tiled else max(total, 1)  # plain: one tile
        pos = torch.arange(start, start + n, device=i.device)  # my pairs' global indices
        lse_r = _RowLSE.apply(i, t_all, scale, pos, groups, groups_all, block)  # my rows vs all texts
        lse_c = _RowLSE.apply(t, i_all, scale, pos, groups, groups_all, block)  # my columns vs all images
        positive = torch.linalg.vecdot(i, t).sum() * scale  # same for both directions
        local_sum = lse_r.sum() + lse_c.sum() - 2 * positive
        # gradient: world/N * local sum (DDP averages it back to d(global loss));
        # value: the global loss, identical on every rank.
        for_grad = local_sum * (world / total)
        value = local_sum.detach() if world == 1 else all_reduce_sum(local_sum.detach())
        return for_grad + (value / total - for_grad.detach())


def info_nce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    temperature: float = 0.1,
    group_ids: torch.Tensor | None = None,
    tiled: bool = False,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """SPEC loss for (N, D) paired vectors on this process only (normalises both inside)."""
    scale = torch.tensor(1.0 / temperature, device=image_emb.device)
    return contrastive_loss(image_emb, text_emb, scale, group_ids, tiled, block_size, distributed=False)


class ContrastiveLoss(nn.Module):
    """The trainer's loss: local (n, D) embeddings in, global SPEC loss out (any world size).

    learnable=True trains log(1/temperature) (clamped to scale <= 100); its gradient is the
    global one on every rank. Keep this module's parameters in the optimizer and checkpoint.
    Gradients assume the trainer averages parameter gradients over ranks (DDP, Accelerate,
    DeepSpeed do); the returned value is the global loss on every rank.
    """

    def __init__(self, temperature: float = 0.1, learnable: bool = False, tiled: bool = False,
                 exclude_same_location: bool = False, block_size: int = DEFAULT_BLOCK,
                 distributed: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        self.tiled, self.exclude_same_location, self.block_size = tiled, exclude_same_location, block_size
        self.distributed = distributed  # False: this process's pairs only, even under torch.distributed

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_SCALE)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale.detach())

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                group_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.exclude_same_location and group_ids is None:
            raise ValueError("exclude_same_location=True needs group_ids (location index per pair)")
        groups = group_ids if self.exclude_same_location else None
        return contrastive_loss(image_emb, text_emb, self.scale, groups, self.tiled, self.block_size, self.distributed)

    def loss_and_grads(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                       group_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradient cache: (loss, d loss/d image_emb, d loss/d text_emb) on detached inputs.

        A learnable temperature gets its gradient accumulated into `.grad` here.
        """
        i = image_emb.detach().requires_grad_(True)
        t = text_emb.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self(i, t, group_ids)
            loss.backward()
        return loss.detach(), i.grad, t.grad


def info_nce_and_grads(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 0.1,
                       group_ids: torch.Tensor | None = None, tiled: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional gradient cache with a fixed temperature (distributed-aware like ContrastiveLoss)."""
    loss_fn = ContrastiveLoss(temperature, tiled=tiled, exclude_same_location=group_ids is not None)
    return loss_fn.to(image_emb.device).loss_and_grads(image_emb, text_emb, group_ids)
