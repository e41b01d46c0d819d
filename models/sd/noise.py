"""Training-noise variants and loss weights as kohya's sd-scripts and diffusers' trainers define them.

Every random draw comes from the caller's `torch.Generator` (the training loop's per-step CPU generator), so a
resumed run draws the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """"Original" noise offset (sd-scripts `apply_noise_offset`, diffusers `--noise_offset`): add
    offset * N(0, 1) per (sample, channel), constant over the image, so the model learns to shift mean brightness."""
    b, c = noise.shape[:2]
    return noise + offset * _randn((b, c, 1, 1), generator, noise)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, sd-scripts `pyramid_noise_like`: for i = 0..iterations-1 draw a random
    ratio r in [2, 4), add bilinear-upsampled N(0, 1) noise of size (H / r^i, W / r^i) weighted by discount^i, stop
    once a side reaches 1, then rescale the whole batch to unit standard deviation."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        low = _randn((b, c, hn, wn), generator, noise)
        out = out + F.interpolate(low.float(), size=(h, w), mode="bilinear").to(noise.dtype) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.to(t.device)[t].float()
    return ac / (1 - ac)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an MSE on the model output, as diffusers' trainers apply
    them: epsilon target min(snr, gamma) / snr; v target min(snr, gamma) / (snr + 1); x0 target min(snr, gamma)."""
    clipped = snr_t.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
