"""Typed configs and presets of the SD family.

Defaults follow diffusers' SD trainers (train_text_to_image*.py) unless said otherwise: LoRA rank 4 with alpha =
rank on to_q,to_k,to_v,to_out.0, 512 px, AdamW, constant learning rate, EMA decay 0.9999; sampling 50 steps,
guidance 7.5 (StableDiffusionPipeline's defaults). Knobs from kohya's sd-scripts keep kohya's meaning: clip skip
counts 1 = last layer (2 = penultimate), multires noise discount default 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from harness.config import from_dict
from harness.dataset import DatasetConfig
from harness.errors import UserError
from harness.trainer import LoopConfig
from models.sd.loading import DEFAULT_BASE
from models.sd.methods import COMPONENTS, METHODS, TEXT_ENCODER_LORA_TARGETS, UNET_LORA_TARGETS

FAMILY = "sd"
SCHEDULERS = ("ddim", "euler", "dpmpp")


@dataclass
class SDGenerationConfig:
    steps: int = 50  # StableDiffusionPipeline default
    guidance: float = 7.5  # StableDiffusionPipeline default
    scheduler: str = "ddim"  # ddim | euler | dpmpp (DPM-Solver++ 2M)
    negative_prompt: str = ""
    height: int | None = None  # None = the training resolution
    width: int | None = None
    dtype: str = "fp32"

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"generation steps must be >= 1, got {self.steps}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for side in (self.height, self.width):
            if side is not None and (side < 8 or side % 8):
                raise UserError(f"generation height/width must be a multiple of 8 and >= 8, got {side}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise UserError(f"generation dtype must be fp32, bf16 or fp16, got {self.dtype!r}")


def _sd_data() -> DatasetConfig:
    return DatasetConfig(resolution=512)  # SD 1.5's training resolution (diffusers' trainers default to 512)


@dataclass
class SDConfig:
    data_dir: str = ""
    split_path: str = ""
    base: str = DEFAULT_BASE  # hub id or local pipeline folder
    revision: str | None = None
    method: str = "lora"
    components: list[str] = field(default_factory=lambda: ["unet"])
    rank: int = 4
    alpha: float | None = None  # None = rank (scale 1), as diffusers' LoRA trainers
    lora_targets: list[str] = field(default_factory=lambda: list(UNET_LORA_TARGETS))
    text_encoder_lora_targets: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_LORA_TARGETS))
    optimizer: str = "adamw"
    text_encoder_lr: float | None = None  # None = loop.lr
    clip_skip: int = 1  # kohya/A1111 numbering: 1 = last layer
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0  # 0 = off
    multires_noise_discount: float = 0.3  # sd-scripts' default
    snr_gamma: float | None = None
    ema: bool = False
    ema_decay: float = 0.9999  # diffusers EMAModel default
    vae_kl_weight: float = 1e-6  # LDM autoencoder KL weight, used when the VAE trains
    gradient_checkpointing: bool = False
    cache: bool = True
    cache_dir: str | None = None
    cache_batch_size: int = 16
    base_dtype: str = "fp32"
    export_kohya: bool = False
    paraphrases_path: str | None = None
    preset: str | None = None
    data: DatasetConfig = field(default_factory=_sd_data)
    loop: LoopConfig = field(default_factory=LoopConfig)
    generation: SDGenerationConfig = field(default_factory=SDGenerationConfig)

    @property
    def adapter(self) -> bool:
        return self.method in ("lora", "dora")

    def validate(self) -> None:
        from harness.families.sd.optim import check_available

        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components:
            raise UserError(f"--components must be a non-empty subset of {','.join(COMPONENTS)}, got "
                            f"{','.join(self.components) or 'nothing'}")
        if len(set(self.components)) != len(self.components):
            raise UserError(f"--components lists a component twice: {','.join(self.components)}")
        if self.adapter:
            if "vae" in self.components:
                raise UserError(f"--components vae needs --method full ({self.method} adapts the U-Net and "
                                "optionally the text encoder)")
            if "unet" not in self.components:
                raise UserError(f"--method {self.method} adapts the U-Net (add text_encoder for both): "
                                "--components unet or unet,text_encoder")
            if self.rank < 1:
                raise UserError(f"--rank must be >= 1, got {self.rank}")
            if self.alpha is not None and not self.alpha > 0:
                raise UserError(f"--alpha must be > 0, got {self.alpha}")
        elif self.method in ("bitfit", "difffit") and self.components != ["unet"]:
            raise UserError(f"--method {self.method} trains the U-Net only (--components unet)")
        if not self.adapter and (self.rank != 4 or self.alpha is not None
                                 or self.lora_targets != list(UNET_LORA_TARGETS)):
            raise UserError(f"--rank/--alpha/--lora-targets apply to --method lora|dora, not {self.method}")
        if self.ema and self.method != "full":
            raise UserError("--ema applies to --method full (adapters and bias methods train without EMA)")
        if not 0 < self.ema_decay < 1:
            raise UserError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.text_encoder_lr is not None:
            if "text_encoder" not in self.components:
                raise UserError("--text-encoder-lr needs the text encoder trained (--components ...,text_encoder)")
            if not self.text_encoder_lr > 0:
                raise UserError(f"--text-encoder-lr must be > 0, got {self.text_encoder_lr}")
        if self.clip_skip < 1:
            raise UserError(f"--clip-skip must be >= 1 (1 = last layer), got {self.clip_skip}")
        if self.noise_offset < 0 or self.multires_noise_iterations < 0:
            raise UserError("--noise-offset and --multires-noise-iterations must be >= 0")
        if self.noise_offset > 0 and self.multires_noise_iterations > 0:
            raise UserError("--noise-offset and --multires-noise-iterations exclude each other (as in kohya's "
                            "sd-scripts): choose one noise type")
        if not 0 < self.multires_noise_discount <= 1:
            raise UserError(f"--multires-noise-discount must be in (0, 1], got {self.multires_noise_discount}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(f"--snr-gamma must be > 0, got {self.snr_gamma}")
        if self.cache_batch_size < 1:
            raise UserError(f"cache_batch_size must be >= 1, got {self.cache_batch_size}")
        if self.base_dtype not in ("fp32", "bf16", "fp16"):
            raise UserError(f"--base-dtype must be fp32, bf16 or fp16, got {self.base_dtype!r}")
        if self.base_dtype != "fp32" and self.method == "full":
            raise UserError("--base-dtype applies to frozen weights; --method full trains them in fp32")
        if self.base_dtype != "fp32" and self.loop.mixed_precision != self.base_dtype:
            raise UserError(f"--base-dtype {self.base_dtype} needs --mixed-precision {self.base_dtype}")
        if self.export_kohya and self.method != "lora":
            raise UserError(f"--export kohya writes LoRA adapters (diffusers' kohya converter has no DoRA magnitude "
                            f"and full/BitFit/DiffFit save whole models); --method is {self.method}")
        if self.data.resolution % 8:
            raise UserError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got "
                            f"{self.data.resolution}")
        check_available(self.optimizer)
        self.generation.validate()

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "components": ",".join(self.components),
                "rank": self.rank if self.adapter else None,
                "alpha": (self.alpha if self.alpha is not None else self.rank) if self.adapter else None,
                "targets": ",".join(self.lora_targets) if self.adapter else None, "dora": self.method == "dora",
                "rslora": False, "steps": self.loop.max_steps, "paraphrase_strategy": self.data.paraphrase_strategy,
                "preset": self.preset, "optimizer": self.optimizer, "clip_skip": self.clip_skip}


def config_from_dict(d: dict[str, Any], where: str = "SDConfig") -> SDConfig:
    return from_dict(SDConfig, d, where)


# ---------------------------------------------------------------------------------------------------------------
# Presets: rows of the papers' tables, as data. Unset fields (None) keep the defaults / the user's options.


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    note: str = ""
    method: str | None = None
    components: tuple[str, ...] | None = None
    rank: int | None = None
    alpha: float | None = None
    optimizer: str | None = None
    lr: float | None = None
    text_encoder_lr: float | None = None
    clip_skip: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    resolution: int | None = None
    noise_offset: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float | None = None
    cache_batch_size: int | None = None

    def overrides(self) -> dict[str, Any]:
        """Nested config dict of the fields this preset sets."""
        d: dict[str, Any] = {"preset": self.name}
        loop, data = {}, {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or f.name in ("name", "source", "note"):
                continue
            if f.name in ("lr", "batch_size", "epochs"):
                loop[f.name] = v
            elif f.name == "resolution":
                data[f.name] = v
            else:
                d[f.name] = list(v) if isinstance(v, tuple) else v
        if loop:
            d["loop"] = loop
        if data:
            d["data"] = data
        return d


_DASILVA = ("da Silva et al., Exploring Foundation Models for Synthetic Medical Imaging, Table I (REFERENCE.md §6): "
            "SD 1.5, kohya LoRA on U-Net + text encoder, clip skip 2, 100 epochs, batch 2, 512 px, constant lr")
_DASILVA_NOTE = ("The table gives no LoRA rank/alpha (defaults apply) and no noise-offset value for 'original' "
                 "(0 is used: kohya_ss' default; set --noise-offset). 'VAE batch' is kohya's latent-caching batch "
                 "(no effect on the result), mapped to the cache batch size.")
_DS = dict(method="lora", components=("unet", "text_encoder"), clip_skip=2, epochs=100, batch_size=2,
           resolution=512)
_MULTIRES = dict(multires_noise_iterations=6, multires_noise_discount=0.1, cache_batch_size=32)
_PIXELUP = ("Pixels Under Pressure (PixelUPressure), fine-tuning strategy table on SD 1.5 (REFERENCE.md §6)")
_PIXELUP_NOTE = "Learning rate, steps and resolution are not given in REFERENCE.md: the defaults apply."

PRESETS: tuple[Preset, ...] = (
    Preset("dasilva-m1", _DASILVA, _DASILVA_NOTE, optimizer="adamw8bit", lr=1e-4, text_encoder_lr=5e-5,
           noise_offset=0.0, **_DS),
    Preset("dasilva-m2", _DASILVA, _DASILVA_NOTE, optimizer="adamw8bit", lr=1e-4, text_encoder_lr=5e-5,
           **_DS, **_MULTIRES),
    Preset("dasilva-m3", _DASILVA, _DASILVA_NOTE, optimizer="adafactor", lr=1e-4, text_encoder_lr=5e-5,
           **_DS, **_MULTIRES),
    Preset("dasilva-m4", _DASILVA, _DASILVA_NOTE, optimizer="dadapt-sgd", lr=1e-5, text_encoder_lr=1e-5,
           **_DS, **_MULTIRES),
    Preset("dasilva-m5", _DASILVA, _DASILVA_NOTE, optimizer="prodigy", lr=1e-5, text_encoder_lr=1e-5,
           **_DS, **_MULTIRES),
    Preset("pixelup-1", _PIXELUP, _PIXELUP_NOTE, method="full", components=("unet",)),
    Preset("pixelup-2", _PIXELUP, _PIXELUP_NOTE, method="full", components=("text_encoder",)),
    Preset("pixelup-3", _PIXELUP, _PIXELUP_NOTE, method="full", components=("vae",)),
    Preset("pixelup-4", _PIXELUP, _PIXELUP_NOTE, method="full", components=("text_encoder", "unet")),
    Preset("pixelup-5", _PIXELUP, _PIXELUP_NOTE, method="full", components=("vae", "unet")),
    Preset("pixelup-6", _PIXELUP, _PIXELUP_NOTE, method="full", components=("vae", "text_encoder")),
    Preset("pixelup-7", _PIXELUP, _PIXELUP_NOTE, method="full", components=("unet", "text_encoder", "vae")),
    Preset("pixelup-8", _PIXELUP, _PIXELUP_NOTE + " LoRA rank 16 / alpha 32 from its scripts.", method="lora",
           components=("unet",), rank=16, alpha=32.0),
    Preset("pixelup-9", _PIXELUP, _PIXELUP_NOTE + " DoRA rank 32 / alpha 64 from its scripts.", method="dora",
           components=("unet",), rank=32, alpha=64.0),
    Preset("pixelup-10", _PIXELUP, _PIXELUP_NOTE, method="bitfit", components=("unet",)),
    Preset("pixelup-11", _PIXELUP, _PIXELUP_NOTE, method="difffit", components=("unet",)),
)


def preset(name: str) -> Preset:
    for p in PRESETS:
        if p.name == name:
            return p
    raise UserError(f"unknown preset {name!r}; choose one of {', '.join(p.name for p in PRESETS)}")
