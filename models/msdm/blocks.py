"""Small building blocks shared by the MSDM VAE and UNet (GroupNorm + SiLU residual blocks, cross-attention,
feed-forward, embeddings). Every block takes NCHW feature maps; text enters as [B, L, D] tokens + [B, L] mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels` (tiny presets have few channels)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


def zero_module(m: nn.Module) -> nn.Module:
    """Zero-init the last layer of a residual branch, so every block starts as the identity (stable from scratch)."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def dropout_layer(p: float, channelwise: bool) -> nn.Module:
    """`nn.Dropout2d` (whole feature maps, as the released MSDM/Medfusion blocks via MONAI's dropout layer with
    dropout_dim=2) or element-wise `nn.Dropout` (DDPM/ADM)."""
    return nn.Dropout2d(p) if channelwise else nn.Dropout(p)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 [+ conditioning] [-> Dropout] -> GN -> SiLU -> Dropout -> conv3x3, plus a (1x1) skip.

    The conditioning vector (time + pooled text) is projected to `out_ch` and ADDED to the features after the first
    conv (as in the released MSDM/Medfusion and DDPM). `dropout_layout`: "released" = channel-wise Dropout2d after
    BOTH conv sub-blocks (the released UnetResBlock is two conv-norm-dropout-act sub-blocks); "ddpm" = element-wise
    dropout before the second conv only (DDPM/ADM).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None, dropout: float = 0.0, groups: int = 32,
                 dropout_layout: str = "released"):
        super().__init__()
        if dropout_layout not in ("released", "ddpm"):
            raise ValueError(f"dropout_layout must be 'released' or 'ddpm', got {dropout_layout!r}")
        released = dropout_layout == "released"
        self.norm1, self.conv1 = group_norm(in_ch, groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch) if emb_dim else None
        self.dropout1 = dropout_layer(dropout, True) if released else nn.Identity()
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = dropout_layer(dropout, released)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(self.dropout1(h)))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3 conv, /2."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (no checkerboard artefacts from transposed convs); may change the channel count."""

    def __init__(self, ch: int, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B,N,C], k/v [B,L,C], mask [B,L] (True = real token) -> [B,N,C]."""
    B, N, C = q.shape
    split = lambda t: t.reshape(B, t.shape[1], heads, C // heads).transpose(1, 2)  # noqa: E731
    attn_mask = mask[:, None, None, :] if mask is not None else None
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(B, N, C)


class CrossAttention(nn.Module):
    """Pixels attend to text tokens: queries from GN(x), keys/values = projected text tokens, padding masked out.
    Residual, output projection zero-initialised, dropout on the attention output (as the released blocks)."""

    def __init__(self, ch: int, context_dim: int, head_dim: int = 64, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.heads = max(1, ch // head_dim)
        self.norm = group_norm(ch, groups)
        self.to_q = nn.Linear(ch, ch, bias=False)
        self.to_k = nn.Linear(context_dim, ch, bias=False)
        self.to_v = nn.Linear(context_dim, ch, bias=False)
        self.to_out = zero_module(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        out = _attend(self.to_q(h), self.to_k(context), self.to_v(context), self.heads, mask)
        return x + self.dropout(self.to_out(out)).transpose(1, 2).reshape(B, C, H, W)


class FeedForward(nn.Module):
    """GN -> 1x1 conv C->4C -> GELU -> Dropout -> 1x1 conv 4C->C, residual (the MSDM block after each attention)."""

    def __init__(self, ch: int, mult: int = 4, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.net = nn.Sequential(nn.Conv2d(ch, ch * mult, 1), nn.GELU(), nn.Dropout(dropout),
                                 zero_module(nn.Conv2d(ch * mult, ch, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(self.norm(x))


class AttentionPool(nn.Module):
    """One learned query attends over the text tokens (padding masked) -> a single text vector of `out_dim`.
    Unlike CLIP's EOS-token pooling this is trained with the UNet, so it can weight the words that matter here."""

    def __init__(self, context_dim: int, out_dim: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, context_dim // head_dim)
        self.query = nn.Parameter(torch.randn(1, 1, context_dim) / math.sqrt(context_dim))
        self.to_k = nn.Linear(context_dim, context_dim, bias=False)
        self.to_v = nn.Linear(context_dim, context_dim, bias=False)
        self.proj = nn.Linear(context_dim, out_dim)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.query.expand(context.shape[0], -1, -1).to(context.dtype)
        pooled = _attend(q, self.to_k(context), self.to_v(context), self.heads, mask)[:, 0]
        return self.proj(pooled)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim] (cos | sin halves)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))
