"""A minimal re-creation of the published Text4VPR modules, for the conversion tests.

Written here from reading the published code (nuozimiaowu/Text4VPR: models/backbone.py,
models/Image_Aggregation.py, models/T5_model.py, test/test.py) and the DINOv2 hub model
(facebookresearch/dinov2: dinov2/models/vision_transformer.py). What matters is kept as
published: the class and attribute names (so `state_dict()` has the published keys: hub
`blocks.i.attn.qkv`, `ls1.gamma`, `1.temperature`, `get_mlp2`'s nested `inter_mlp.0.0/0.1`,
the unused `intra_module`) and the forward math (hub position-embedding resize with the
0.1 offset, Sinkhorn with both marginals -log n, `exp(p / T) + exp(p)`, max over all tokens,
residual layers on a (N, D) sequence, one image or description at a time). Tiny shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------- DINOv2 (hub naming)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, hw, C)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)  # (B, h, N, N)
        out = att.softmax(dim=-1) @ v  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class HubViT(nn.Module):
    """The DINOv2 hub model's parameters and token preparation (no register tokens)."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int, table_side: int):
        super().__init__()
        self.patch_size = patch
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + table_side**2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def interpolate_pos_encoding(self, x, h_px: int, w_px: int):
        n = self.pos_embed.shape[1] - 1
        if x.shape[1] - 1 == n and h_px == w_px:
            return self.pos_embed
        m = int(math.sqrt(n))
        h0, w0 = h_px // self.patch_size, w_px // self.patch_size
        table = self.pos_embed.float()
        grid = table[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False)
        assert grid.shape[-2:] == (h0, w0)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat((table[:, :1], grid), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x):
        _, _, h_px, w_px = x.shape
        t = self.patch_embed(x)
        t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        return t + self.interpolate_pos_encoding(t, h_px, w_px)


class DINOv2(nn.Module):
    """The published backbone wrapper: hub model as `.model`, frozen first blocks, no final norm."""

    def __init__(self, vit: HubViT, num_trainable_blocks: int = 1, return_token: bool = True):
        super().__init__()
        self.model = vit
        self.num_trainable_blocks = num_trainable_blocks
        self.return_token = return_token

    def forward(self, x):
        b, _, h, w = x.shape
        t = self.model.prepare_tokens_with_masks(x)
        with torch.no_grad():
            for blk in self.model.blocks[: -self.num_trainable_blocks]:
                t = blk(t)
        t = t.detach()
        for blk in self.model.blocks[-self.num_trainable_blocks :]:
            t = blk(t)
        p = self.model.patch_size
        f = t[:, 1:].reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2)
        return (f, t[:, 0]) if self.return_token else f


# ----------------------------------------------------------------- aggregation


def matching_log_probs(scores, iters: int = 3):
    """Log-domain Sinkhorn on (B, K, N) scores, both marginals -log N, plus log N."""
    n = scores.shape[-1]
    norm = -math.log(n)
    u = torch.zeros(scores.shape[:2])
    v = torch.zeros(scores.shape[0], n)
    for _ in range(iters):
        u = norm - torch.logsumexp(scores + v.unsqueeze(1), dim=2)
        v = norm - torch.logsumexp(scores + u.unsqueeze(2), dim=1)
    return scores + u.unsqueeze(2) + v.unsqueeze(1) - norm


class image_aggregation(nn.Module):  # noqa: N801 (the published class name)
    def __init__(self, num_channels, num_clusters, cluster_dim, dropout=0.3, temperature=1.0):
        super().__init__()
        self.num_clusters, self.cluster_dim = num_clusters, cluster_dim
        self.temperature = nn.Parameter(torch.tensor(temperature))  # 0-dim, as published
        drop = nn.Dropout(dropout)  # one module shared by both heads, as published
        self.cluster_features = nn.Sequential(nn.Conv2d(num_channels, 512, 1), drop, nn.ReLU(), nn.Conv2d(512, cluster_dim, 1))
        self.score = nn.Sequential(nn.Conv2d(num_channels, 512, 1), drop, nn.ReLU(), nn.Conv2d(512, num_clusters, 1))

    def forward(self, x):
        if isinstance(x, tuple):
            x = x[0]
        f = self.cluster_features(x).flatten(2)  # (B, D, N)
        p = matching_log_probs(self.score(x).flatten(2))  # (B, K, N)
        p = torch.exp(p / self.temperature) + torch.exp(p)
        g = (f.unsqueeze(2) * p.unsqueeze(1)).sum(-1)  # (B, D, K)
        return F.normalize(g.flatten(1), p=2, dim=-1)


# ----------------------------------------------------------------- text


def get_mlp2(channels):
    """As published: each layer a Sequential; the last one Linear + BatchNorm1d without ReLU."""
    layers = []
    for i in range(1, len(channels)):
        mods = [nn.Linear(channels[i - 1], channels[i]), nn.BatchNorm1d(channels[i])]
        if i < len(channels) - 1:
            mods.append(nn.ReLU())
        layers.append(nn.Sequential(*mods))
    return nn.Sequential(*layers)


class LanguageEncoder(nn.Module):
    """The published text tower on token ids (the T5 model is given, not downloaded)."""

    def __init__(self, embedding_dim: int, llm_model: nn.Module, layers: int = 2, heads: int = 4):
        super().__init__()
        self.llm_model = llm_model
        width = llm_model.config.d_model
        self.intra_module = nn.ModuleList(nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width) for _ in range(layers))
        self.inter_mlp = get_mlp2([width, embedding_dim])
        self.inter_module = nn.ModuleList(
            nn.TransformerEncoderLayer(embedding_dim, heads, dim_feedforward=4 * embedding_dim) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        hidden = self.llm_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        x = hidden.max(dim=1)[0]  # (N, H): over every token, padding included
        if x.shape[0] == 1:
            self.inter_mlp.eval()
            with torch.no_grad():
                x = self.inter_mlp(x)
            self.inter_mlp.train()
        else:
            x = self.inter_mlp(x)
        for layer in self.inter_module:
            x = x + layer(x)  # (N, D) is one unbatched sequence of length N
        return x


# ----------------------------------------------------------------- building and saving


def perturb_constants(*modules: nn.Module, seed: int = 0) -> None:
    """Give every (near-)constant floating tensor random values, so no wrong mapping hides
    behind zeros and ones (norm weights, biases, layer scales, BatchNorm statistics, tokens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for _, t in list(module.named_parameters()) + list(module.named_buffers()):
                if t.is_floating_point() and (t.numel() == 1 or float(t.std()) < 1e-3):
                    t.add_(torch.rand(t.shape, generator=g) * 0.2 - 0.1)


def build_published(vocab_size: int = 300, seed: int = 0):
    """(image_encoder, text_encoder, dinov2_config, t5_config) of tiny published-structure modules."""
    from transformers import Dinov2Config, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    dim, depth, heads, patch, side = 32, 2, 2, 14, 4  # table for 56 px inputs
    image_encoder = nn.Sequential(DINOv2(HubViT(dim, depth, heads, patch, side), num_trainable_blocks=1),
                                  image_aggregation(dim, num_clusters=4, cluster_dim=16))
    t5_config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    text_encoder = LanguageEncoder(64, T5EncoderModel(t5_config))
    perturb_constants(image_encoder, text_encoder, seed=seed)
    with torch.no_grad():
        image_encoder[1].temperature.fill_(0.6)
    dino_config = Dinov2Config(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
                               image_size=patch * side, mlp_ratio=4, layerscale_value=1.0, layer_norm_eps=1e-6,
                               hidden_act="gelu", qkv_bias=True)
    return image_encoder.eval(), text_encoder.eval(), dino_config, t5_config
