"""Gaussian diffusion for MSDM: noise schedule, forward process, and DDPM-ancestral / DDIM samplers with
classifier-free guidance and self-conditioning. Pure math + sampling loops; training losses live in the harness.

Conventions
  * T = 1000 training steps; `schedule="scaled_linear"` is the LDM/MSDM "sqrt-linear" schedule
    betas = linspace(sqrt(0.002), sqrt(0.02), T)^2; "linear" and "cosine" (Nichol & Dhariwal) are options.
  * The model predicts epsilon. Guidance: eps = eps_uncond + w * (eps_cond - eps_uncond) with w = `guidance`
    (w = 1: no guidance). The released MSDM writes (g + 1) * cond - g * uncond with g = 3.5, i.e. w = 4.5 here.
  * Sampling with fewer steps than T uses evenly spaced timesteps; the DDPM sampler then uses the "respaced"
    chain (betas recomputed from alpha_bar at the kept steps), so its posterior is the exact DDPM posterior of
    that chain; DDIM with eta=1 is the same process written differently (tested).
  * Randomness: one `torch.Generator` per sample; sample k's initial noise and every per-step noise come from
    generators[k] only, so image k is the same whatever the batch it is generated in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear"  # scaled_linear | linear | cosine
    beta_start: float = 0.002
    beta_end: float = 0.02

    def validate(self) -> None:
        if self.schedule not in ("scaled_linear", "linear", "cosine"):
            raise ValueError(f"schedule must be scaled_linear, linear or cosine, got {self.schedule!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be >= 2")


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    T = cfg.num_train_timesteps
    if cfg.schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if cfg.schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)


class GaussianDiffusion:
    """Schedule tensors (float64 on the CPU; gathered per batch and cast to the batch's device/dtype)."""

    def __init__(self, cfg: DiffusionConfig | None = None):
        self.cfg = cfg or DiffusionConfig()
        self.cfg.validate()
        self.betas = make_betas(self.cfg)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.T = self.cfg.num_train_timesteps

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(t.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        a = self._at(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(t.device)[t]
        return (a / (1 - a)).float()

    def timesteps(self, steps: int) -> list[int]:
        """`steps` evenly spaced training timesteps, descending, always ending at 0 and starting near T-1."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in [1, {self.T}], got {steps}")
        ts = torch.linspace(0, self.T - 1, steps, dtype=torch.float64).round().long().unique()
        return ts.flip(0).tolist()


def per_sample_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device, dtype) -> torch.Tensor:
    """[B, *shape] noise, row k drawn from generators[k] on the CPU (device-independent and batch-independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]).to(device, dtype)


EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def sample(diffusion: GaussianDiffusion, eps_fn: EpsFn, shape: Sequence[int], generators: Sequence[torch.Generator],
           steps: int = 150, sampler: str = "ddpm", eta: float = 0.0, device="cpu", dtype=torch.float32,
           self_condition: bool = True, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Draw latents [B, *shape] by running `eps_fn(x_t, t, x0_prev)` (guidance is inside eps_fn) down the chain.

    sampler "ddpm": ancestral sampling from the DDPM posterior q(x_{s} | x_t, x0_hat) of the respaced chain;
    sampler "ddim": DDIM with `eta` (0 = deterministic). With self-conditioning the previous step's x0 estimate is
    passed in (zeros at the first step).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
    B = len(generators)
    x = per_sample_noise(shape, generators, device, torch.float32)
    abar = diffusion.alphas_cumprod
    ts = diffusion.timesteps(steps)
    x0_prev = torch.zeros_like(x) if self_condition else None
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = float(abar[t])
        a_s = float(abar[s]) if s >= 0 else 1.0
        tt = torch.full((B,), t, device=device, dtype=torch.long)
        eps = eps_fn(x.to(dtype), tt, None if x0_prev is None else x0_prev.to(dtype)).float()
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if self_condition:
            x0_prev = x0
        if s < 0:
            x = x0
            break
        if sampler == "ddpm":
            beta = 1 - a_t / a_s  # beta of the respaced chain between s and t
            mean = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)) * x
            var = beta * (1 - a_s) / (1 - a_t)
            x = mean + math.sqrt(var) * per_sample_noise(shape, generators, device, torch.float32)
        else:
            sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
            eps_dir = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # eps consistent with x0 (== eps)
            x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma ** 2, 0.0)) * eps_dir
            if sigma > 0:
                x = x + sigma * per_sample_noise(shape, generators, device, torch.float32)
        if progress:
            progress(i + 1)
    return x
