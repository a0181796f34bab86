"""Symmetric InfoNCE (docs/method.md#training-loss): one routine for one process or many ranks, plain or tiled.

How it is computed (plain vs tiled, the ranks, the gradient scaling): docs/models.md#the-loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from text4vpr.loss_defaults import DEFAULT_BLOCK, MAX_SCALE
from text4vpr.utils.distributed import all_reduce_sum, average_grad, distributed_world, gather_rows, gather_sizes


# ---------------------------------------------------------------------- the sum, by tiles
class _InfoNCESum(torch.autograd.Function):
    """This rank's sum_n [lse_row_n + lse_col_n - 2 s i_n.t_n] from raw fp32 embeddings.

    One process: rows and columns come from one logits matrix (one pass). Many ranks: rows are
    this rank's images vs all texts, columns its texts vs all images (two strips). `keep`:
    the normalised vectors and the logits are kept for the backward (plain); otherwise tiles
    of `block` x `block` exist one at a time and the backward recomputes them (tiled).
    """

    @staticmethod
    def forward(ctx, img, txt, img_all, txt_all, scale, pos, groups, groups_all, block: int, keep: bool):
        s, shared = scale.detach(), img_all is img
        ui, ut = _Unit(img, block, keep), _Unit(txt, block, keep)
        uia, uta = (ui, ut) if shared else (_Unit(img_all, block, keep), _Unit(txt_all, block, keep))
        mask = None if groups is None else (pos, groups, groups_all)
        passes = [(ui, ut, True)] if shared else [(ui, uta, False), (ut, uia, False)]  # (q, k, columns too)
        outs = [_lse_pass(q, k, columns, s, mask, block, keep) for q, k, columns in passes]  # (lse_r, lse_c, kept)
        positive = img.new_zeros(())  # sum_n i_hat_n . t_hat_n
        for a in range(0, img.shape[0], block):
            positive += torch.linalg.vecdot(ui.rows(a, block), ut.rows(a, block)).sum()
        total = (sum(lse.sum() for out in outs for lse in out[:2] if lse is not None) - 2 * s * positive).to(img.dtype)
        ctx.save_for_backward(img, txt, img_all, txt_all, pos, groups, groups_all)
        ctx.parts = (s, positive, [u.parts() for u in (ui, ut, uia, uta)], outs)  # intermediates
        ctx.block, ctx.shared = block, shared
        return total

    @staticmethod
    def backward(ctx, g):
        img, txt, img_all, txt_all, pos, groups, groups_all = ctx.saved_tensors
        (s, positive, units, outs), block, shared = ctx.parts, ctx.block, ctx.shared
        del ctx.parts  # one backward (it overwrites the kept logits); they go when it ends
        ui, ut, uia, uta = (_Unit(x, block, False, *p) for x, p in zip((img, txt, img_all, txt_all), units))
        mask = None if groups is None else (pos, groups, groups_all)
        di, dt = torch.zeros_like(img), torch.zeros_like(txt)  # d/d normalised local vectors
        di_all, dt_all = (di, dt) if shared else (torch.zeros_like(img_all), torch.zeros_like(txt_all))
        passes = [(ui, ut, di, dt)] if shared else [(ui, uta, di, dt_all), (ut, uia, dt, di_all)]
        want_ds = ctx.needs_input_grad[4]
        ds = torch.zeros((), dtype=img.dtype, device=img.device)
        for (q, k, dq, dk), (lse_r, lse_c, kept) in zip(passes, outs):
            _grad_pass(q, k, dq, dk, lse_r, lse_c, kept, s, g, mask, block)
            for a in range(0, q.x.shape[0], block) if want_ds else ():  # d/ds sum w * dots = sum q_hat . dq / s
                ds += torch.linalg.vecdot(q.rows(a, block), dq[a : a + block]).sum() / s
        gs2 = 2 * g * s
        for a in range(0, img.shape[0], block):  # the positives
            di[a : a + block].addcmul_(ut.rows(a, block), gs2, value=-1)
            dt[a : a + block].addcmul_(ui.rows(a, block), gs2, value=-1)
        for grad, u in [(di, ui), (dt, ut)] + ([] if shared else [(di_all, uia), (dt_all, uta)]):
            u.normalize_backward_(grad)
        ds = ds - 2 * g * positive if want_ds else None
        d_all = (None, None) if shared else (di_all, dt_all)
        return di, dt, *d_all, ds, None, None, None, None, None


class _Unit:
    """Rows of x / max(||x||, 1e-12) (F.normalize): all at once when `whole` (the plain loss),
    else computed block by block when asked (no (N, D) copy: the tiled loss's memory)."""

    def __init__(self, x: torch.Tensor, block: int, whole: bool, inv=None, hat=None):
        self.x, self.block = x, block
        self.inv = _inv_norms(x, block) if inv is None else inv  # (N,)
        self.hat = x * self.inv[:, None] if whole else hat  # (N, D) or None

    def parts(self) -> tuple:
        return self.inv, self.hat

    def rows(self, a: int, n: int, scale=None) -> torch.Tensor:
        """Rows a .. a + n, normalised (and times `scale`): (n, D)."""
        if self.hat is not None:
            return self.hat[a : a + n] if scale is None else self.hat[a : a + n] * scale
        inv = self.inv[a : a + n, None]
        return self.x[a : a + n] * (inv if scale is None else inv * scale)

    def normalize_backward_(self, grad: torch.Tensor) -> None:
        """In place: gradient w.r.t. x_hat -> gradient w.r.t. x (blockwise)."""
        for a in range(0, self.x.shape[0], self.block):
            ga, xa = grad[a : a + self.block], self.rows(a, self.block)  # (b, D)
            ga.addcmul_(xa, torch.linalg.vecdot(xa, ga)[:, None], value=-1).mul_(self.inv[a : a + self.block, None])


def _inv_norms(x: torch.Tensor, block: int) -> torch.Tensor:
    """1 / max(||x_n||, 1e-12) per row without an (N, D) temporary: (N,)."""
    norms = torch.cat([x[a : a + block].norm(dim=1) for a in range(0, x.shape[0], block)] or [x.new_zeros(0)])
    return norms.clamp_min(1e-12).reciprocal()


def _lse_pass(q: _Unit, k: _Unit, columns: bool, s, mask, block: int, keep: bool):
    """Row log-sum-exps (nq,) of s * q_hat @ k_hat.T, its column ones (nk,) when `columns`
    (float64), and the logits (nq, nk) when `keep`; by tiles (`keep`: rows against all of k)."""
    nq, nk = q.x.shape[0], k.x.shape[0]
    lse_r = q.x.new_full((nq,), float("-inf"), dtype=torch.float64)
    lse_c = q.x.new_full((nk,), float("-inf"), dtype=torch.float64) if columns else None
    kept = q.x.new_empty((nq, nk)) if keep else None
    for a in range(0, nq, block):
        qa_s = q.rows(a, block, s)  # (bq, D), s on this side: no (bq, bk) pass for it
        rows = slice(a, a + qa_s.shape[0])
        for b in range(0, nk, nk if keep else block):
            kb = k.rows(b, nk if keep else block)  # (bk, D)
            logits = _logits(qa_s, kb, a, b, mask, None if kept is None else kept[rows])  # (bq, bk)
            lse_r[rows] = torch.logaddexp(lse_r[rows], _lse64(logits, 1))
            if columns:
                cols = slice(b, b + kb.shape[0])
                lse_c[cols] = torch.logaddexp(lse_c[cols], _lse64(logits, 0))
    return lse_r, lse_c, kept


def _lse64(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp along `dim`, returned in float64: max + log(sum) without rounding their sum
    to float32 (whose ulp at |lse| ~ 10 would shift every softmax weight of the row)."""
    m = logits.amax(dim)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # a wholly masked line: exp(-inf) = 0
    total = (logits - m.unsqueeze(dim)).exp_().sum(dim)
    return m.double() + total.double().log()


def _split(lse: torch.Tensor | None, gs: torch.Tensor):
    """float64 lse -> (lse_hi, gs * exp(hi - lse)) in the logits' dtype: g * s * exp(l - lse)
    as exp(l - lse_hi) times a per-line factor, in float32 yet as exact as the lse."""
    if lse is None:
        return None, None
    hi = lse.to(gs.dtype)
    return hi, (hi.double() - lse).exp_().to(gs.dtype) * gs


def _grad_pass(q: _Unit, k: _Unit, dq, dk, lse_r, lse_c, kept, s, g, mask, block: int) -> None:
    """Add g * d(sum of the lses)/d q_hat into dq and /d k_hat into dk; the logits are `kept`
    or recomputed tile by tile."""
    nq, nk = q.x.shape[0], k.x.shape[0]
    kblock = nk if kept is not None else block
    (hi_r, f_r), (hi_c, f_c) = _split(lse_r, g * s), _split(lse_c, g * s)
    for a in range(0, nq, block):
        qa = q.rows(a, block)  # (bq, D)
        qa_s = q.rows(a, block, s) if kept is None else None
        rows = slice(a, a + qa.shape[0])
        for b in range(0, nk, kblock):
            kb = k.rows(b, kblock)  # (bk, D)
            cols = slice(b, b + kb.shape[0])
            logits = kept[rows] if kept is not None else _logits(qa_s, kb, a, b, mask)  # (bq, bk)
            w = (logits - hi_r[rows, None]).exp_().mul_(f_r[rows, None])  # g s softmax over the row; 0 where masked
            if lse_c is not None:  # and over the column, in the logits' place (used once: one backward)
                w.addcmul_(logits.sub_(hi_c[None, cols]).exp_(), f_c[None, cols])
            dq[rows].addmm_(w, kb)
            dk[cols].addmm_(w.T, qa)


def _logits(qa_s, kb, a: int, b: int, mask, out=None) -> torch.Tensor:
    """Tile (a, b): qa_s @ kb.T (bq, bk) (qa_s = s * q_hat rows), the excluded same-location
    keys at -inf (a key is never excluded from its own query's row); written into `out` when given."""
    logits = torch.matmul(qa_s, kb.T, out=out)
    if mask is None:
        return logits
    pos, q_groups, k_groups = mask
    cols = torch.arange(b, b + kb.shape[0], device=qa_s.device)
    same = q_groups[a : a + qa_s.shape[0], None] == k_groups[None, b : b + kb.shape[0]]  # (bq, bk)
    return logits.masked_fill_(same & (pos[a : a + qa_s.shape[0], None] != cols[None, :]), float("-inf"))


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
    """The loss (docs/method.md#across-ranks) of this rank's (n, D) pairs against all ranks' pairs.

    `scale` = 1/temperature (0-dim tensor, may require grad). `group_ids` (n,) enables the
    same-location exclusion. The value is the global loss on every rank; the gradient is
    scaled so that DDP's averaging yields the single-process gradient.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"expected two (N, D) tensors of equal shape, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    rank, world = distributed_world() if distributed else (0, 1)
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        dtype = torch.promote_types(image_emb.dtype, torch.float32)  # fp32 math (fp64 when given fp64)
        img, txt = image_emb.to(dtype), text_emb.to(dtype)  # (n, D) each; normalised inside the tiles
        n = img.shape[0]
        sizes = gather_sizes(n, img.device, world)  # [n] in one process
        start, total = sum(sizes[:rank]), sum(sizes)
        img_all, txt_all = gather_rows(img, sizes, rank), gather_rows(txt, sizes, rank)  # (N, D); img, txt in one process
        groups = None if group_ids is None else group_ids.to(img.device)
        groups_all = None if groups is None else gather_rows(groups, sizes, rank)
        scale = average_grad(scale.to(dtype), world)  # shared by every rank: their mean gradient
        keep = not tiled or total <= block_size  # one tile: keep the logits, never recompute them
        pos = torch.arange(start, start + n, device=img.device)  # my pairs' global indices
        local_sum = _InfoNCESum.apply(img, txt, img_all, txt_all, scale, pos, groups, groups_all, block_size, keep)
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

    learnable=True trains log(1/temperature); call `clamp_scale_()` after each optimizer step
    (scale <= MAX_SCALE, open_clip's rule: a clamp in the forward would zero its gradient).
    """

    def __init__(self, temperature: float = 0.1, learnable: bool = False, tiled: bool = False,
                 exclude_same_location: bool = False, block_size: int = DEFAULT_BLOCK,
                 distributed: bool = True):
        super().__init__()
        if temperature <= 0 or (learnable and 1.0 / temperature > MAX_SCALE):
            raise ValueError(f"temperature must be > 0 (>= {1 / MAX_SCALE} when learnable), got {temperature}")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        self.tiled, self.exclude_same_location, self.block_size = tiled, exclude_same_location, block_size
        self.distributed = distributed  # False: this process's pairs only, even under torch.distributed

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale.detach())

    @torch.no_grad()
    def clamp_scale_(self) -> None:
        """After an optimizer step: a learnable scale back to <= MAX_SCALE (a fixed one is left as given)."""
        if isinstance(self.log_scale, nn.Parameter):
            self.log_scale.clamp_(max=math.log(MAX_SCALE))

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
