"""Symmetric InfoNCE (docs/method.md): one routine for one process, many ranks, plain or tiled.

The loss for N pairs: i, t L2-normalised, logits = s * i @ t.T with s = 1/temperature,
loss = (1/N) * sum_n [CE(row n, n) + CE(column n, n)] (the SUM of both directions).

`contrastive_loss` computes it in one path, whatever the world size:
1. normalise this rank's (n, D) image and text embeddings (fp32, autocast off; tile by tile);
2. gather every rank's embeddings (never logits) with gradients flowing back to their
   owners (`utils.distributed.gather_rows`; the embeddings themselves in one process);
3. log-sum-exp of this rank's rows (its images vs all texts) and columns (its texts vs all
   images) of the global logits, by tiles whose backward recomputes them (`_Strips`, which
   folds the normalisation into the tiles): `tiled=True` uses block_size tiles, memory
   O(N * D) (little beyond the inputs and their gradients); plain uses one tile.
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
from torch import nn

from text4vpr.utils.distributed import all_reduce_sum, average_grad, distributed_world, gather_rows, gather_sizes

DEFAULT_BLOCK = 4096
MAX_SCALE = 100.0


# ---------------------------------------------------------------------- the two strips, by tiles
class _Strips(torch.autograd.Function):
    """This rank's local sum, sum_n [lse_row_n + lse_col_n - 2 s i_n.t_n], from raw fp32
    embeddings: rows are its images vs all texts, columns its texts vs all images. Vectors
    are normalised tile by tile (never stored normalised) and the logits exist one
    (block x block) tile at a time; the backward recomputes the tiles, and turns gradients
    with respect to the normalised vectors into gradients of the raw ones in place. In one
    process the gathered tensors are the local ones and share their gradient buffers, so
    beyond the inputs and their gradients only O(N) vectors and one tile are alive. (There,
    rows and columns are still two passes: one pass over shared tiles halves the matmuls but
    rounds differently from the multi-rank strips, enough to miss the 2-rank test's 1e-5 on
    the noise-dominated aggregation.tau gradient.)"""

    @staticmethod
    def forward(ctx, img, txt, img_all, txt_all, scale, pos, groups, groups_all, block: int):
        s = scale.detach()
        inv = [_inv_norms(x, block) for x in (img, txt)]  # (n,) each
        inv_all = inv if img_all is img else [_inv_norms(x, block) for x in (img_all, txt_all)]  # (N,) each
        strips = ((img, inv[0], txt_all, inv_all[1]), (txt, inv[1], img_all, inv_all[0]))  # rows, columns
        lse = [_strip_lse(q, qi, k, ki, s, pos, groups, groups_all, block) for q, qi, k, ki in strips]
        positive = img.new_zeros(())  # sum_n i_hat_n . t_hat_n
        for a in range(0, img.shape[0], block):
            positive += torch.linalg.vecdot(_unit(img, inv[0], a, block), _unit(txt, inv[1], a, block)).sum()
        ctx.save_for_backward(img, txt, img_all, txt_all, s, pos, *inv, *inv_all, *lse, positive,
                              *(() if groups is None else (groups, groups_all)))
        ctx.block, ctx.shared = block, img_all is img
        return lse[0].sum() + lse[1].sum() - 2 * s * positive

    @staticmethod
    def backward(ctx, g):
        img, txt, img_all, txt_all, s, pos, inv_i, inv_t, inv_ia, inv_ta, lse_r, lse_c, positive, *groups = ctx.saved_tensors
        groups, groups_all = groups if groups else (None, None)
        block, want_ds = ctx.block, ctx.needs_input_grad[4]
        di, dt = torch.zeros_like(img), torch.zeros_like(txt)  # d/d normalised local vectors
        di_all, dt_all = (di, dt) if ctx.shared else (torch.zeros_like(img_all), torch.zeros_like(txt_all))
        tiles = (s, g, pos, groups, groups_all, block, want_ds)
        ds = _strip_backward(img, inv_i, txt_all, inv_ta, lse_r, di, dt_all, *tiles)  # rows
        ds = ds + _strip_backward(txt, inv_t, img_all, inv_ia, lse_c, dt, di_all, *tiles)  # columns
        for a in range(0, img.shape[0], block):  # the positives
            di[a : a + block] -= (2 * g * s) * _unit(txt, inv_t, a, block)
            dt[a : a + block] -= (2 * g * s) * _unit(img, inv_i, a, block)
        grads = [(di, img, inv_i), (dt, txt, inv_t)]
        if not ctx.shared:
            grads += [(di_all, img_all, inv_ia), (dt_all, txt_all, inv_ta)]
        for grad, x, inv in grads:
            _normalize_backward_(grad, x, inv, block)
        ds = ds - 2 * g * positive
        d_all = (None, None) if ctx.shared else (di_all, dt_all)
        return di, dt, *d_all, (ds if want_ds else None), None, None, None, None


def _strip_lse(q, q_inv, k, k_inv, s, pos, q_groups, k_groups, block: int) -> torch.Tensor:
    """(n,) log-sum-exp of each row of s * q_hat @ k_hat.T, by tiles (streaming, -inf-safe)."""
    lse = q.new_empty(q.shape[0])
    for a in range(0, q.shape[0], block):
        qa = _unit(q, q_inv, a, block)  # (bq, D)
        m = q.new_full((qa.shape[0],), float("-inf"))  # running max
        acc = torch.zeros_like(m)  # running sum of exp(logit - max)
        for b in range(0, k.shape[0], block):
            logits = _tile(qa, _unit(k, k_inv, b, block), s, a, b, pos, q_groups, k_groups)[1]  # (bq, bk)
            m_new = torch.maximum(m, logits.amax(dim=1))
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            acc = acc * torch.exp(m - shift) + torch.exp(logits - shift[:, None]).sum(dim=1)
            m = m_new
        lse[a : a + block] = m + torch.log(acc)
    return lse


def _strip_backward(q, q_inv, k, k_inv, lse, dq, dk, s, g, pos, q_groups, k_groups, block: int,
                    want_ds: bool) -> torch.Tensor:
    """Add g * d(sum lse)/d q_hat and /d k_hat into dq, dk; return the part of d/d s (0 unless wanted)."""
    ds = torch.zeros((), dtype=q.dtype, device=q.device)
    for a in range(0, q.shape[0], block):
        qa = _unit(q, q_inv, a, block)  # (bq, D)
        for b in range(0, k.shape[0], block):
            kb = _unit(k, k_inv, b, block)  # (bk, D)
            dots, logits = _tile(qa, kb, s, a, b, pos, q_groups, k_groups)  # (bq, bk)
            w = torch.exp(logits - lse[a : a + block, None]) * g  # d/d logits, 0 where masked
            dq[a : a + block] += (w @ kb) * s
            dk[b : b + block] += (w.T @ qa) * s
            if want_ds:
                ds += (w * dots).sum()
    return ds


def _tile(qa, kb, s, a: int, b: int, pos, q_groups, k_groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile (a, b): dot products (bq, bk) and logits s * dots, with the excluded same-location
    keys at -inf (a key is never excluded from its own query's row)."""
    dots = qa @ kb.T  # (bq, bk)
    logits = dots * s
    if q_groups is None:
        return dots, logits
    cols = torch.arange(b, b + kb.shape[0], device=qa.device)
    same = q_groups[a : a + qa.shape[0], None] == k_groups[None, b : b + kb.shape[0]]  # (bq, bk)
    return dots, logits.masked_fill(same & (pos[a : a + qa.shape[0], None] != cols[None, :]), float("-inf"))


def _unit(x: torch.Tensor, inv: torch.Tensor, a: int, block: int) -> torch.Tensor:
    """Rows a .. a + block of x, normalised: (b, D)."""
    return x[a : a + block] * inv[a : a + block, None]


def _inv_norms(x: torch.Tensor, block: int) -> torch.Tensor:
    """1 / max(||x_n||, 1e-12) per row without an (N, D) temporary (F.normalize's eps): (N,)."""
    norms = torch.cat([x[a : a + block].norm(dim=1) for a in range(0, x.shape[0], block)] or [x.new_zeros(0)])
    return norms.clamp_min(1e-12).reciprocal()


def _normalize_backward_(grad: torch.Tensor, x: torch.Tensor, inv: torch.Tensor, block: int) -> None:
    """In place: gradient w.r.t. x_hat = x / ||x|| -> gradient w.r.t. x (blockwise)."""
    for a in range(0, x.shape[0], block):
        ga, xa = grad[a : a + block], _unit(x, inv, a, block)  # (b, D)
        ga.sub_(xa * torch.linalg.vecdot(xa, ga)[:, None]).mul_(inv[a : a + block, None])


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
    """The loss (docs/method.md#across-ranks) of this rank's pairs against all ranks' pairs (see module docstring).

    `scale` = 1/temperature (0-dim tensor, may require grad). `group_ids` (n,) enables the
    same-location exclusion. With one process this is exactly `info_nce`.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"expected two (N, D) tensors of equal shape, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    rank, world = distributed_world() if distributed else (0, 1)
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        img, txt = image_emb.float(), text_emb.float()  # (n, D) each; normalised inside the tiles
        n = img.shape[0]
        sizes = gather_sizes(n, img.device, world)  # [n] in one process
        start, total = sum(sizes[:rank]), sum(sizes)
        img_all, txt_all = gather_rows(img, sizes, rank), gather_rows(txt, sizes, rank)  # (N, D); img, txt in one process
        groups = None if group_ids is None else group_ids.to(img.device)
        groups_all = None if groups is None else gather_rows(groups, sizes, rank)
        scale = average_grad(scale.float(), world)  # shared by every rank: their mean gradient
        block = block_size if tiled else max(total, 1)  # plain: one tile
        pos = torch.arange(start, start + n, device=img.device)  # my pairs' global indices
        local_sum = _Strips.apply(img, txt, img_all, txt_all, scale, pos, groups, groups_all, block)
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
    """The loss (docs/method.md#training-loss) for (N, D) paired vectors on this process only (normalises both inside)."""
    scale = torch.tensor(1.0 / temperature, device=image_emb.device)
    return contrastive_loss(image_emb, text_emb, scale, group_ids, tiled, block_size, distributed=False)


class ContrastiveLoss(nn.Module):
    """The trainer's loss: local (n, D) embeddings in, global loss out (docs/method.md#across-ranks) (any world size).

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
