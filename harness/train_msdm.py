"""MSDM training (VAE, then UNet on its latents) and generation, on the shared loop in harness/trainer.py.

    harness train msdm-vae  --split S --data D --preset paper|tiny        -> runs/msdm-vae-.../final/vae/
    harness train msdm-unet --split S --data D --vae runs/msdm-vae-...    -> runs/msdm-unet-.../final/{unet,vae}/
    harness generate runs/msdm-unet-... --prompts P                        (family "msdm-unet", `load_generator`)

Design notes (see REFERENCE.md section 3 for the published recipe):
  * Context dropout happens in ONE place: the dataset (`DatasetConfig.caption_dropout`, default 0.2 for the UNet),
    which replaces the caption by "" per sample; "" is also the unconditional prompt at sampling.
  * Self-conditioning: with probability `self_cond_prob` per batch a first pass with a zero self-condition and no
    gradient predicts x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); that detached estimate (not x_t, the released
    code's bug) is concatenated to the input of the trained pass; otherwise zeros are.
  * Latents are scaled by 1 / std of the training latents (measured once when the UNet run starts, stored with
    the run), so the diffusion sees roughly unit-variance data whatever the VAE's KL weight did to the scale.
  * `cache_latents`: the VAE posteriors (mean, logvar) of the training images are computed once and z is drawn
    from them every step. Only valid without image augmentation (jitter 0, no flip): with jitter each step sees a
    different image, so caching would silently drop the augmentation - that combination is refused.
  * EMA of the UNet (decay with warm-up min(decay, (1 + n) / (10 + n))) is saved in checkpoints, used for sample
    grids and exported as the final UNet.
  * The LPIPS-style perceptual term needs ImageNet VGG16 weights, which cannot be downloaded offline. The trainer
    looks for them (`perceptual_weights` or $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth); if absent it says so,
    records `perceptual: disabled (...)` in the run config and trains without the term instead of pretending.
    LPIPS's learned per-channel weights are not available either: the term is the uniform-weight LPIPS distance
    (unit-normalised VGG16 features at relu1_2..relu5_3, squared difference, spatial mean, summed over layers).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import from_dict, to_dict
from harness.dataset import DatasetConfig, ParaphraseStrategy, item_rng, load_training_data
from harness.errors import UserError
from harness.generate import Generator
from harness.io import atomic_path, read_json, write_json
from harness.runs import Run, create_run, open_run
from harness.trainer import LoopConfig, TrainTask, create_run_on_main, run_training, unwrap
from models.msdm.diffusion import DiffusionConfig, GaussianDiffusion, sample
from models.msdm.presets import get_preset, PRESETS
from models.msdm.text import DEFAULT_TEXT_ENCODER, CLIPText, resolve_text_source

VAE_FAMILY, UNET_FAMILY = "msdm-vae", "msdm-unet"
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (the file torch-fidelity uses for precision/recall)

# Fixed prompts of the sample grids: negation, locations, procedures, counts.
SAMPLE_PROMPTS = (
    "Generate an image containing a polyp",
    "Generate an image with no polyps",
    "Generate an image with an instrument located in the lower-right",
    "Generate an image with an instrument located in the upper-left",
    "Generate an image from a gastroscopy procedure",
    "Generate an image from a colonoscopy procedure with no instruments",
)


# ---------------------------------------------------------------------------------------------------------------
# Configs.


@dataclass
class VAELossConfig:
    mse_weight: float = 1.0
    perceptual_weight: float = 1.0
    ssim_weight: float = 1.0
    kl_weight: float = 1e-6
    perceptual_weights: str | None = None  # path to torchvision VGG16 ImageNet weights (default: torch hub cache)


@dataclass
class VAEConfig:
    data_dir: str
    split_path: str
    preset: str = "paper"
    data: DatasetConfig = field(default_factory=lambda: DatasetConfig(jitter=0.4))
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    perceptual: str = ""  # filled in at start: "on (<path>)" or "disabled (<why>)"

    def validate(self) -> None:
        _check_preset(self.preset)


@dataclass
class SamplingConfig:
    """Defaults used by `harness generate` for this run (each can be overridden there)."""

    steps: int = 150
    guidance: float = 4.5  # uncond + w (cond - uncond); the released code's g=3.5 in its (g+1)c - g u form
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    eta: float = 0.0  # DDIM only

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"sampling steps must be >= 1, got {self.steps}")
        if self.sampler not in ("ddpm", "ddim"):
            raise UserError(f"sampler must be ddpm or ddim, got {self.sampler!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"eta must be in [0, 1], got {self.eta}")


@dataclass
class UNetConfig:
    data_dir: str
    split_path: str
    vae_run: str
    preset: str = "paper"
    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_length: int = 77
    paraphrases_path: str | None = None
    data: DatasetConfig = field(default_factory=lambda: DatasetConfig(jitter=0.4, caption_dropout=0.2))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: Literal["l1", "l2"] = "l1"
    min_snr_gamma: float = 0.0  # 0 = off; else weight min(snr, gamma) / snr (epsilon prediction)
    self_cond_prob: float = 0.5  # 0 = no self-conditioning input at all
    ema_decay: float = 0.9999  # 0 = no EMA
    cache_latents: bool = False
    dropout: float | None = None  # UNet dropout; None = preset (0.1)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sample_steps: int = 50  # sampling steps of the training-time sample grids
    latent_scale: float = 0.0  # 0 = measure at start (1 / std of training latents)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        _check_preset(self.preset)
        if self.loss not in ("l1", "l2"):
            raise UserError(f"loss must be l1 or l2, got {self.loss!r}")
        if not 0.0 <= self.self_cond_prob <= 1.0:
            raise UserError(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.min_snr_gamma < 0:
            raise UserError(f"min_snr_gamma must be >= 0, got {self.min_snr_gamma}")
        if self.cache_latents and (self.data.jitter > 0 or self.data.hflip):
            raise UserError("cache_latents needs an augmentation-free dataset (jitter 0, no flip): a cached posterior "
                            "would silently drop the augmentation; pass --jitter 0 or leave --cache-latents off")
        try:
            self.diffusion.validate()
        except ValueError as e:
            raise UserError(f"diffusion: {e}") from None


def _check_preset(name: str) -> None:
    if name not in PRESETS:
        raise UserError(f"unknown MSDM preset {name!r}; known: {', '.join(PRESETS)}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def vae_config(preset: str, data_dir: str | Path, split_path: str | Path, overrides: dict | None = None) -> VAEConfig:
    """The preset's VAE defaults (resolution from the preset, jitter 0.4), with `overrides` (nested dict) on top."""
    _check_preset(preset)
    base = to_dict(VAEConfig(str(data_dir), str(split_path), preset))
    base["data"]["resolution"] = get_preset(preset).resolution
    return from_dict(VAEConfig, _merge(base, overrides or {}))


def unet_config(preset: str | None, data_dir: str | Path, split_path: str | Path, vae_run: str | Path,
                overrides: dict | None = None) -> UNetConfig:
    """UNet defaults; the resolution (and, unless given, the preset) come from the VAE run."""
    vae_cfg = _vae_run_config(vae_run)
    preset = preset or vae_cfg["preset"]
    _check_preset(preset)
    base = to_dict(UNetConfig(str(data_dir), str(split_path), str(Path(vae_run).resolve()), preset))
    base["data"]["resolution"] = vae_cfg["data"]["resolution"]
    cfg = from_dict(UNetConfig, _merge(base, overrides or {}))
    if cfg.data.resolution != vae_cfg["data"]["resolution"]:
        raise UserError(f"resolution {cfg.data.resolution} differs from the VAE's {vae_cfg['data']['resolution']}")
    return cfg


def _vae_run_config(vae_run: str | Path) -> dict:
    run = open_run(vae_run)
    cfg = run.config()
    if cfg.get("family") != VAE_FAMILY:
        raise UserError(f"--vae must be an {VAE_FAMILY} run, this is {cfg.get('family')!r}", run.config_path)
    if not (run.dir / "final" / "vae" / "config.json").is_file():
        raise UserError("VAE run has no final/vae (training not finished? resume it with --resume)", run.dir)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Data helpers.


def _load_paraphrases(path: str | None) -> dict[str, list[str]] | None:
    if not path:
        return None
    try:
        from harness.paraphrase import load_paraphrases
    except ImportError:
        raise UserError("paraphrase support (harness.paraphrase) is not installed in this build") from None
    return load_paraphrases(path)


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class CachedLatents(torch.utils.data.Dataset):
    """Training items from cached VAE posteriors: {"mean", "logvar", "caption"}. The caption of item i in epoch e
    is drawn exactly as `CaptionedImages` draws it (same generator, same order), so caption sampling, paraphrase
    strategy and context dropout are identical with and without the cache."""

    def __init__(self, base, means: torch.Tensor, logvars: torch.Tensor):
        self.base, self.means, self.logvars = base, means, logvars

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        i, caption = self.base.caption_for(index, item_rng(self.base.cfg.seed, self.base.epoch, index))
        return {"mean": self.means[i], "logvar": self.logvars[i], "caption": caption}


@torch.no_grad()
def encode_images(vae, dataset, batch_size: int = 16, limit: int | None = None, device=None):
    """Posterior (mean, logvar) of each image of `dataset` (a CaptionedImages; image order, augmentation-free)."""
    from harness.dataset import preprocess_image
    from harness.images import open_rgb
    from harness.progress import progress

    device = device or next(vae.parameters()).device
    ids = dataset.image_ids[:limit] if limit else dataset.image_ids
    means, logvars = [], []
    with progress(transient=True) as bar:
        task = bar.add_task("encode latents", total=len(ids))
        for s in range(0, len(ids), batch_size):
            px = torch.stack([preprocess_image(open_rgb(dataset.devset.image_path(i)), dataset.cfg.resolution,
                                               dataset.cfg.fit) for i in ids[s : s + batch_size]])
            m, lv = vae.encode(px.to(device))
            means.append(m.float().cpu())
            logvars.append(lv.float().cpu())
            bar.update(task, advance=len(px))
    return torch.cat(means), torch.cat(logvars)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]: clamp, no per-image min-max stretch (that would bias FID)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, cols: int) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------------------------
# VAE losses.


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per sample of images in [0, 1] (Gaussian window, Wang et al. 2004 constants) -> [B]."""
    C = x.shape[1]
    g = torch.exp(-((torch.arange(window, device=x.device, dtype=torch.float32) - window // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(C, 1, window, window).to(x.dtype)
    f = lambda t: F.conv2d(t, k, groups=C)  # noqa: E731  ('valid' window, as the reference implementation)
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
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


# ---------------------------------------------------------------------------------------------------------------
# Tasks.


class _DataTask(TrainTask):
    """The datasets both MSDM tasks train and validate on (set as self._train / self._val)."""

    _train: torch.utils.data.Dataset
    _val: torch.utils.data.Dataset | None

    def train_dataset(self):
        return self._train

    def val_dataset(self):
        return self._val

    def collate(self, items):
        return collate(items)


class VAETask(_DataTask):
    def __init__(self, cfg: VAEConfig, train_ds, val_ds, vae=None, perceptual: nn.Module | None = None):
        from models.msdm.vae import MSDMAutoencoder

        self.cfg = cfg
        self.vae = vae if vae is not None else MSDMAutoencoder(**get_preset(cfg.preset).vae)
        self.perceptual = perceptual
        self._train, self._val = train_ds, val_ds
        self.grid_pixels = None
        src = val_ds if val_ds is not None and len(val_ds) else train_ds
        src.set_epoch(0)
        self.grid_pixels = torch.stack([src[i]["pixels"] for i in range(min(6, len(src)))])

    def trainable_parameters(self):
        return list(self.vae.parameters())

    def modules(self):
        return {"vae": self.vae, **({"perceptual": self.perceptual} if self.perceptual is not None else {})}

    def latent_shape(self, pixels: torch.Tensor) -> tuple[int, ...]:
        v = unwrap(self.vae)
        f = v.downsample_factor
        return (pixels.shape[0], v.config.latent_channels, pixels.shape[2] // f, pixels.shape[3] // f)

    def loss(self, batch, generator):
        x = batch["pixels"]
        noise = torch.randn(self.latent_shape(x), generator=generator).to(x.device)
        recon, mean, logvar = self.vae(x, noise)
        w = self.cfg.loss
        recon_f = recon.float()
        total = w.mse_weight * F.mse_loss(recon_f, x)
        if w.ssim_weight:
            total = total + w.ssim_weight * (1 - ssim((recon_f.clamp(-1, 1) + 1) / 2, (x + 1) / 2)).mean()
        if w.perceptual_weight and self.perceptual is not None:
            total = total + w.perceptual_weight * self.perceptual(recon_f, x).mean()
        if w.kl_weight:
            total = total + w.kl_weight * unwrap(self.vae).kl(mean.float(), logvar.float()).mean()
        return total

    def sample_grid(self, step, path):
        v = unwrap(self.vae)
        x = self.grid_pixels.to(next(v.parameters()).device)
        recon = v.decode(v.encode(x)[0])
        save_grid(to_uint8(torch.cat([x, recon])), path, cols=len(x))  # top: originals, bottom: reconstructions
        return True

    def export(self, out_dir):
        unwrap(self.vae).save_pretrained(out_dir / "vae")
        write_json(out_dir / "msdm_vae.json", {"preset": self.cfg.preset, "resolution": self.cfg.data.resolution,
                                               "perceptual": self.cfg.perceptual})


class TextCache:
    """Encodings of captions, computed once each (a bounded LRU: paraphrase sets can hold 10k+ captions)."""

    def __init__(self, text: CLIPText, capacity: int = 4096):
        self.text, self.capacity = text, capacity
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if todo:
            h, m = self.text(todo)
            for p, hi, mi in zip(todo, h, m):
                self.cache[p] = (hi, mi)
        for p in prompts:
            self.cache.move_to_end(p)
        hs, ms = zip(*(self.cache[p] for p in prompts))
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return torch.stack(hs), torch.stack(ms)


class UNetTask(_DataTask):
    def __init__(self, cfg: UNetConfig, train_ds, val_ds, vae, text: CLIPText, unet=None, latent_scale: float = 1.0):
        from models.msdm.unet import MSDMUNet

        self.cfg = cfg
        unet_kw = dict(get_preset(cfg.preset).unet)
        if cfg.dropout is not None:
            unet_kw["dropout"] = cfg.dropout
        self.unet = unet if unet is not None else MSDMUNet(context_dim=text.dim, self_condition=cfg.self_cond_prob > 0,
                                                           **unet_kw)
        self.vae = vae.requires_grad_(False).eval()
        self.text = text
        self.texts = TextCache(text)
        self.diffusion = GaussianDiffusion(cfg.diffusion)
        self.latent_scale = latent_scale
        self._train, self._val = train_ds, val_ds
        self.ema = [p.detach().clone() for p in self.unet.parameters()] if cfg.ema_decay > 0 else None

    # -- TrainTask API --
    def trainable_parameters(self):
        return list(self.unet.parameters())

    def modules(self):
        return {"unet": self.unet, "vae": self.vae, "text": self.text}

    def use_modules(self, modules):
        super().use_modules(modules)
        self.texts.text = self.text
        self.texts.cache.clear()  # encodings may live on the old device
        if self.ema is not None:
            dev = next(unwrap(self.unet).parameters()).device
            self.ema = [e.to(dev) for e in self.ema]

    def latents(self, batch, generator) -> torch.Tensor:
        """Scaled latents z0 of the batch: a posterior draw, from the cache or by encoding the pixels."""
        if "mean" in batch:
            mean, logvar = batch["mean"], batch["logvar"]
        else:
            with torch.no_grad():
                mean, logvar = self.vae.encode(batch["pixels"])
        noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        return (mean + torch.exp(0.5 * logvar) * noise) * self.latent_scale

    def loss(self, batch, generator):
        z0 = self.latents(batch, generator).float()
        B = z0.shape[0]
        t = torch.randint(0, self.diffusion.T, (B,), generator=generator).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        coin = float(torch.rand((), generator=generator))  # always drawn, so later draws never shift
        ctx, mask = self.texts(batch["caption"])
        x_t = self.diffusion.q_sample(z0, t, noise)
        self_cond = None
        if self.cfg.self_cond_prob > 0 and coin < self.cfg.self_cond_prob:
            with torch.no_grad():
                eps0 = self.unet(x_t, t, ctx, mask, None)  # None = zeros
                self_cond = self.diffusion.predict_x0(x_t, t, eps0.float()).detach()
        eps = self.unet(x_t, t, ctx, mask, self_cond).float()
        err = (eps - noise).abs() if self.cfg.loss == "l1" else (eps - noise).pow(2)
        per_sample = err.flatten(1).mean(1)
        if self.cfg.min_snr_gamma > 0:
            snr = self.diffusion.snr(t)
            per_sample = per_sample * torch.clamp(snr, max=self.cfg.min_snr_gamma) / snr  # eps-target Min-SNR
        return per_sample.mean()

    def on_step_end(self, step):
        if self.ema is None:
            return
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema, unwrap(self.unet).parameters()):
                e.lerp_(p.detach().to(e.dtype), 1 - decay)

    def state_dict(self):
        return {"ema": [e.cpu() for e in self.ema] if self.ema is not None else None,
                "latent_scale": self.latent_scale}

    def load_state_dict(self, state):
        if state.get("ema") is not None and self.ema is not None:
            self.ema = [e.to(cur.device) for e, cur in zip(state["ema"], self.ema)]
        self.latent_scale = float(state.get("latent_scale", self.latent_scale))

    def sampling_unet(self):
        """A copy of the UNet holding the EMA weights (or the raw weights without EMA), in eval mode."""
        net = copy.deepcopy(unwrap(self.unet)).eval()
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(net.parameters(), self.ema):
                    p.copy_(e)
        return net

    def sample_grid(self, step, path):
        net = self.sampling_unet()
        sampler = MSDMSampler(net, unwrap(self.vae), self.text, self.diffusion, self.latent_scale,
                              self.cfg.data.resolution)
        s = self.cfg.sampling  # the run's sampler, fewer steps (deterministic DDIM is poor early in training)
        imgs = sampler.generate(list(SAMPLE_PROMPTS), list(range(len(SAMPLE_PROMPTS))), steps=self.cfg.sample_steps,
                                guidance=s.guidance, sampler_name=s.sampler, eta=s.eta)
        save_grid(np.stack(imgs), path, cols=len(imgs))
        return True

    def export(self, out_dir):
        self.sampling_unet().save_pretrained(out_dir / "unet")
        unwrap(self.vae).save_pretrained(out_dir / "vae")
        write_json(out_dir / "msdm.json", {
            "preset": self.cfg.preset, "resolution": self.cfg.data.resolution, "latent_scale": self.latent_scale,
            "text_encoder": self.cfg.text_encoder, "max_length": self.cfg.max_length,
            "diffusion": to_dict(self.cfg.diffusion), "sampling": to_dict(self.cfg.sampling),
            "ema": self.ema is not None, "vae_run": self.cfg.vae_run})


# ---------------------------------------------------------------------------------------------------------------
# Sampling (shared by the sample grids and `harness generate`).


class MSDMSampler:
    """Text -> images with CFG in one batched forward, per-sample generators, clamp -> uint8."""

    def __init__(self, unet, vae, text: CLIPText, diffusion: GaussianDiffusion, latent_scale: float, resolution: int,
                 dtype: torch.dtype = torch.float32):
        self.unet, self.vae, self.text, self.diffusion = unet, vae, text, diffusion
        self.latent_scale, self.resolution, self.dtype = latent_scale, resolution, dtype
        self.texts = TextCache(text)
        f = vae.downsample_factor
        self.latent_shape = (vae.config.latent_channels, resolution // f, resolution // f)

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 150, guidance: float = 4.5,
                 sampler_name: str = "ddpm", eta: float = 0.0) -> list[np.ndarray]:
        B = len(prompts)
        ctx, mask = self.texts(list(prompts))
        guided = guidance != 1.0
        if guided:
            u_ctx, u_mask = self.texts([""])
            ctx = torch.cat([ctx, u_ctx.expand(B, -1, -1)])
            mask = torch.cat([mask, u_mask.expand(B, -1)])
        ctx = ctx.to(self.dtype)

        def eps_fn(x, t, x0_prev):
            if not guided:
                return self.unet(x, t, ctx, mask, x0_prev)
            sc = None if x0_prev is None else torch.cat([x0_prev, x0_prev])
            e_c, e_u = self.unet(torch.cat([x, x]), torch.cat([t, t]), ctx, mask, sc).chunk(2)
            return e_u + guidance * (e_c - e_u)

        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        z = sample(self.diffusion, eps_fn, self.latent_shape, gens, steps=steps, sampler=sampler_name, eta=eta,
                   device=self.device, dtype=self.dtype, self_condition=bool(self.unet.config.self_condition))
        x = self.vae.decode((z / self.latent_scale).to(next(self.vae.parameters()).dtype))
        return list(to_uint8(x))


class MSDMGenerator(Generator):
    def __init__(self, run: Run, sampler: MSDMSampler, meta: dict, steps: int, guidance: float, sampler_name: str,
                 eta: float):
        self.run, self.sampler, self.meta = run, sampler, meta
        self.steps, self.guidance, self.sampler_name, self.eta = steps, guidance, sampler_name, eta

    def generate(self, prompts, seeds):
        return self.sampler.generate(prompts, seeds, self.steps, self.guidance, self.sampler_name, self.eta)

    def info(self):
        return {"family": UNET_FAMILY, "run_id": self.run.id, "preset": self.meta["preset"],
                "text_encoder": self.meta["text_encoder"], "resolution": self.meta["resolution"],
                "weights": "ema" if self.meta.get("ema") else "raw", "steps": self.steps, "guidance": self.guidance,
                "guidance_form": "uncond + w * (cond - uncond)", "sampler": self.sampler_name,
                "eta": self.eta if self.sampler_name == "ddim" else None,
                "unet_sha256": _file_hash(self.run.dir / "final" / "unet")}


def _file_hash(d: Path) -> str:
    from harness.io import sha256_files

    files = sorted(p for p in d.iterdir() if p.is_file())
    return sha256_files(files, d)[:16]


def load_generator(run: Run, overrides: dict[str, Any]) -> Generator:
    """Generator of a trained msdm-unet run. overrides: steps, guidance, sampler, eta, device, dtype."""
    from models.msdm.unet import MSDMUNet
    from models.msdm.vae import MSDMAutoencoder

    final = run.dir / "final"
    meta_path = final / "msdm.json"
    if not meta_path.is_file():
        raise UserError("run has no final/msdm.json (training not finished? resume it with "
                        "`harness train msdm-unet --resume RUN`)", run.dir)
    meta = read_json(meta_path)
    known = {"steps", "guidance", "sampler", "eta", "device", "dtype"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"unknown msdm-unet generation option(s): {', '.join(unknown)}")
    s = from_dict(SamplingConfig, {**meta["sampling"], **{k: overrides[k] for k in ("steps", "guidance", "sampler",
                                                                                       "eta") if k in overrides}})
    device = torch.device(overrides.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[overrides.get("dtype", "fp32")]
    unet = MSDMUNet.from_pretrained(final / "unet", torch_dtype=dtype).to(device).eval()
    vae = MSDMAutoencoder.from_pretrained(final / "vae", torch_dtype=dtype).to(device).eval()
    text = _load_text(str(run.resolve_recorded(meta["text_encoder"], "text encoder", True)), meta["max_length"]).to(device, dtype)
    sampler = MSDMSampler(unet, vae, text, GaussianDiffusion(from_dict(DiffusionConfig, meta["diffusion"])),
                          float(meta["latent_scale"]), int(meta["resolution"]), dtype)
    return MSDMGenerator(run, sampler, meta, s.steps, s.guidance, s.sampler, s.eta)


def _load_text(source: str, max_length: int) -> CLIPText:
    try:
        return CLIPText.from_pretrained(source, max_length=max_length)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the CLIP text encoder {source!r} (a hub id needs network or a filled HF cache; "
                        f"a directory needs tokenizer/ + text_encoder/ or a flat CLIP checkpoint): {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Entry points (CLI and quickstart).


def _summary(preset: str, cfg_loop: LoopConfig, strategy: str) -> dict:
    return {"preset": preset, "steps": cfg_loop.max_steps, "paraphrase_strategy": str(ParaphraseStrategy.parse(strategy)),
            "rank": None, "alpha": None, "targets": None, "dora": None, "rslora": None}


def _side(cfg, side: str, dcfg: DatasetConfig, paraphrases=None):
    ds, hashes = load_training_data(cfg.data_dir, cfg.split_path, side, dcfg, paraphrases)
    return ds, hashes


def _val_cfg(dcfg: DatasetConfig) -> DatasetConfig:
    # Validation measures the conditional loss on un-augmented images.
    return dataclasses.replace(dcfg, jitter=0.0, hflip=False, caption_dropout=0.0, paraphrase_strategy="none")


def _val_or_none(cfg, dcfg):
    try:
        ds, _ = _side(cfg, "val", _val_cfg(dcfg))
        return ds
    except UserError as e:
        if "no images" in str(e):
            return None
        raise


def train_vae(cfg: VAEConfig, run_id: str | None = None, tag: str = "") -> Run:
    """Train the MSDM autoencoder into a new run; returns the run (weights in run/final/vae)."""
    train_ds, hashes = _side(cfg, "train", cfg.data)
    val_ds = _val_or_none(cfg, cfg.data)
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        path, note = find_vgg16(cfg.loss.perceptual_weights)
        perceptual = VGGPerceptual(path) if path else None
        if path is None:
            from harness.progress import console

            console.print(f"[yellow]note:[/] perceptual loss {note}")
    else:
        note = "off (perceptual_weight = 0)"
    cfg = dataclasses.replace(cfg, perceptual=note)
    config = {**to_dict(cfg), "summary": _summary(cfg.preset, cfg.loop, "none")}
    run = create_run_on_main(lambda: create_run(VAE_FAMILY, config, hashes, tag=tag or cfg.preset, run_id=run_id))
    torch.manual_seed(cfg.loop.seed)  # model init
    task = VAETask(cfg, train_ds, val_ds, perceptual=perceptual)
    run_training(task, cfg.loop, run)
    return run


def _unet_parts(cfg: UNetConfig):
    paraphrases = _load_paraphrases(cfg.paraphrases_path)
    train_ds, hashes = _side(cfg, "train", cfg.data, paraphrases)
    val_ds = _val_or_none(cfg, cfg.data)
    from models.msdm.vae import MSDMAutoencoder

    vae = MSDMAutoencoder.from_pretrained(Path(cfg.vae_run) / "final" / "vae")
    text = _load_text(cfg.text_encoder, cfg.max_length)
    return train_ds, val_ds, hashes, vae, text


def _prepare_latents(cfg: UNetConfig, train_ds, val_ds, vae):
    """(train dataset, latent scale): the scale is 1/std of the posterior means of up to 256 training images."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = vae.to(device)
    means = logvars = None
    if cfg.cache_latents:
        means, logvars = encode_images(vae, train_ds, device=device)
    scale = cfg.latent_scale
    if scale <= 0:
        m = means[:256] if means is not None else encode_images(vae, train_ds, limit=256, device=device)[0]
        scale = float(1.0 / m.float().std().clamp_min(1e-6))
    vae.to("cpu")
    return (CachedLatents(train_ds, means, logvars) if means is not None else train_ds), scale


def train_unet(cfg: UNetConfig, run_id: str | None = None, tag: str = "") -> Run:
    """Train the MSDM UNet on the latents of `cfg.vae_run` into a new run (final/unet, final/vae, final/msdm.json)."""
    train_ds, val_ds, hashes, vae, text = _unet_parts(cfg)
    hashes = {**hashes, "vae_run": cfg.vae_run, "vae_data": open_run(cfg.vae_run).data_hashes()}
    if cfg.paraphrases_path:
        from harness.paraphrase import paraphrases_sha256

        hashes["paraphrases_sha256"] = paraphrases_sha256(cfg.paraphrases_path)
    data_for_training, scale = _prepare_latents(cfg, train_ds, val_ds, vae)
    cfg = dataclasses.replace(cfg, latent_scale=scale)
    config = {**to_dict(cfg), "text_encoder_resolved": _describe_text(cfg.text_encoder),
              "summary": _summary(cfg.preset, cfg.loop, cfg.data.paraphrase_strategy)}
    run = create_run_on_main(lambda: create_run(UNET_FAMILY, config, hashes, tag=tag or cfg.preset, run_id=run_id))
    torch.manual_seed(cfg.loop.seed)
    task = UNetTask(cfg, data_for_training, val_ds, vae, text, latent_scale=scale)
    run_training(task, cfg.loop, run)
    return run


def _describe_text(source: str) -> str:
    root, layout = resolve_text_source(source)
    return f"{Path(root).resolve()} ({layout} layout)" if layout else f"hub:{root}"


def resume(run_dir: str | Path, max_steps: int | None = None) -> Run:
    """Continue an msdm-vae / msdm-unet run exactly from its last checkpoint (config from the run's config.json)."""
    run = open_run(run_dir)
    raw = {k: v for k, v in run.config().items()
           if k not in ("family", "run_id", "created", "harness_version", "summary", "text_encoder_resolved")}
    if max_steps is not None:
        raw["loop"]["max_steps"] = max_steps
    if run.family == VAE_FAMILY:
        cfg = from_dict(VAEConfig, raw, "config.json")
        train_ds, _ = _side(cfg, "train", cfg.data)
        perceptual = None
        if cfg.loss.perceptual_weight > 0 and cfg.perceptual.startswith("on"):
            path, note = find_vgg16(cfg.loss.perceptual_weights)
            if path is None:  # resuming without the term would silently change the loss
                raise UserError(f"this run trained with the perceptual term, but now it is {note}", run.config_path)
            perceptual = VGGPerceptual(path)
        torch.manual_seed(cfg.loop.seed)
        run_training(VAETask(cfg, train_ds, _val_or_none(cfg, cfg.data), perceptual=perceptual), cfg.loop, run,
                     resume=True)
    elif run.family == UNET_FAMILY:
        cfg = from_dict(UNetConfig, raw, "config.json")
        train_ds, val_ds, _, vae, text = _unet_parts(cfg)
        data_for_training, scale = _prepare_latents(cfg, train_ds, val_ds, vae)  # scale is fixed in the config
        torch.manual_seed(cfg.loop.seed)
        run_training(UNetTask(cfg, data_for_training, val_ds, vae, text, latent_scale=scale), cfg.loop, run,
                     resume=True)
    else:
        raise UserError(f"not an MSDM run (family {run.family!r})", run.config_path)
    if max_steps is not None:
        cfg_json = run.config()
        cfg_json["loop"]["max_steps"] = max_steps
        cfg_json["summary"]["steps"] = max_steps
        write_json(run.config_path, cfg_json)
    return run


# Quickstart: the tiny preset on the shipped 48-image 64 px sample, about two minutes on 2 CPU cores.
QUICKSTART_VAE = {"data": {"jitter": 0.0}, "loss": {"perceptual_weight": 0.0},
                  "loop": {"max_steps": 300, "batch_size": 16, "lr": 2e-3, "warmup_steps": 20, "sample_every": 150,
                           "checkpoint_every": 150, "val_every": 100, "val_batches": 1, "log_every": 20}}
QUICKSTART_UNET = {"data": {"jitter": 0.0}, "cache_latents": True, "ema_decay": 0.995, "sample_steps": 25,
                   "sampling": {"steps": 50},
                   "loop": {"max_steps": 600, "batch_size": 16, "lr": 1e-3, "warmup_steps": 20, "sample_every": 300,
                            "checkpoint_every": 300, "val_every": 200, "val_batches": 1, "log_every": 20}}


def train_quickstart(data_dir: str | Path, split_path: str | Path, text_encoder: str | Path, seed: int = 0,
                     vae_steps: int | None = None, unet_steps: int | None = None) -> tuple[Run, Run]:
    """Tiny VAE then tiny UNet (for `harness quickstart`); `text_encoder` is a dir from
    `models.tiny_clip.save_tiny_clip_text`. Returns (vae_run, unet_run)."""
    vo = _merge(QUICKSTART_VAE, {"loop": {"seed": seed, **({"max_steps": vae_steps} if vae_steps else {})}})
    vae_run = train_vae(vae_config("tiny", data_dir, split_path, vo))
    uo = _merge(QUICKSTART_UNET, {"text_encoder": str(Path(text_encoder).resolve()),
                                  "loop": {"seed": seed, **({"max_steps": unet_steps} if unet_steps else {})}})
    unet_run = train_unet(unet_config("tiny", data_dir, split_path, vae_run.dir, uo))
    return vae_run, unet_run
