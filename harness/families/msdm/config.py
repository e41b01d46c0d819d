"""MSDM typed configs and the named presets (model size AND training budget), resolved in one place.

A config is built as: dataclass defaults <- the preset's training values <- --config file <- CLI options. The
`paper` preset is the model as published and the training as the paper / released code ran it; every value there
is listed in PAPER_SOURCES with where it comes from, and marked "inferred" where neither source states it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.config import from_dict, to_dict
from harness.dataset import DatasetConfig
from harness.errors import UserError
from harness.families.msdm.sources import PAPER_SOURCES  # noqa: F401 (re-exported: the presets' provenance)
from harness.runs import open_run
from harness.trainer import LoopConfig
from models.msdm.diffusion import DiffusionConfig
from models.msdm.presets import PRESETS, get_preset
from models.msdm.text import DEFAULT_TEXT_ENCODER

VAE_FAMILY, UNET_FAMILY = "msdm-vae", "msdm-unet"


@dataclass
class VAELossConfig:
    """Medfusion's convention: every term summed per sample (pixels over C*H*W; the SSIM and perceptual distances,
    one number per image, broadcast over the C*H*W pixels as the released code adds them to the per-pixel loss;
    KL over the latent), then averaged over the batch."""

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
    data: DatasetConfig = field(default_factory=DatasetConfig)  # no augmentation: the released VAE used none
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    perceptual: str = ""  # filled in at start: "on (<path>)" or "disabled (<why>)"

    def validate(self) -> None:
        check_preset(self.preset)
        check_resolution(self.preset, self.data.resolution)


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
    dropout_layout: Literal["released", "ddpm"] = "released"  # Dropout2d in both res sub-blocks, or DDPM's
    attn_dropout: float | None = None  # dropout on the attention output; None = `dropout` (as released)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sample_steps: int = 50  # sampling steps of the training-time sample grids
    fid_images: int = 200  # --select-best fid: images generated from validation captions per evaluation
    latent_scale: float = 0.0  # 0 = measure at start (1 / std of sampled training latents)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        check_preset(self.preset)
        check_resolution(self.preset, self.data.resolution)
        if self.loss not in ("l1", "l2"):
            raise UserError(f"loss must be l1 or l2, got {self.loss!r}")
        if not 0.0 <= self.self_cond_prob <= 1.0:
            raise UserError(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.min_snr_gamma < 0:
            raise UserError(f"min_snr_gamma must be >= 0, got {self.min_snr_gamma}")
        if self.dropout_layout not in ("released", "ddpm"):
            raise UserError(f"dropout_layout must be released or ddpm, got {self.dropout_layout!r}")
        if self.cache_latents and (self.data.jitter > 0 or self.data.hflip or self.data.hflip_uncond):
            raise UserError("cache_latents needs an augmentation-free dataset (jitter 0, no flip): a cached posterior "
                            "would silently drop the augmentation; pass --jitter 0 or leave --cache-latents off")
        try:
            self.diffusion.validate()
        except ValueError as e:
            raise UserError(f"diffusion: {e}") from None


def check_preset(name: str) -> None:
    if name not in PRESETS:
        raise UserError(f"unknown MSDM preset {name!r}; known: {', '.join(PRESETS)}")


def check_resolution(preset: str, resolution: int) -> None:
    """The UNet halves the latent twice, the VAE three times: the image side must be a multiple of 8 * 4."""
    p = get_preset(preset)
    stride = 2 ** (len(p.vae["block_out_channels"]) - 1) * 2 ** (len(p.unet["block_out_channels"]) - 1)
    if resolution % stride:
        raise UserError(f"--resolution {resolution} is not a multiple of {stride} (the {preset} preset's VAE x "
                        f"UNet downsampling); use e.g. {max(stride, resolution // stride * stride)}")


# ---------------------------------------------------------------------------------------------------------------
# Training presets: what `--preset` sets besides the model size (under the config file and the CLI options).

_VAE_PAPER = {"data": {"jitter": 0.0, "fit": "pad", "captions": "sample"},
              "loss": {"mse_weight": 1.0, "perceptual_weight": 1.0, "ssim_weight": 1.0, "kl_weight": 1e-6},
              "loop": {"batch_size": 8, "lr": 1e-4, "weight_decay": 0.0, "epochs": 1001, "max_grad_norm": 0.0}}
_UNET_PAPER = {"data": {"jitter": 0.4, "caption_dropout": 0.2, "fit": "pad", "captions": "all"},
               "loss": "l1", "self_cond_prob": 0.5,
               "sampling": {"steps": 150, "guidance": 4.5, "sampler": "ddpm"},
               "loop": {"batch_size": 64, "lr": 1e-4, "weight_decay": 1e-2, "epochs": 500, "max_grad_norm": 0.0}}
# The quickstart's CPU budget: the tiny preset on the shipped 48-image 64 px sample, about two minutes on 2 cores.
_VAE_TINY = {"data": {"jitter": 0.0}, "loss": {"perceptual_weight": 0.0},
             "loop": {"max_steps": 300, "batch_size": 16, "lr": 2e-3, "warmup_steps": 20, "sample_every": 150,
                      "checkpoint_every": 150, "val_every": 100, "val_batches": 1, "log_every": 20}}
_UNET_TINY = {"data": {"jitter": 0.0}, "cache_latents": True, "ema_decay": 0.995, "sample_steps": 25,
              "sampling": {"steps": 50},
              "loop": {"max_steps": 600, "batch_size": 16, "lr": 1e-3, "warmup_steps": 20, "sample_every": 300,
                       "checkpoint_every": 300, "val_every": 200, "val_batches": 1, "log_every": 20}}
TRAINING_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"vae": _VAE_PAPER, "unet": _UNET_PAPER},
    "tiny": {"vae": _VAE_TINY, "unet": _UNET_TINY},
}

def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def vae_config(preset: str, data_dir: str | Path, split_path: str | Path, overrides: dict | None = None) -> VAEConfig:
    """Defaults <- the preset's training values (and resolution) <- `overrides` (nested dict)."""
    check_preset(preset)
    base = to_dict(VAEConfig(str(data_dir), str(split_path), preset))
    base["data"]["resolution"] = get_preset(preset).resolution
    base = merge(base, TRAINING_PRESETS[preset]["vae"])
    cfg = from_dict(VAEConfig, merge(base, overrides or {}))
    cfg.validate()
    return cfg


def unet_config(preset: str | None, data_dir: str | Path, split_path: str | Path, vae_run: str | Path,
                overrides: dict | None = None) -> UNetConfig:
    """UNet defaults <- preset <- overrides; the resolution (and, unless given, the preset) come from the VAE run."""
    vae_cfg = vae_run_config(vae_run)
    preset = preset or vae_cfg["preset"]
    check_preset(preset)
    base = to_dict(UNetConfig(str(data_dir), str(split_path), str(Path(vae_run).resolve()), preset))
    base["data"]["resolution"] = vae_cfg["data"]["resolution"]
    base = merge(base, TRAINING_PRESETS[preset]["unet"])
    cfg = from_dict(UNetConfig, merge(base, overrides or {}))
    if cfg.data.resolution != vae_cfg["data"]["resolution"]:
        raise UserError(f"resolution {cfg.data.resolution} differs from the VAE's {vae_cfg['data']['resolution']}")
    cfg.validate()
    return cfg


def vae_run_config(vae_run: str | Path) -> dict:
    run = open_run(vae_run)
    cfg = run.config()
    if cfg.get("family") != VAE_FAMILY:
        raise UserError(f"--vae must be an {VAE_FAMILY} run, this is {cfg.get('family')!r}", run.config_path)
    if not (run.dir / "final" / "vae" / "config.json").is_file():
        raise UserError("VAE run has no final/vae (training not finished? resume it with --resume)", run.dir)
    return cfg


RUN_KEYS = ("family", "run_id", "created", "harness_version", "summary", "text_encoder_resolved")


def config_from_run(raw: dict, family: str) -> VAEConfig | UNetConfig:
    """The typed config a run was trained with (its config.json minus the run's own bookkeeping keys)."""
    cls = VAEConfig if family == VAE_FAMILY else UNetConfig
    return from_dict(cls, {k: v for k, v in raw.items() if k not in RUN_KEYS}, "config.json")
