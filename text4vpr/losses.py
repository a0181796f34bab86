"""Symmetric InfoNCE (SPEC): plain, tiled, cross-rank and gradient-cache forms.

SPEC loss for N pairs: i, t L2-normalised, logits = s * i @ t.T with s = 1/temperature,
loss = (1/N) * sum_n [CE(row n, n) + CE(column n, n)] (the SUM of both directions).

Building blocks
- `info_nce(image_emb, text_emb, temperature=0.1)`: the SPEC loss on one process.
- `ContrastiveLoss(...)`: module for the trainer. Takes this rank's (n, D) embeddings; when
  torch.distributed runs with world_size > 1 it gathers embeddings (never logits) from all
  ranks with gradients flowing back to their owners, and computes only its own rows and
  columns against the global set (local loss). The loss it returns has the value of the
  single-process loss on the concatenated batch on every rank, and a gradient scaled so that
  DDP's usual gradient *averaging* yields exactly the single-process gradient (the world-size
  trap: a gathered-with-grad full loss, or a local loss without the x world_size factor,
  gives gradients off by a factor of world_size).
- `tiled=True`: never builds the N x N logits. Forward is a blockwise online log-sum-exp,
  backward recomputes the blocks (custom autograd.Functions); memory O(N * D). On one
  process a fused Function works from the raw embeddings (normalisation folded into the
  tiles), so it needs little beyond the inputs and their gradients; across ranks each rank
  tiles its own row strip and column strip of the global logits.
- `exclude_same_location=True` with `group_ids` (n,): the other views of the same location
  are removed from the negatives (upstream keeps them as negatives; so does our default).
- `ContrastiveLoss.loss_and_grads(...)` / `info_nce_and_grads(...)`: gradient caching.
  Given detached embeddings of the whole (local) batch it returns (loss, d/d image_emb,
  d/d text_emb); the trainer re-encodes each micro-batch and calls
  `torch.autograd.backward(emb, grad)`, so accumulation never shrinks the negatives.
Everything runs in fp32 with autocast disabled.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

DEFAULT_BLOCK = 4096
MAX_SCALE = 100.0


# ---------------------------------------------------------------------- distributed helpers
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather_sizes(n: int, device: torch.device, world: int) -> list[int]:
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather of (n_r, D) rows (sizes may differ); backward sums the gradients of every
    rank's loss and hands each owner its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        world, m = len(sizes), max(sizes)
        padded = x.new_zeros((m, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])  # (N, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, rank = ctx.sizes, ctx.rank
        start = sum(sizes[:rank])
        grad = grad.contiguous().clone()  # never reduce autograd's incoming buffer in place
        if dist.get_backend() == "nccl" and len(set(sizes)) == 1:
            out = grad.new_empty((sizes[rank], *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out, None, None
        dist.all_reduce(grad)  # gloo has no reduce_scatter
        return grad[start : start + sizes[rank]], None, None


def _gather_nograd(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    m = max(sizes)
    padded = x.new_zeros((m, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AverageGrad(torch.autograd.Function):
    """Identity whose backward averages the gradient over ranks (for a shared temperature)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


# ---------------------------------------------------------------------- logits, plain and tiled
def _negative_mask(q_pos, q_groups, k_groups, k_start: int, k_end: int) -> torch.Tensor | None:
    """True where key j is another view of query i's location (excluded); None if no groups."""
    if q_groups is None:
        return None
    same = q_groups[:, None] == k_groups[None, k_start:k_end]  # (n, bk)
    cols = torch.arange(k_start, k_end, device=q_pos.device)
    return same & (q_pos[:, None] != cols[None, :])


def _lse_plain(q, k, scale, q_pos, q_groups, k_groups) -> torch.Tensor:
    """Row log-sum-exp of scale * q @ k.T (n,), full logits in memory."""
    logits = (q @ k.T) * scale  # (n, M)
    mask = _negative_mask(q_pos, q_groups, k_groups, 0, k.shape[0])
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return torch.logsumexp(logits, dim=1)


class _TiledLSE(torch.autograd.Function):
    """Row log-sum-exp of scale * q @ k.T by (block x block) tiles; backward recomputes tiles."""

    @staticmethod
    def forward(ctx, q, k, scale, q_pos, q_groups, k_groups, block: int):
        s = scale.detach()
        lse = q.new_empty(q.shape[0])
        for a in range(0, q.shape[0], block):
            qa = q[a : a + block]
            m = q.new_full((qa.shape[0],), float("-inf"))
            acc = q.new_zeros(qa.shape[0])
            for b in range(0, k.shape[0], block):
                logits = _masked(_tile_dots(qa, k, b, block) * s, q_pos, q_groups, k_groups, a, b, block)
                m, acc = _online_update(m, acc, logits, dim=1)
            lse[a : a + block] = m + torch.log(acc)
        ctx.save_for_backward(q, k, s, lse, q_pos,
                              *(() if q_groups is None else (q_groups, k_groups)))
        ctx.block = block
        return lse

    @staticmethod
    def backward(ctx, g_lse):
        q, k, s, lse, q_pos, *groups = ctx.saved_tensors
        q_groups, k_groups = groups if groups else (None, None)
        block = ctx.block
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        ds = torch.zeros((), dtype=q.dtype, device=q.device)
        for a in range(0, q.shape[0], block):
            qa, ga, la = q[a : a + block], g_lse[a : a + block], lse[a : a + block]
            for b in range(0, k.shape[0], block):
                kb = k[b : b + block]
                dots = _tile_dots(qa, k, b, block)  # (bq, bk)
                logits = _masked(dots * s, q_pos, q_groups, k_groups, a, b, block)
                w = torch.exp(logits - la[:, None]) * ga[:, None]  # d loss / d logits, 0 where masked
                dq[a : a + block] += (w @ kb) * s
                dk[b : b + block] += (w.T @ qa) * s
                if ctx.needs_input_grad[2]:
                    ds += (w * dots).sum()
        return dq, dk, (ds if ctx.needs_input_grad[2] else None), None, None, None, None


def _tile_dots(qa: torch.Tensor, k: torch.Tensor, b: int, block: int) -> torch.Tensor:
    return qa @ k[b : b + block].T  # (bq, bk)


def _masked(logits, q_pos, q_groups, k_groups, a: int, b: int, block: int) -> torch.Tensor:
    """Tile logits with excluded same-location keys set to -inf (no-op without groups)."""
    if q_groups is None:
        return logits
    k_end = b + logits.shape[1]
    mask = _negative_mask(q_pos[a : a + block], q_groups[a : a + block], k_groups, b, k_end)
    return logits.masked_fill(mask, float("-inf"))


def _row_lse(q, k, scale, q_pos, q_groups, k_groups, tiled: bool, block: int) -> torch.Tensor:
    """(n,) log-sum-exp of each query's row scale * q_i @ k.T, queries (n, D) vs keys (M, D)."""
    if tiled:
        return _TiledLSE.apply(q, k, scale, q_pos, q_groups, k_groups, block)
    return _lse_plain(q, k, scale, q_pos, q_groups, k_groups)


class _FusedTiledInfoNCE(torch.autograd.Function):
    """One process, tiled: sum_n [lse_row_n + lse_col_n - 2 s i_n.t_n] of the SPEC logits,
    straight from the raw embeddings. Normalisation is folded into the tiles and undone in
    place in the backward, so beyond the inputs and their two gradients only O(N) vectors
    and one tile live at a time. Each tile costs one matmul forward and three backward."""

    @staticmethod
    def forward(ctx, img, txt, scale, groups, block: int):
        s, n = scale.detach().float(), img.shape[0]
        inv_i, inv_t = _inv_norms(img, block), _inv_norms(txt, block)  # (N,) each
        pos = torch.arange(n, device=img.device)
        m_r, acc_r = img.new_full((n,), float("-inf"), dtype=torch.float32), img.new_zeros(n, dtype=torch.float32)
        m_c, acc_c = m_r.clone(), acc_r.clone()
        positive = img.new_zeros((), dtype=torch.float32)
        for a in range(0, n, block):
            ra = slice(a, a + block)
            ia = img[ra].float() * inv_i[ra, None]  # (bq, D) normalised
            positive += torch.linalg.vecdot(ia, txt[ra].float() * inv_t[ra, None]).sum()
            for b in range(0, n, block):
                rb = slice(b, b + block)
                tb = txt[rb].float() * inv_t[rb, None]  # (bk, D) normalised
                logits = _masked((ia @ tb.T) * s, pos, groups, groups, a, b, block)  # (bq, bk)
                m_r[ra], acc_r[ra] = _online_update(m_r[ra], acc_r[ra], logits, dim=1)
                m_c[rb], acc_c[rb] = _online_update(m_c[rb], acc_c[rb], logits, dim=0)
        lse_r, lse_c = m_r + torch.log(acc_r), m_c + torch.log(acc_c)
        ctx.save_for_backward(img, txt, s, inv_i, inv_t, lse_r, lse_c, positive,
                              *(() if groups is None else (groups,)))
        ctx.block = block
        return lse_r.sum() + lse_c.sum() - 2 * s * positive

    @staticmethod
    def backward(ctx, g):
        img, txt, s, inv_i, inv_t, lse_r, lse_c, positive, *groups = ctx.saved_tensors
        groups = groups[0] if groups else None
        block, n = ctx.block, img.shape[0]
        pos = torch.arange(n, device=img.device)
        g = g.float()
        di = torch.zeros(img.shape, dtype=torch.float32, device=img.device)  # d/d normalised image
        dt = torch.zeros(txt.shape, dtype=torch.float32, device=txt.device)  # d/d normalised text
        ds = torch.zeros((), dtype=torch.float32, device=img.device)
        for a in range(0, n, block):
            ra = slice(a, a + block)
            ia = img[ra].float() * inv_i[ra, None]  # (bq, D)
            ta = txt[ra].float() * inv_t[ra, None]  # (bq, D)
            di[ra] -= (2 * g * s) * ta  # positives
            dt[ra] -= (2 * g * s) * ia
            for b in range(0, n, block):
                rb = slice(b, b + block)
                tb = txt[rb].float() * inv_t[rb, None]  # (bk, D)
                dots = ia @ tb.T  # (bq, bk)
                logits = _masked(dots * s, pos, groups, groups, a, b, block)
                w = (torch.exp(logits - lse_r[ra, None]) + torch.exp(logits - lse_c[None, rb])) * g
                di[ra] += (w @ tb) * s
                dt[rb] += (w.T @ ia) * s
                if ctx.needs_input_grad[2]:
                    ds += (w * dots).sum()
        _normalize_backward_(di, img, inv_i, block)
        _normalize_backward_(dt, txt, inv_t, block)
        ds = ds - 2 * g * positive
        return di.to(img.dtype), dt.to(txt.dtype), (ds if ctx.needs_input_grad[2] else None), None, None


def _inv_norms(x: torch.Tensor, block: int) -> torch.Tensor:
    """1 / max(||x_n||, 1e-12) per row, in fp32, without an (N, D) temporary (F.normalize's eps)."""
    norms = torch.cat([x[a : a + block].float().norm(dim=1) for a in range(0, x.shape[0], block)])  # (N,)
    return norms.clamp_min(1e-12).reciprocal()


def _normalize_backward_(grad: torch.Tensor, x: torch.Tensor, inv: torch.Tensor, block: int) -> None:
    """In place: gradient w.r.t. x_hat = x / ||x|| -> gradient w.r.t. x (blockwise)."""
    for a in range(0, x.shape[0], block):
        ga, xa = grad[a : a + block], x[a : a + block].float() * inv[a : a + block, None]  # (b, D)
        ga.sub_(xa * torch.linalg.vecdot(xa, ga)[:, None]).mul_(inv[a : a + block, None])


def _online_update(m, acc, logits, dim: int):
    """One step of the streaming log-sum-exp along `dim` of a tile; -inf-safe."""
    m_new = torch.maximum(m, logits.amax(dim=dim))
    shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    tile = torch.exp(logits - (shift[:, None] if dim == 1 else shift[None, :])).sum(dim=dim)
    return m_new, acc * torch.exp(m - shift) + tile


def _single_process_sum(i, t, scale, groups) -> torch.Tensor:
    """sum_n [lse_row_n + lse_col_n - 2 s i_n.t_n] with one (N, N) logits matrix."""
    logits = (i @ t.T) * scale  # (N, N)
    mask = _negative_mask(torch.arange(i.shape[0], device=i.device), groups, groups, 0, i.shape[0])
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    positive = torch.diagonal(logits).sum()
    return torch.logsumexp(logits, dim=1).sum() + torch.logsumexp(logits, dim=0).sum() - 2 * positive


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
    world, rank = _world() if distributed else (1, 0)
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        scale = scale.float()
        g_loc = None if group_ids is None else group_ids.to(image_emb.device)
        if world == 1 and tiled:
            return _FusedTiledInfoNCE.apply(image_emb, text_emb, scale, g_loc, block_size) / image_emb.shape[0]
        i = F.normalize(image_emb.float(), dim=-1)  # (n, D)
        t = F.normalize(text_emb.float(), dim=-1)  # (n, D)
        if world == 1:
            return _single_process_sum(i, t, scale, g_loc) / i.shape[0]
        n = i.shape[0]
        sizes = _gather_sizes(n, i.device, world)
        i_all = _GatherWithGrad.apply(i, sizes, rank)  # (N, D)
        t_all = _GatherWithGrad.apply(t, sizes, rank)  # (N, D)
        g_all = None if g_loc is None else _gather_nograd(g_loc, sizes)
        start, total = sum(sizes[:rank]), sum(sizes)
        if scale.requires_grad:
            scale = _AverageGrad.apply(scale)
        pos = torch.arange(start, start + n, device=i.device)
        lse_r = _row_lse(i, t_all, scale, pos, g_loc, g_all, tiled, block_size)  # my rows vs all texts
        lse_c = _row_lse(t, i_all, scale, pos, g_loc, g_all, tiled, block_size)  # my columns vs all images
        positive = torch.linalg.vecdot(i, t).sum() * scale  # same for both directions
        local_sum = lse_r.sum() + lse_c.sum() - 2 * positive
        # gradient: world/N * local sum (DDP averages it back to d(global loss));
        # value: the global loss, identical on every rank.
        for_grad = local_sum * (world / total)
        value = local_sum.detach().clone()
        dist.all_reduce(value)
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
