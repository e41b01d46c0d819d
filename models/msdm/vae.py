"""MSDM image autoencoder: RGB [-1, 1] -> 8-channel latent at 1/8 resolution (256 px -> 8 x 32 x 32) and back.

The blocks are those of the released MSDM / Medfusion VAE (`latent_embedders.VAE` with hid_chs 64/128/256/512,
strides 1/2/2/2, emb_channels 8, deep_supervision 1, no attention), built from plain torch layers:

  * conv sub-block = conv -> GroupNorm -> SiLU (post-activation, MONAI order), with a residual (1x1 conv when the
    channel count changes); a "res block" is two of them, the second conv zero-initialised;
  * encoder: res block (3 -> 64) at full resolution, then per level a stride-2 3x3 conv (c_prev -> c) + res block;
    out: 3x3 conv 512 -> 2x8 and 1x1 conv 16 -> 16 (no norm) = the diagonal Gaussian posterior (mean, logvar);
  * decoder: res block (8 -> 512), then per level nearest x2 + 3x3 conv (c -> c_next) + res block; 1x1 conv to RGB
    (zero-init). A second 1x1 head reads the decoder at half resolution (`deep_supervision`, released: 1): its
    output is trained against the half-size image too (see the VAE loss) and unused at inference.

Paper preset: 13,365,094 parameters (the paper: 13.4 M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from models.msdm.blocks import zero_module


class _ConvSub(nn.Module):
    """conv -> GN -> SiLU (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, groups: int, zero: bool = False, act: bool = True):
        super().__init__()
        conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
        self.conv = zero_module(conv) if zero else conv
        self.norm = nn.GroupNorm(groups, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x))) + self.skip(x)


class _ResBlock(nn.Sequential):
    """Two conv sub-blocks, the second zero-initialised (starts close to the identity)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__(_ConvSub(in_ch, out_ch, 3, groups), _ConvSub(out_ch, out_ch, 3, groups, zero=True))


class MSDMAutoencoder(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 3, latent_channels: int = 8, block_out_channels: tuple = (64, 128, 256, 512),
                 norm_groups: int = 8, deep_supervision: int = 1, logvar_clamp: tuple = (-30.0, 20.0)):
        super().__init__()
        ch = list(block_out_channels)
        if not 0 <= deep_supervision < len(ch):
            raise ValueError(f"deep_supervision must be in [0, {len(ch) - 1}], got {deep_supervision}")
        self.downsample_factor = 2 ** (len(ch) - 1)
        self.enc_in = _ResBlock(in_channels, ch[0], norm_groups)
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch[i - 1], ch[i], 3, stride=2, padding=1), _ResBlock(ch[i], ch[i], norm_groups))
            for i in range(1, len(ch)))
        self.enc_out = nn.Sequential(nn.Conv2d(ch[-1], 2 * latent_channels, 3, padding=1),
                                     nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1))
        self.dec_in = _ResBlock(latent_channels, ch[-1], norm_groups)
        # decoder[i] takes ch[i+1] -> ch[i]; run from the coarsest (i = len-2) to the finest (i = 0)
        self.decoder = nn.ModuleList(
            nn.ModuleDict({"up": nn.Conv2d(ch[i + 1], ch[i], 3, padding=1),
                           "res": _ResBlock(ch[i], ch[i], norm_groups)})
            for i in range(len(ch) - 1))
        self.dec_out = zero_module(nn.Conv2d(ch[0], in_channels, 1))
        # aux head k reads the decoder's output at level k (1/2**k resolution)
        self.aux_out = nn.ModuleList(zero_module(nn.Conv2d(ch[k], in_channels, 1))
                                     for k in range(1, deep_supervision + 1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar), each [B, latent, H/8, W/8]."""
        h = self.enc_in(x)
        for block in self.encoder:
            h = block(h)
        mean, logvar = self.enc_out(h).chunk(2, dim=1)
        lo, hi = self.config.logvar_clamp
        return mean, logvar.clamp(lo, hi)

    def decode_with_aux(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(image, [aux image at 1/2, ...]) - the aux outputs exist for the deep-supervision loss only."""
        h = self.dec_in(z)
        aux: list[torch.Tensor] = []
        for i in reversed(range(len(self.decoder))):
            if i < len(self.aux_out):  # the input of decoder[i] is the feature map at level i + 1
                aux.append(self.aux_out[i](h))
            block = self.decoder[i]
            h = block["res"](block["up"](F.interpolate(h, scale_factor=2.0, mode="nearest")))
        return self.dec_out(h), aux[::-1]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_with_aux(z)[0]

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Reparameterised draw z = mean + sigma * noise (noise=None -> the mean)."""
        return mean if noise is None else mean + torch.exp(0.5 * logvar) * noise

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """(reconstruction, mean, logvar, aux reconstructions); `noise` (latent-shaped) makes the draw reproducible."""
        mean, logvar = self.encode(x)
        recon, aux = self.decode_with_aux(self.sample(mean, logvar, noise))
        return recon, mean, logvar, aux

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, summed over latent elements."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
