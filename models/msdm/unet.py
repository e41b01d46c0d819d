"""MSDM denoising UNet on VAE latents, conditioned on CLIP text tokens.

    x_t [B, 8, h, w] (+ self-condition x0 estimate, 8 more channels) -> epsilon [B, 8, h, w]

Layout (paper preset: channels 256/512/1024 at 32/16/8 for a 256 px image):
  conv_in; down: per level `layers_per_block` x [ResBlock -> CrossAttention -> FeedForward], strided-conv downsample
  between levels; middle: ResBlock -> CrossAttention -> FeedForward -> ResBlock; up: per level
  `layers_per_block + 1` x [ResBlock on (h ++ skip) -> CrossAttention -> FeedForward], upsample between levels;
  GN-SiLU-conv_out (zero-init). With 3 levels x 2 blocks that is 6 + 1 + 9 = 16 attention blocks, as published.

Conditioning vector = MLP(sinusoidal(t)) + MLP(attention-pooled text), `emb_dim` wide (1024 = 4 x 256, the released
time/condition embedding width, as in Stable Diffusion); it is ADDED inside every ResBlock after its first conv.
Dropout (p=`dropout`): with `dropout_layout="released"` (default) channel-wise Dropout2d after both conv sub-blocks
of every ResBlock, as the released blocks; "ddpm" = element-wise before the second conv only. The attention output
gets dropout `attn_dropout` (None = `dropout`, as released), every FeedForward dropout after the GELU. Text:
keys/values of each cross-attention are projections of the CLIP last hidden state, with the padding mask, so padding
tokens never receive attention.

Parameter count of the paper preset: 323.7 M against the paper's 326.5 M (-0.8 %); `harness models info msdm`
explains the residual (the embedding/pooling layers the paper does not describe), no knob was tuned to hit it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from models.msdm.blocks import (AttentionPool, CrossAttention, Downsample, FeedForward, ResBlock, Upsample, group_norm,
                                timestep_embedding, zero_module)


class _Level(nn.Module):
    """ResBlock -> CrossAttention -> FeedForward (one 'block' of the MSDM UNet)."""

    def __init__(self, in_ch, out_ch, emb_dim, context_dim, head_dim, ff_mult, dropout, groups, dropout_layout,
                 attn_dropout):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout, groups, dropout_layout)
        self.attn = CrossAttention(out_ch, context_dim, head_dim, groups, attn_dropout)
        self.ff = FeedForward(out_ch, ff_mult, dropout, groups)

    def forward(self, x, emb, context, mask):
        return self.ff(self.attn(self.res(x, emb), context, mask))


class MSDMUNet(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 8, out_channels: int = 8, block_out_channels: tuple = (256, 512, 1024),
                 layers_per_block: int = 2, context_dim: int = 768, emb_dim: int = 1024, head_dim: int = 64,
                 ff_mult: int = 4, dropout: float = 0.1, norm_groups: int = 32, self_condition: bool = True,
                 dropout_layout: str = "released", attn_dropout: float | None = None):
        super().__init__()
        ch = list(block_out_channels)
        self.self_condition = self_condition
        attn_dropout = dropout if attn_dropout is None else attn_dropout
        lvl = dict(emb_dim=emb_dim, context_dim=context_dim, head_dim=head_dim, ff_mult=ff_mult, dropout=dropout,
                   groups=norm_groups, dropout_layout=dropout_layout, attn_dropout=attn_dropout)
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_pool = AttentionPool(context_dim, emb_dim, head_dim)
        self.text_mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.conv_in = nn.Conv2d(in_channels * (2 if self_condition else 1), ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, prev = [ch[0]], ch[0]
        for i, c in enumerate(ch):
            for _ in range(layers_per_block):
                self.down.append(_Level(prev, c, **lvl))
                prev = c
                skips.append(c)
            if i < len(ch) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
        self.mid_res1 = ResBlock(prev, prev, emb_dim, dropout, norm_groups, dropout_layout)
        self.mid_attn = CrossAttention(prev, context_dim, head_dim, norm_groups, attn_dropout)
        self.mid_ff = FeedForward(prev, ff_mult, dropout, norm_groups)
        self.mid_res2 = ResBlock(prev, prev, emb_dim, dropout, norm_groups, dropout_layout)
        self.up = nn.ModuleList()
        for i, c in reversed(list(enumerate(ch))):
            for _ in range(layers_per_block + 1):
                self.up.append(_Level(prev + skips.pop(), c, **lvl))
                prev = c
            if i > 0:
                self.up.append(Upsample(c))
        self.out = nn.Sequential(group_norm(prev, norm_groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(prev, out_channels, 3, padding=1)))

    def condition(self, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The vector added in every ResBlock: time embedding + pooled text."""
        temb = self.time_mlp(timestep_embedding(t, self.config.block_out_channels[0]).to(context.dtype))
        return temb + self.text_mlp(self.text_pool(context, mask))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
                self_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,C,h,w], t [B] (0..T-1), context [B,L,D], mask [B,L] bool, self_cond [B,C,h,w] (x0 estimate or None
        = zeros). Returns the epsilon prediction [B,C,h,w]."""
        if self.self_condition:
            x = torch.cat([x, torch.zeros_like(x) if self_cond is None else self_cond], dim=1)
        emb = self.condition(t, context, mask)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb, context, mask)
            hs.append(h)
        h = self.mid_res2(self.mid_ff(self.mid_attn(self.mid_res1(h, emb), context, mask)), emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, hs.pop()], dim=1), emb, context, mask)
        return self.out(h)
