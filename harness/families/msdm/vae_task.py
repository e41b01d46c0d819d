"""The MSDM autoencoder's training task and its losses (Medfusion's convention).

Loss per sample i (then averaged over the batch), as the released Medfusion VAE computes it:
    rec_i        = mse_weight        * sum_{c,h,w} (x_hat - x)^2
    ssim_i       = ssim_weight       * C*H*W * (1 - SSIM_i)        (per-image SSIM, broadcast over the pixels)
    perceptual_i = perceptual_weight * C*H*W * LPIPS_i             (idem)
    kl_i         = kl_weight         * sum_{latent} KL(q(z|x_i) || N(0, I))
    aux_i        = rec + ssim + perceptual of the deep-supervision output against the half-size image
so kl_weight = 1e-6 balances against the reconstruction exactly as in Medfusion / LDM (a per-pixel mean
reconstruction with a summed KL would make the KL ~C*H*W times stronger). Each term goes to train_log.jsonl.

The LPIPS-style perceptual term needs ImageNet VGG16 weights, which cannot be downloaded offline. The trainer looks
for them (`perceptual_weights` or $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth); if absent it says so, records
`perceptual: disabled (...)` in the run config and trains without the term instead of pretending. LPIPS's learned
per-channel weights are not available either: the term is the uniform-weight LPIPS distance (unit-normalised VGG16
features at relu1_2..relu5_3, squared difference, spatial mean, summed over layers).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.dataset import to_model_pixels
from harness.errors import UserError
from harness.io import write_json
from harness.families.msdm.config import VAEConfig
from harness.families.msdm.data import MSDMDataTask, save_grid, to_uint8
from harness.trainer import unwrap
from models.msdm.presets import get_preset

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (the file torch-fidelity uses for precision/recall)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per sample of images in [0, 1] -> [B]: Gaussian window, Wang et al. 2004 constants, 'valid'
    windows, contrast-structure term clamped at 0 (pytorch_msssim's nonnegative_ssim=True, as the release uses)."""
    C = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    g = torch.exp(-((torch.arange(window, device=x.device, dtype=torch.float32) - window // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(C, 1, window, window).to(x.dtype)
    f = lambda t: F.conv2d(t, k, groups=C)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    cs = F.relu((2 * sxy + c2) / (sxx + syy + c2))
    s = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs
    return s.flatten(1).mean(1)


class VGGPerceptual(nn.Module):
    """Uniform-weight LPIPS distance on torchvision VGG16 features (see module docstring). Frozen."""

    LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torchvision.models import vgg16

        net = vgg16()
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.features = net.features[: self.LAYERS[-1] + 1].requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y in [-1, 1] -> [B] distances."""
        h = torch.cat([x, y]).add(1).div(2).sub(self.mean).div(self.std)
        total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                a, b = F.normalize(h.float(), dim=1).chunk(2)
                total = total + (a - b).pow(2).sum(1).mean((1, 2))
        return total


def find_vgg16(explicit: str | None) -> tuple[Path | None, str]:
    """(weights path or None, human note) - local files only, nothing is downloaded."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError("perceptual weights file not found", p)
        return p, f"on ({p})"
    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    p = home / "hub" / "checkpoints" / VGG16_FILE
    if p.is_file():
        return p, f"on ({p})"
    return None, (f"disabled (no VGG16 ImageNet weights at {p}; offline, so the perceptual term is skipped - "
                  "pass --perceptual-weights FILE to enable it)")


def reconstruction_terms(recon: torch.Tensor, x: torch.Tensor, cfg, perceptual: nn.Module | None
                         ) -> dict[str, torch.Tensor]:
    """Per-sample sums [B] of the weighted reconstruction terms (rec, ssim, perceptual) of one output."""
    recon = recon.float()
    n = x[0].numel()  # C*H*W: the released code broadcasts the per-image SSIM / LPIPS over every pixel, then sums
    out = {"rec": cfg.mse_weight * (recon - x).pow(2).flatten(1).sum(1)}
    if cfg.ssim_weight:
        out["ssim"] = cfg.ssim_weight * n * (1 - ssim((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2))
    if cfg.perceptual_weight and perceptual is not None:
        out["perceptual"] = cfg.perceptual_weight * n * perceptual(recon, x)
    return out


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, aux: list[torch.Tensor],
             cfg, perceptual: nn.Module | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, terms): batch means of the per-sample sums (module docstring); terms are detached."""
    terms = reconstruction_terms(recon, x, cfg, perceptual)
    if cfg.kl_weight:
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1)
        terms["kl"] = cfg.kl_weight * kl
    if aux:
        aux_total = torch.zeros_like(terms["rec"])
        for a in aux:
            target = F.interpolate(x, size=a.shape[2:], mode="nearest-exact")
            aux_total = aux_total + sum(reconstruction_terms(a, target, cfg, perceptual).values())
        terms["aux"] = aux_total
    per_sample = sum(terms.values())
    return per_sample.mean(), {k: v.detach().mean() for k, v in terms.items()}


class VAETask(MSDMDataTask):
    def __init__(self, cfg: VAEConfig, train_ds, val_ds, perceptual: nn.Module | None = None):
        from models.msdm.vae import MSDMAutoencoder

        self.cfg = cfg
        self.vae = MSDMAutoencoder(**get_preset(cfg.preset).vae)
        self.perceptual = perceptual
        self._train, self._val = train_ds, val_ds
        src = val_ds if val_ds is not None and len(val_ds) else train_ds
        self.grid_pixels = torch.stack([src.clean_pixels(i) for i in range(min(6, len(src.image_ids)))])

    def trainable_parameters(self):
        return list(self.vae.parameters())

    def modules(self):
        return {"vae": self.vae, **({"perceptual": self.perceptual} if self.perceptual is not None else {})}

    def loss(self, batch, generator):
        x = to_model_pixels(batch["pixels"])
        v = unwrap(self.vae)
        f = v.downsample_factor
        shape = (x.shape[0], v.config.latent_channels, x.shape[2] // f, x.shape[3] // f)
        noise = torch.randn(shape, generator=generator).to(x.device)
        recon, mean, logvar, aux = self.vae(x, noise)
        return vae_loss(x, recon, mean, logvar, aux, self.cfg.loss, self.perceptual)

    def sample_grid(self, step, path):
        v = unwrap(self.vae)
        x = to_model_pixels(self.grid_pixels, next(v.parameters()).device)
        recon = v.decode(v.encode(x)[0])
        save_grid(to_uint8(torch.cat([x, recon])), path, cols=len(x))  # top: originals, bottom: reconstructions
        return True

    def export(self, out_dir):
        unwrap(self.vae).save_pretrained(out_dir / "vae")
        write_json(out_dir / "msdm_vae.json", {"preset": self.cfg.preset, "resolution": self.cfg.data.resolution,
                                               "perceptual": self.cfg.perceptual})
