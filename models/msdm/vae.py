"""MSDM image autoencoder: RGB [-1, 1] -> 8-channel latent at 1/8 resolution (256 px -> 8 x 32 x 32) and back.

Encoder: 3x3 conv_in, then per level `encoder_layers[i]` residual blocks (GroupNorm + SiLU) and a strided-conv
downsample (not after the last level), then GN-SiLU-1x1 conv to 2 x latent channels = the diagonal Gaussian
posterior (mean, logvar). Decoder: 1x1 conv_in, per level (coarse to fine) `decoder_layers[i]` residual blocks and a
nearest-upsample + conv that also halves the channels, GN-SiLU-3x3 conv to RGB. No attention, as in the paper.

The paper preset has no residual block at the encoder's full-resolution level (`encoder_layers=(0, 1, 1, 1)`): at
256 px that block would cost the most FLOPs of the encoder, while the decoder, which has to draw the detail, keeps
its full-resolution block. This lands on the published 13.4 M parameters (13.44 M).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from models.msdm.blocks import Downsample, ResBlock, Upsample, group_norm


class MSDMAutoencoder(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 3, latent_channels: int = 8,
                 block_out_channels: tuple = (64, 128, 256, 512), encoder_layers: tuple = (0, 1, 1, 1),
                 decoder_layers: tuple = (1, 1, 1, 1), norm_groups: int = 32, logvar_clamp: tuple = (-30.0, 20.0)):
        super().__init__()
        ch = list(block_out_channels)
        if not (len(encoder_layers) == len(decoder_layers) == len(ch)):
            raise ValueError("encoder_layers and decoder_layers need one entry per block_out_channels level")
        self.downsample_factor = 2 ** (len(ch) - 1)
        self.enc_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        enc: list[nn.Module] = []
        prev = ch[0]
        for i, c in enumerate(ch):
            for _ in range(encoder_layers[i]):
                enc.append(ResBlock(prev, c, groups=norm_groups))
                prev = c
            if i < len(ch) - 1:
                enc.append(Downsample(prev))
        self.encoder = nn.Sequential(*enc)
        self.enc_out = nn.Sequential(group_norm(prev, norm_groups), nn.SiLU(), nn.Conv2d(prev, 2 * latent_channels, 1))

        self.dec_in = nn.Conv2d(latent_channels, ch[-1], 1)
        dec: list[nn.Module] = []
        for i in reversed(range(len(ch))):
            dec += [ResBlock(ch[i], ch[i], groups=norm_groups) for _ in range(decoder_layers[i])]
            if i > 0:
                dec.append(Upsample(ch[i], ch[i - 1]))
        self.decoder = nn.Sequential(*dec)
        self.dec_out = nn.Sequential(group_norm(ch[0], norm_groups), nn.SiLU(), nn.Conv2d(ch[0], in_channels, 3, padding=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar), each [B, latent, H/8, W/8]."""
        mean, logvar = self.enc_out(self.encoder(self.enc_in(x))).chunk(2, dim=1)
        lo, hi = self.config.logvar_clamp
        return mean, logvar.clamp(lo, hi)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec_out(self.decoder(self.dec_in(z)))

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Reparameterised draw z = mean + sigma * noise (noise=None -> the mean)."""
        return mean if noise is None else mean + torch.exp(0.5 * logvar) * noise

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """(reconstruction, mean, logvar); `noise` (same shape as the latent) makes the draw reproducible."""
        mean, logvar = self.encode(x)
        return self.decode(self.sample(mean, logvar, noise)), mean, logvar

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, summed over latent elements."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
