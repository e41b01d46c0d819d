"""Kandinsky 2.2 LoRA training (prior or decoder) on the shared loop, and generation from the trained adapters.

Prior (unCLIP): target x0 = (CLIP image embedding - clip_mean) / clip_std, noised by
DDPMScheduler(squaredcos_cap_v2, prediction_type="sample") - the process the UnCLIP sampler inverts - and predicted
from (x_t, t, text_embeds, text last hidden state, mask); x0 MSE. Captions are dropped to "" with probability
`data.caption_dropout` (default 0.1) so the unconditional branch that classifier-free guidance uses is trained too.
Min-SNR for an x0 target weights by min(snr, gamma) (no division by snr, unlike epsilon targets).

Decoder: epsilon MSE on unscaled MoVQ latents of the training image, conditioned on the CLIP image embedding of
the same image (`added_cond_kwargs={"image_embeds": ...}`); the UNet outputs 8 channels and the first 4 are the
noise. `image_embed_dropout` swaps the embedding for the zero-image embedding the pipelines use as the negative.
Min-SNR for epsilon: min(snr, gamma) / snr.

The frozen encoders' outputs come from harness/encoder_cache.py (computed once, read every step) unless `cache` is
off; the two paths produce the same data stream and the same losses (tested).

Only the LoRA parameters train (peft on the model: `add_adapter`), the base weights stay bit-identical (tested).
The adapter is exported in diffusers' format to RUN/final/ (pytorch_lora_weights.safetensors + adapter_meta.json);
see models/kandinsky/lora.py for the plain-diffusers snippet that loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import from_dict, to_dict
from harness.dataset import CaptionedImages, DatasetConfig, collate_items, item_rng, to_model_pixels
from harness.encoder_cache import CachedItemsBase
from harness.errors import UserError
from harness.generate import Generator
from harness.io import sha256_file
from harness.runs import Run, create_run, open_run
from harness.trainer import LoopConfig, TrainTask, run_training
from models.kandinsky.lora import (WEIGHT_NAME, LoraSpec, adapter_content_hash, add_lora, load_adapter,
                                   lora_parameters, read_adapter_meta, write_adapter)
from models.kandinsky.loading import DEFAULT_DECODER, DEFAULT_PRIOR

Component = Literal["prior", "decoder"]
FAMILIES = {"prior": "kandinsky-prior", "decoder": "kandinsky-decoder"}
ADAPTER_DIR = "final"  # the trainer exports into RUN/final


@dataclass
class GenerationConfig:
    """Sampling settings used by `harness generate` on a Kandinsky run (CLI --steps/--guidance set the decoder's)."""

    prior_steps: int = 25  # KandinskyV22PriorPipeline's default (and the paper's)
    prior_guidance: float = 4.0
    decoder_steps: int = 100  # KandinskyV22Pipeline's default; the paper (and --preset paper) used 150
    decoder_guidance: float = 4.0
    height: int | None = None  # None = the training resolution (256 by default)
    width: int | None = None
    dtype: str = "fp32"  # fp16/bf16 on a GPU

    def validate(self) -> None:
        if min(self.prior_steps, self.decoder_steps) < 1:
            raise UserError("generation steps must be >= 1")
        for side in (self.height, self.width):
            if side is not None and not 8 <= side <= 4096:
                raise UserError(f"generation height/width must be in [8, 4096], got {side}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise UserError(f"generation dtype must be fp32, bf16 or fp16, got {self.dtype!r}")


@dataclass
class KandinskyConfig:
    component: Component = "prior"
    data_dir: str = ""
    split_path: str = ""
    prior: str = DEFAULT_PRIOR  # hub id or local pipeline folder
    decoder: str = DEFAULT_DECODER
    prior_revision: str | None = None
    decoder_revision: str | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DatasetConfig = field(default_factory=DatasetConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    image_embed_dropout: float = 0.0  # decoder only (default_config sets 0.1 for the decoder)
    gradient_checkpointing: bool = False  # recompute activations in backward (memory of large batches)
    snr_gamma: float | None = None  # Min-SNR gamma (e.g. 5.0); None = plain MSE
    cache: bool = True
    cache_dir: str | None = None  # None = $HARNESS_CACHE_DIR/kandinsky-encoders or <runs>/.cache/kandinsky-encoders
    cache_batch_size: int = 16
    base_dtype: str = "fp32"  # dtype of the frozen weights (the LoRA parameters are always fp32)
    prior_adapter: str = "none"  # decoder runs: which prior adapter `generate` pairs with (run, adapter dir, none)
    decoder_adapter: str = "none"  # prior runs: which decoder adapter `generate` pairs with
    paraphrases_path: str | None = None  # prior only
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    preset: str | None = None  # the preset the config started from (recorded; see paper_preset)
    # Keep the best adapter (validation metric every E epochs) and export it to final/; None = the last weights.
    eval_every_epochs: float | None = None

    def validate(self) -> None:
        if self.component not in FAMILIES:
            raise UserError(f"component must be prior or decoder, got {self.component!r}")
        if not 0.0 <= self.image_embed_dropout <= 1.0:
            raise UserError(f"image_embed_dropout must be in [0, 1], got {self.image_embed_dropout}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"snr_gamma must be > 0, got {self.snr_gamma}")
        if self.base_dtype not in ("fp32", "bf16", "fp16"):
            raise UserError(f"base_dtype must be fp32, bf16 or fp16, got {self.base_dtype!r}")
        if self.base_dtype != "fp32" and self.loop.mixed_precision != self.base_dtype:
            # half-precision frozen weights need autocast to meet the fp32 LoRA weights and fp32 noise
            raise UserError(f"--base-dtype {self.base_dtype} needs --mixed-precision {self.base_dtype}")
        if self.component == "decoder" and (self.paraphrases_path or self.data.paraphrase_strategy != "none"):
            raise UserError("paraphrases apply to the prior only (the decoder sees no text)")
        if self.component == "decoder" and self.data.caption_dropout:
            raise UserError("--caption-dropout applies to the prior; the decoder has --image-embed-dropout")
        if self.component == "prior" and self.image_embed_dropout:
            raise UserError("--image-embed-dropout applies to the decoder; the prior has --caption-dropout")
        if self.cache and (self.data.jitter > 0 or self.data.hflip):
            raise UserError("the encoder cache holds un-augmented images: with --jitter/--hflip use --no-cache "
                            "(the frozen encoders then run every step on the augmented pixels)")
        if self.cache_batch_size < 1:
            raise UserError(f"cache_batch_size must be >= 1, got {self.cache_batch_size}")
        if self.eval_every_epochs is not None and not self.eval_every_epochs > 0:
            raise UserError(f"eval_every_epochs must be > 0, got {self.eval_every_epochs}")
        if self.preset not in (None, "paper"):
            raise UserError(f"preset must be paper or none, got {self.preset!r}")
        self.generation.validate()

    def warnings(self) -> list[str]:
        """Legal but probably unintended settings (the CLI prints them, runs log them)."""
        return self.lora.warnings()

    def summary(self) -> dict[str, Any]:
        """Flat fields the leaderboard shows."""
        return {"component": self.component, "rank": self.lora.rank, "alpha": self.lora.lora_alpha,
                "targets": self.lora.targets, "dora": self.lora.dora, "rslora": self.lora.rslora,
                "steps": self.loop.max_steps, "paraphrase_strategy": self.data.paraphrase_strategy,
                "preset": self.preset, "caption_dropout": self.data.caption_dropout, "cache": self.cache}


IMAGE_EMBED_DROPOUT = 0.1  # see default_config


def default_config(component: Component) -> KandinskyConfig:
    """Defaults per component. Both train the unconditional branch that classifier-free guidance uses: the prior
    drops 10 % of captions to ""; the decoder conditions 10 % of items on the zero-image embedding (the negative the
    pipelines guide against). The original Kandinsky 2 decoder trainer does the same with an all-zero CLIP image
    (kandinsky2/train_utils/data/dataset_unclip_2_1.py, `drop_image_prob`); 0.1 matches the prior's rate."""
    cfg = KandinskyConfig(component=component)
    if component == "prior":
        cfg.data.caption_dropout = 0.1
    else:
        cfg.image_embed_dropout = IMAGE_EMBED_DROPOUT
    return cfg


Stage = Literal["train", "sweep"]
PAPER_EPOCHS = {("prior", "train"): 100, ("decoder", "train"): 40, ("prior", "sweep"): 100, ("decoder", "sweep"): 100}


def paper_preset(component: Component, stage: Stage = "train") -> KandinskyConfig:
    """The seed paper's three-stage recipe. Common: AdamW lr 1e-4, batch 64 (the released default config; its
    example config ran batch 256, fp16 and Min-SNR gamma 5), 256 px with padding, one item per caption row (the
    paper's epoch is one pass over the ~18.2 k caption rows of the 1,800 training images), generation with 25
    prior and 150 decoder steps. Epochs: prior 100 (train and sweep); decoder stage 1 (train) r = 32 for 40
    epochs; decoder sweep 100 epochs."""
    cfg = default_config(component)
    cfg.preset = "paper"
    cfg.loop.lr = 1e-4
    cfg.loop.batch_size = 64
    cfg.loop.epochs = PAPER_EPOCHS[(component, stage)]
    cfg.data.resolution = 256
    cfg.data.fit = "pad"
    cfg.data.captions = "all"
    cfg.generation.prior_steps = 25
    cfg.generation.decoder_steps = 150
    if component == "decoder" and stage == "train":
        cfg.lora.rank = 32
    return cfg


def base_config(component: Component, preset: str | None, stage: Stage = "train") -> KandinskyConfig:
    if preset in (None, "none"):
        return default_config(component)
    if preset == "paper":
        return paper_preset(component, stage)
    raise UserError(f"unknown preset {preset!r}; choose paper")


def epoch_items(ds) -> int:
    """Items of one epoch as the seed paper counts it: the caption rows of the training images (whatever
    `captions` says: with "sample" an epoch is as many draws as there are rows)."""
    base = ds.base if isinstance(ds, CachedItems) else ds
    return base.stats()["n_caption_rows"]


def resolved_config(cfg: KandinskyConfig) -> dict[str, Any]:
    """`--print-config`: the config with the loop resolved against the training split (steps per epoch, total
    steps, validation interval); reads prompt-gt.csv and SPLIT.json only (no weights, no images)."""
    from harness.dataset import load_training_data
    from harness.trainer import loop_description, resolve_loop

    cfg.validate()
    out = to_dict(cfg)
    if not (cfg.data_dir and cfg.split_path):
        out["loop"] = dict(out["loop"], derived=None)
        out["note"] = "give --split and --data to derive the steps per epoch and the total steps"
        return out
    ds, _ = load_training_data(cfg.data_dir, cfg.split_path, "train", dataclasses.replace(cfg.data), None)
    loop, plan = resolve_loop(_with_eval_interval(cfg.loop, cfg, epoch_items(ds)), epoch_items(ds))
    out["loop"] = loop_description(loop, plan)
    return out


def _with_eval_interval(loop: LoopConfig, cfg: KandinskyConfig, n_items: int) -> LoopConfig:
    """--eval-every-epochs E: validate (and keep the best adapter) every round(E x steps per epoch) steps."""
    if cfg.eval_every_epochs is None or loop.select_best != "none":  # a recorded run keeps its metric
        return loop
    from harness.trainer import resolve_loop

    _, plan = resolve_loop(loop, n_items)
    every = max(1, round(cfg.eval_every_epochs * plan.steps_per_epoch))
    return dataclasses.replace(loop, val_every=every, select_best=best_metric())


def best_metric() -> str:
    """What --eval-every-epochs ranks by: FID of generations for the validation captions (one per validation image,
    the run's sampling settings) against the validation images when the Inception weights of `harness score` are
    on this machine; else the validation loss (fixed noise seeds, every dropout off). The run records which."""
    return "fid" if _fid_weights() is not None else "val_loss"


def _fid_weights():
    """The verified Inception weights `harness score` uses, if present (never downloads mid-training)."""
    try:
        from harness.features import MissingWeights, resolve_weights
        from harness.score import INCEPTION
    except ImportError:
        return None
    try:
        return resolve_weights(INCEPTION, None, allow_download=False)
    except (MissingWeights, UserError):
        return None


def config_from_dict(d: dict[str, Any], where: str = "KandinskyConfig") -> KandinskyConfig:
    try:
        cfg = from_dict(KandinskyConfig, d, where)
    except ValueError as e:  # LoraSpec checks (models/ raises ValueError, it does not know UserError)
        raise UserError(f"{where}: {e}") from None
    return cfg


RUN_ONLY_KEYS = ("family", "run_id", "created", "harness_version", "summary", "sources")


def config_from_run(run: Run) -> KandinskyConfig:
    d = {k: v for k, v in run.config().items() if k not in RUN_ONLY_KEYS}
    return config_from_dict(d, where=str(run.config_path))


# ---------------------------------------------------------------------------------------------------------------
# Objectives (pure functions of the batch, the models and the step generator).


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU from the loop's CPU generator: the same seed gives the same noise on any device.
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _snr(scheduler, t: torch.Tensor) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(t.device)[t].float()
    return ac / (1 - ac)


def prior_noise_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type="sample")


def prior_loss(prior: nn.Module, clip_mean: torch.Tensor, clip_std: torch.Tensor, scheduler, batch: dict,
               generator: torch.Generator, snr_gamma: float | None = None) -> torch.Tensor:
    """unCLIP prior objective: x0 MSE on the normalised CLIP image embedding (see module docstring)."""
    emb = batch["image_embeds"].float()
    x0 = (emb - clip_mean.float()) / clip_std.float()
    b = x0.shape[0]
    noise = _randn(x0.shape, generator, x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    pred = prior(xt, timestep=t, proj_embedding=batch["text_embeds"], encoder_hidden_states=batch["text_hidden"],
                 attention_mask=batch["text_mask"]).predicted_image_embedding
    per_sample = F.mse_loss(pred.float(), x0, reduction="none").mean(dim=1)
    if snr_gamma:
        per_sample = per_sample * _snr(scheduler, t).clamp(max=snr_gamma)
    return per_sample.mean()


def decoder_loss(unet: nn.Module, scheduler, batch: dict, generator: torch.Generator,
                 zero_embed: torch.Tensor | None = None, image_embed_dropout: float = 0.0,
                 snr_gamma: float | None = None) -> torch.Tensor:
    """Decoder objective: epsilon MSE on MoVQ latents, image-embedding conditioned (see module docstring)."""
    x0 = batch["latents"].float()
    emb = batch["image_embeds"]
    b, c = x0.shape[:2]
    noise = _randn(x0.shape, generator, x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
    coin = torch.rand(b, generator=generator).to(x0.device)  # always drawn: the stream does not depend on p
    if image_embed_dropout > 0:
        drop = (coin < image_embed_dropout)[:, None]
        emb = torch.where(drop, zero_embed.to(emb.device, emb.dtype).expand_as(emb), emb)
    xt = scheduler.add_noise(x0, noise, t)
    out = unet(xt, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample
    per_sample = F.mse_loss(out[:, :c].float(), noise, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        snr = _snr(scheduler, t)
        per_sample = per_sample * snr.clamp(max=snr_gamma) / snr
    return per_sample.mean()


# ---------------------------------------------------------------------------------------------------------------
# Data: images + captions, or the same items read from the encoder cache.


class CachedItems(CachedItemsBase):
    """The items of `base` (same caption draws for the same (seed, epoch, index)) as cached encoder outputs."""

    def __init__(self, base: CaptionedImages, store, text_keys: dict[str, str] | None,
                 image_keys: dict[str, list[str]]):
        super().__init__(base, store)
        self.text_keys, self.image_keys = text_keys, image_keys

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        # The same draw order as CaptionedImages.__getitem__ (caption first; no augmentation follows).
        i, caption = self.base.caption_for(index, item_rng(self.base.cfg.seed, self.base.epoch, index))
        image_id = self.base.image_ids[i]
        item: dict[str, Any] = {"image_id": image_id, "caption": caption}
        if self.text_keys is not None:
            item.update(self._load(self.text_keys[caption]))
        for key in self.image_keys[image_id]:
            item.update(self._load(key))
        return item


def collate_features(items: list[dict]) -> dict:
    out: dict[str, Any] = {"image_id": [it["image_id"] for it in items], "caption": [it["caption"] for it in items]}
    for k, v in items[0].items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.stack([it[k] for it in items])
    return out


# ---------------------------------------------------------------------------------------------------------------
# The task.


def _device_for_encoding() -> torch.device:
    from harness.distributed import state

    return state().device


class KandinskyTask(TrainTask):
    """LoRA on the prior or the decoder; see the module docstring for the objectives."""

    def __init__(self, cfg: KandinskyConfig, train_ds, val_ds, prior_parts, decoder_parts=None,
                 zero_embed: torch.Tensor | None = None, source_info: dict | None = None,
                 data_hashes: dict | None = None):
        self.cfg = cfg
        self.component = cfg.component
        self._train, self._val = train_ds, val_ds
        self.zero_embed = zero_embed
        self.source_info = source_info or {}
        self.data_hashes = data_hashes or {}
        self._grid_generator: KandinskyGenerator | None = None
        self._fid_generator: KandinskyGenerator | None = None
        self.prior_parts, self.decoder_parts = prior_parts, decoder_parts
        uncached = not cfg.cache
        if self.component == "prior":
            self.prior = prior_parts.prior
            self.noise_scheduler = prior_noise_scheduler(prior_parts.scheduler.config.num_train_timesteps)
            self.text_encoder = prior_parts.text_encoder if uncached else None
            self.image_encoder = prior_parts.image_encoder if uncached else None
            self.trained = self.prior
        else:
            from diffusers import DDPMScheduler

            self.unet = decoder_parts.unet
            self.noise_scheduler = DDPMScheduler.from_config(decoder_parts.scheduler.config)
            self.image_encoder = prior_parts.image_encoder if uncached else None
            self.movq = decoder_parts.movq if uncached else None
            self.trained = self.unet
        with torch.random.fork_rng(devices=[]):  # LoRA A init depends on the run's seed only
            torch.manual_seed(cfg.loop.seed)
            add_lora(self.trained, cfg.lora)
        if cfg.gradient_checkpointing:
            from models.kandinsky.loading import enable_gradient_checkpointing

            enable_gradient_checkpointing(self.trained)
        # Checked in the tests: only these are trainable; everything else stays bit-identical.
        self._lora = lora_parameters(self.trained)

    # -- TrainTask API --------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._lora

    def modules(self) -> dict[str, nn.Module]:
        names = ["prior", "text_encoder", "image_encoder"] if self.component == "prior" else \
            ["unet", "image_encoder", "movq"]
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    def train_dataset(self):
        return self._train

    def val_dataset(self):
        return self._val

    def epoch_items(self) -> int:
        return epoch_items(self._train)

    def collate(self, items: list[dict]) -> dict:
        return collate_items(items) if "pixels" in items[0] else collate_features(items)

    def _features(self, batch: dict) -> dict:
        """Uncached path: run the frozen encoders on this batch (exactly what the cache stores)."""
        if "pixels" not in batch:
            return batch
        from models.kandinsky import encoders as E

        out = dict(batch)
        pixels = to_model_pixels(batch["pixels"])
        enc = _unwrap(self.image_encoder)
        processor = self.prior_parts.image_processor
        out["image_embeds"] = E.clip_image_embeds(processor, enc, pixels)
        if self.component == "prior":
            out.update(E.encode_text(self.prior_parts.tokenizer, _unwrap(self.text_encoder), list(batch["caption"]),
                                     device=pixels.device))
        else:
            out["latents"] = E.movq_latents(_unwrap(self.movq), pixels)
        return out

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        batch = self._features(batch)
        if self.component == "prior":
            base = _unwrap(self.prior)
            return prior_loss(self.prior, base.clip_mean, base.clip_std, self.noise_scheduler, batch, generator,
                              self.cfg.snr_gamma)
        # Validation (modules in eval mode) measures the conditional loss: no image-embedding dropout, as the
        # validation set has no caption dropout.
        dropout = self.cfg.image_embed_dropout if _unwrap(self.unet).training else 0.0
        return decoder_loss(self.unet, self.noise_scheduler, batch, generator, self.zero_embed, dropout,
                            self.cfg.snr_gamma)

    def adapter_meta(self) -> dict[str, Any]:
        src = self.source_info.get(self.component, {})
        return {
            "format": "harness-kandinsky-lora/1",
            "component": self.component,
            "base_model": src.get("requested"),
            "base_revision": src.get("revision"),
            "base_commit": src.get("commit"),
            "lora": self.cfg.lora.to_dict(),
            "weight_name": WEIGHT_NAME,
            "load_with": "model.load_lora_adapter(DIR, prefix=None, weight_name='pytorch_lora_weights.safetensors')",
            "training": to_dict(self.cfg),
            "seed": self.cfg.loop.seed,
            "data": self.data_hashes,
        }

    def export(self, out_dir: Path) -> None:
        write_adapter(_unwrap(self.trained), out_dir, self.adapter_meta())

    def sample_grid(self, step: int, path: Path) -> bool:
        """A 4-image strip for 4 validation captions at fixed seeds: the prior task pairs its in-training prior with
        the decoder (and decoder adapter) it will be generated with; the decoder task pairs the base prior (plus
        prior adapter) with its in-training UNet.

        The generator reuses the task's own modules (the prior parts every task loads, the trained model, the
        decoder's UNet and MoVQ); only the half a task does not train with - the decoder of a prior run - is loaded,
        once. Modules that training does not keep on the device are moved there for the grid and back after, so a
        grid costs no resident memory."""
        from PIL import Image

        from harness.encoder_cache import needed_captions

        if self._val is None:
            return False
        base = self._val.base if isinstance(self._val, CachedItems) else self._val
        prompts = [c for c in needed_captions(base) if c][:4]
        if self._grid_generator is None:
            self._grid_generator = self._make_grid_generator()
        gen = self._grid_generator
        device = next(_unwrap(self.trained).parameters()).device
        visitors = [gen.p.prior, gen.p.text_encoder, gen.d.unet, gen.d.movq]
        with _moved_to(visitors, device):
            images = gen.generate(prompts, list(range(len(prompts))))
        strip = np.concatenate(images, axis=1)
        from harness.io import atomic_path

        with atomic_path(path) as tmp:
            Image.fromarray(strip).save(tmp, format="PNG")
        return True

    def selection_metric(self, name: str) -> float | None:
        """FID of one image per validation caption (fixed seeds, the run's sampling settings) against the validation
        images, through `harness score`'s extractor and feature cache (the real side is computed once)."""
        if name != "fid" or self._val is None:
            return None
        weights = _fid_weights()
        if weights is None:
            return None
        import tempfile

        from PIL import Image
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        from harness.features import ImageSet, TorchFidelityExtractor, extract_features
        from harness.generate import image_seed
        from harness.score import INCEPTION, RealPreprocess, feature_identity

        base = self._val.base if isinstance(self._val, CachedItems) else self._val
        base.set_epoch(0)
        prompts = [base.caption_for(i, item_rng(base.cfg.seed, 0, i))[1] for i in range(len(base))]
        if self._fid_generator is None:
            self._fid_generator = self._make_grid_generator(self.cfg.generation)
        gen = self._fid_generator
        device = next(_unwrap(self.trained).parameters()).device
        identity = feature_identity(INCEPTION, ("2048",), weights, device)
        extractor: list = []

        def make():
            if not extractor:
                extractor.append(TorchFidelityExtractor(INCEPTION, ("2048",), weights, device))
            return extractor[0]

        real = ImageSet("validation images", [base.devset.image_path(i) for i in base.image_ids])
        with tempfile.TemporaryDirectory(prefix="kandinsky-fid-") as tmp:
            paths = []
            with _moved_to([gen.p.prior, gen.p.text_encoder, gen.d.unet, gen.d.movq], device):
                for start in range(0, len(prompts), 8):
                    chunk = list(range(start, min(start + 8, len(prompts))))
                    images = gen.generate([prompts[i] for i in chunk], [image_seed(0, i + 1) for i in chunk])
                    for i, im in zip(chunk, images):
                        paths.append(Path(tmp) / f"{i + 1:05d}.png")
                        Image.fromarray(im).save(paths[-1])
            fake = extract_features(ImageSet("in-training generations", paths), identity, make, use_cache=False)
        # The real side as `harness score` compares by default: the training transform at the generated size.
        prep = RealPreprocess("match", int(images[0].shape[0]), base.cfg.fit)
        reals = extract_features(real, feature_identity(INCEPTION, ("2048",), weights, device, prep.preprocess_id),
                                 make, load=prep.load, shape_key=prep.shape_key)
        out = fid_statistics_to_metric(fid_features_to_statistics(fake.features["2048"]),
                                       fid_features_to_statistics(reals.features["2048"]), verbose=False)
        return float(out["frechet_inception_distance"])

    def _make_grid_generator(self, gen: GenerationConfig | None = None) -> "KandinskyGenerator":
        from models.kandinsky.loading import load_decoder

        if gen is None:  # the sample strip: a preview, fewer steps
            gen = dataclasses.replace(self.cfg.generation, prior_steps=min(self.cfg.generation.prior_steps, 10),
                                      decoder_steps=min(self.cfg.generation.decoder_steps, 20))
        if self._grid_generator is not None:  # share the loaded modules (the prior task's decoder) between both
            g = self._grid_generator
            return KandinskyGenerator(g.p, g.d, gen, g.height, g.width, g.device, info={})
        height = gen.height or self.cfg.data.resolution
        if self.component == "prior":
            prior_parts = dataclasses.replace(self.prior_parts, prior=_unwrap(self.prior))
            decoder_parts = load_decoder(self.cfg.decoder, self.cfg.decoder_revision, self.cfg.base_dtype, "cpu")
            ref = resolve_adapter(self.cfg.decoder_adapter, "decoder")
            if ref:
                load_adapter(decoder_parts.unet, ref)
        else:
            prior_parts = self.prior_parts  # loaded by build_task; its prior is not trained here
            ref = resolve_adapter(self.cfg.prior_adapter, "prior")
            if ref:
                load_adapter(prior_parts.prior, ref)
            decoder_parts = dataclasses.replace(self.decoder_parts, unet=_unwrap(self.unet))
        device = next(_unwrap(self.trained).parameters()).device
        return KandinskyGenerator(prior_parts, decoder_parts, gen, height, gen.width or height, device, info={})


@contextlib.contextmanager
def _moved_to(modules: list[nn.Module], device: torch.device):
    """Move `modules` to `device` for the block, then each back to where it was."""
    homes = [next(m.parameters()).device for m in modules]
    try:
        for m in modules:
            m.to(device)
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


def _unwrap(m: nn.Module | None) -> nn.Module | None:
    return getattr(m, "module", m)


# ---------------------------------------------------------------------------------------------------------------
# Building the task: load models, data, fill the cache.


def check_movq_resolution(cfg: KandinskyConfig) -> None:
    """--resolution against the decoder's MoVQ x UNet downsampling, read from their configs before anything loads:
    any other size breaks the UNet's skip connections mid-step (a base that cannot be resolved is reported by the
    loader)."""
    from harness.dataset import check_resolution, downsampling_factor
    from harness.io import read_json
    from models.hub import resolve_source

    try:
        folder = resolve_source(cfg.decoder, cfg.decoder_revision).folder
    except FileNotFoundError:
        return
    movq, unet = folder / "movq" / "config.json", folder / "unet" / "config.json"
    if movq.is_file() and unet.is_file():
        f_movq = downsampling_factor(read_json(movq)["block_out_channels"])
        f_unet = downsampling_factor(read_json(unet)["block_out_channels"])
        check_resolution(cfg.data.resolution, f_movq * f_unet,
                         f"the decoder's MoVQ x UNet downsampling ({f_movq} x {f_unet})")


def build_task(cfg: KandinskyConfig, log: Callable[[str], None] = lambda s: None) -> tuple[KandinskyTask, dict]:
    """Load the base models and the data, fill the encoder cache; returns (task, data hashes for the run)."""
    from harness.dataset import load_training_data
    from harness.paraphrase import training_paraphrases
    from models.kandinsky import encoders as E
    from models.kandinsky.loading import load_decoder, load_prior

    cfg.validate()
    if cfg.component == "decoder":
        check_movq_resolution(cfg)
    paraphrases, para_sha = training_paraphrases(cfg.paraphrases_path, cfg.data.paraphrase_strategy)
    train_cfg = dataclasses.replace(cfg.data)
    # Validation measures the conditional loss, each validation image once (its caption drawn at a fixed seed), so
    # a few batches cover the whole side (4 x 64 >= the 200 validation images of the paper's split).
    val_cfg = dataclasses.replace(cfg.data, caption_dropout=0.0, captions="sample")
    train_ds, hashes = load_training_data(cfg.data_dir, cfg.split_path, "train", train_cfg, paraphrases)
    try:
        val_ds, val_hashes = load_training_data(cfg.data_dir, cfg.split_path, "val", val_cfg, paraphrases)
    except UserError as e:
        if "no images on this side" not in str(e):
            raise
        val_ds, val_hashes = None, {"n_images": 0}
    hashes = dict(hashes, val_n_images=val_hashes["n_images"], paraphrases_sha256=para_sha)

    def _load(fn, *args):
        try:
            return fn(*args)
        except (FileNotFoundError, OSError, ValueError) as e:
            raise UserError(str(e)) from None

    prior_parts = _load(load_prior, cfg.prior, cfg.prior_revision, cfg.base_dtype, "cpu")
    decoder_parts = None
    if cfg.component == "decoder":
        decoder_parts = _load(load_decoder, cfg.decoder, cfg.decoder_revision, cfg.base_dtype, "cpu")
    sources = {"prior": prior_parts.source.to_dict()}
    if decoder_parts is not None:
        sources["decoder"] = decoder_parts.source.to_dict()
    zero_embed = E.zero_image_embed(prior_parts.image_encoder).cpu() if cfg.component == "decoder" else None

    if cfg.cache:
        train_ds, val_ds, stats = _cached_datasets(cfg, train_ds, val_ds, prior_parts, decoder_parts, log)
        hashes["encoder_cache"] = stats
    task = KandinskyTask(cfg, train_ds, val_ds, prior_parts, decoder_parts, zero_embed, sources, hashes)
    return task, hashes


def _cached_datasets(cfg: KandinskyConfig, train_ds: CaptionedImages, val_ds: CaptionedImages | None,
                     prior_parts, decoder_parts, log) -> tuple[CachedItems, CachedItems | None, dict]:
    from harness.distributed import state as dist_state

    from harness.encoder_cache import TensorStore, default_cache_dir, image_key, needed_captions, text_key, unique
    from harness.progress import progress
    from models.kandinsky import encoders as E

    store = TensorStore(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    device = _device_for_encoding()
    bs = cfg.cache_batch_size
    devset = train_ds.devset
    datasets = [d for d in (train_ds, val_ds) if d is not None]
    # The cached pixels are the dataset's own un-augmented decode (clean_pixels): JPEGs decoded at the training
    # scale ("draft"), which differs slightly from a full decode + resize, so it is part of the key.
    pre = {"resolution": cfg.data.resolution, "fit": cfg.data.fit, "decode": "draft"}
    where = {img: (d, i) for d in reversed(datasets) for i, img in enumerate(d.image_ids)}
    text_fp = prior_parts.fingerprints["text"]
    image_fp = prior_parts.fingerprints["image"]
    movq_fp = decoder_parts.fingerprints["movq"] if decoder_parts is not None else None

    image_ids = unique(i for d in datasets for i in d.image_ids)
    shas = {i: sha256_file(devset.image_path(i)) for i in image_ids}
    image_keys = {i: [image_key("clip-image", image_fp, pre, shas[i])] for i in image_ids}
    if movq_fp:
        for i in image_ids:
            image_keys[i].append(image_key("movq", movq_fp, pre, shas[i]))
    captions = unique(c for d in datasets for c in needed_captions(d)) if cfg.component == "prior" else []
    text_keys = {c: text_key(text_fp, c) for c in captions}

    with dist_state().main_process_first():  # rank 0 fills, the others then find every entry (no duplicated work)
        with progress() as bar:
            if captions:
                t = bar.add_task("cache text", total=len(captions))
                prior_parts.text_encoder.to(device)

                def encode(idx: list[int]) -> list[dict]:
                    out = E.encode_text(prior_parts.tokenizer, prior_parts.text_encoder, [captions[i] for i in idx],
                                        device=device)
                    return [{k: v[j] for k, v in out.items()} for j in range(len(idx))]

                text_stats = store.fill([text_keys[c] for c in captions], encode, bs, lambda n: bar.advance(t, n),
                                        meta=lambda i: {"kind": "text", "caption": captions[i]})
                prior_parts.text_encoder.to("cpu")
            else:
                text_stats = None
            missing = [i for i in image_ids if not all([store.has(k) for k in image_keys[i]])]
            t = bar.add_task("cache images", total=len(image_ids), completed=len(image_ids) - len(missing))
            prior_parts.image_encoder.to(device)
            if decoder_parts is not None:
                decoder_parts.movq.to(device)
            for start in range(0, len(missing), bs):
                ids = missing[start : start + bs]
                pixels = to_model_pixels(torch.stack([where[i][0].clean_pixels(where[i][1]) for i in ids]), device)
                embeds = E.clip_image_embeds(prior_parts.image_processor, prior_parts.image_encoder, pixels)
                latents = E.movq_latents(decoder_parts.movq, pixels) if decoder_parts is not None else None
                for j, i in enumerate(ids):
                    meta = {"image": i, "image_sha256": shas[i], **{k: str(v) for k, v in pre.items()}}
                    store.put(image_keys[i][0], {"image_embeds": embeds[j]}, dict(meta, kind="clip-image"))
                    if latents is not None:
                        store.put(image_keys[i][1], {"latents": latents[j]}, dict(meta, kind="movq"))
                bar.advance(t, len(ids))
            prior_parts.image_encoder.to("cpu")
            if decoder_parts is not None:
                decoder_parts.movq.to("cpu")
    stats = {
        "dir": str(store.root),
        "text": text_stats.to_dict() if text_stats else None,
        "images": {"hits": len(image_ids) - len(missing), "misses": len(missing)},
        "n_captions": len(captions),
        "n_images": len(image_ids),
    }
    log(f"encoder cache {store.root}: {len(captions)} captions "
        f"({text_stats.misses if text_stats else 0} new), {len(image_ids)} images ({len(missing)} new)")
    train = CachedItems(train_ds, store, text_keys if captions else None, image_keys)
    val = CachedItems(val_ds, store, text_keys if captions else None, image_keys) if val_ds is not None else None
    return train, val, stats


# ---------------------------------------------------------------------------------------------------------------
# Entry points: train, resume.


def resolve_adapter(ref: str | None, component: Component) -> Path | None:
    """'none' -> None; a folder holding pytorch_lora_weights.safetensors; or a run (dir or id) -> RUN/final."""
    if not ref or ref == "none":
        return None
    p = Path(ref)
    if (p / WEIGHT_NAME).is_file():
        return p
    run = open_run(ref)
    fam = run.family
    if fam != FAMILIES[component]:
        raise UserError(f"is a {fam} run; a {FAMILIES[component]} run (or 'none') is needed here", run.dir)
    adapter = run.dir / ADAPTER_DIR
    if not (adapter / WEIGHT_NAME).is_file():
        raise UserError(f"run has no finished adapter ({ADAPTER_DIR}/{WEIGHT_NAME}); finish its training first",
                        run.dir)
    return adapter


def train(cfg: KandinskyConfig, run_id: str | None = None, tag: str | None = None,
          on_run: Callable[[Run], None] | None = None) -> Run:
    """Train a new run end to end; returns the run (adapter in RUN/final).

    `on_run(run)` is called once the run directory exists and before the first step (the sweep records the
    directory there, so a kill during training leaves a record that points at the run to continue)."""
    from harness.trainer import start_run

    cfg.validate()
    # Check the paired adapter before an hour of training, not at generation time.
    other: Component = "decoder" if cfg.component == "prior" else "prior"
    resolve_adapter(cfg.decoder_adapter if other == "decoder" else cfg.prior_adapter, other)
    logs: list[str] = [f"warning: {w}" for w in cfg.warnings()]
    task, hashes = build_task(cfg, log=logs.append)
    cfg.loop = _with_eval_interval(cfg.loop, cfg, task.epoch_items())  # recorded: val_every and the metric
    config = to_dict(cfg)
    config["summary"] = cfg.summary()
    config["sources"] = task.source_info
    run = start_run(lambda: create_run(FAMILIES[cfg.component], config, hashes,
                                       tag=tag if tag is not None else f"r{cfg.lora.rank}", run_id=run_id), logs, on_run)
    _train(task, cfg, run)
    return run


def _train(task: KandinskyTask, cfg: KandinskyConfig, run: Run, resume: bool = False) -> None:
    from harness.distributed import state as dist_state

    run_training(task, cfg.loop, run, resume=resume)
    if cfg.eval_every_epochs is not None and dist_state().is_main_process:
        export_best(run)


def export_best(run: Run) -> dict[str, Any] | None:
    """Put the best adapter (run/best, kept by the loop's select_best) into run/final - what generation, the sweep
    and a plain diffusers load read - and the last one into run/last. final/selection.json and adapter_meta.json
    say which metric chose it, its value, its step and its epoch."""
    import os
    import shutil

    from harness.io import read_json, write_json

    stats = read_json(run.dir / "train_stats.json")
    sel = stats.get("select_best") or {}
    best = run.dir / "best"
    if sel.get("step") is None or not (best / WEIGHT_NAME).is_file():
        return None
    per_epoch = stats["loop"]["derived"]["steps_per_epoch"]
    selection = {"metric": sel["metric"], "value": sel["value"], "step": sel["step"],
                 "epoch": round(sel["step"] / per_epoch, 3), "last_step": stats["steps"],
                 "last_epoch": round(stats["steps"] / per_epoch, 3), "last_weights": "last/"}
    tmp = run.dir / f".final-best.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best, tmp)
    meta = read_json(tmp / "adapter_meta.json")
    meta["selected"] = selection
    write_json(tmp / "adapter_meta.json", meta)
    write_json(tmp / "selection.json", selection)
    last = run.dir / "last"
    shutil.rmtree(last, ignore_errors=True)
    os.replace(run.dir / ADAPTER_DIR, last)
    os.replace(tmp, run.dir / ADAPTER_DIR)
    stats["exported"] = selection
    write_json(run.dir / "train_stats.json", stats)
    run.log(f"final/ = best adapter by {selection['metric']} ({selection['value']:.5g}) from step {selection['step']} "
            f"(epoch {selection['epoch']}); the last weights are in last/")
    return selection


def resume(run: Run, max_steps: int | None = None) -> Run:
    """Continue `run` exactly from its last checkpoint (optionally to a new max_steps)."""
    from harness.trainer import resume_run

    return resume_run(run, config_from_run, build_task, max_steps, train=_train)


def continue_run(run: Run) -> Run:
    """Finish `run` in its own directory: from its last checkpoint, or from step 0 (what a sweep rerun does)."""
    from harness.trainer import continue_in_place

    return continue_in_place(run, config_from_run, build_task, train=_train)


# ---------------------------------------------------------------------------------------------------------------
# Generation.


class KandinskyGenerator(Generator):
    """Prior (with its adapter) -> image embeddings -> decoder (with its adapter) -> images; see sampling.py.

    Text encodings are cached per unique prompt; every random draw of image k comes from its own generator seeded
    with seeds[k], so the image does not depend on batch composition.
    """

    def __init__(self, prior_parts, decoder_parts, gen: GenerationConfig, height: int, width: int,
                 device: str | torch.device, info: dict[str, Any]):
        from models.kandinsky import encoders as E

        self.p, self.d, self.gen = prior_parts, decoder_parts, gen
        self.height, self.width, self.device = height, width, torch.device(device)
        self._info = info
        self._text: dict[str, dict[str, torch.Tensor]] = {}
        self._negative = E.encode_text(self.p.tokenizer, self.p.text_encoder, [""])
        self._zero = E.zero_image_embed(self.p.image_encoder)

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        from models.kandinsky import encoders as E

        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if new:
            out = E.encode_text(self.p.tokenizer, self.p.text_encoder, new)
            for j, p in enumerate(new):
                self._text[p] = {k: v[j : j + 1] for k, v in out.items()}
        return {k: torch.cat([self._text[p][k] for p in prompts]) for k in ("text_embeds", "text_hidden", "text_mask")}

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        from models.kandinsky.sampling import decode_images, sample_image_embeds

        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        text = self._encode(prompts)
        embeds = sample_image_embeds(self.p.prior, self.p.scheduler, text, self._negative, gens,
                                     steps=self.gen.prior_steps, guidance=self.gen.prior_guidance)
        return decode_images(self.d.unet, self.d.movq, self.d.scheduler, embeds, self._zero, gens,
                             steps=self.gen.decoder_steps, guidance=self.gen.decoder_guidance,
                             height=self.height, width=self.width)

    def info(self) -> dict[str, Any]:
        return self._info


def _adapter_info(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    return {"path": str(path.resolve()), "tensors_sha256": adapter_content_hash(path),
            "rank": read_adapter_meta(path).get("lora", {}).get("rank")}


def load_generator(run: Run, overrides: dict[str, Any]) -> Generator:
    """`harness generate` on a kandinsky-prior or kandinsky-decoder run: both bases, both adapters."""
    from models.kandinsky.loading import load_decoder, load_prior

    cfg = config_from_run(run)
    gen = dataclasses.replace(cfg.generation)
    if overrides.get("steps") is not None:
        gen.decoder_steps = int(overrides["steps"])
    if overrides.get("guidance") is not None:
        gen.decoder_guidance = float(overrides["guidance"])
    for key in ("prior_steps", "prior_guidance", "decoder_steps", "decoder_guidance", "height", "width", "dtype"):
        if overrides.get(key) is not None:
            setattr(gen, key, overrides[key])
    gen.validate()
    device = torch.device(overrides.get("device") or "cpu")
    own = run.dir / ADAPTER_DIR
    if not (own / WEIGHT_NAME).is_file():
        raise UserError(f"run has no finished adapter ({ADAPTER_DIR}/{WEIGHT_NAME}); train it to the end "
                        "(or --resume it) first", run.dir)
    prior_adapter = own if cfg.component == "prior" else resolve_adapter(cfg.prior_adapter, "prior")
    decoder_adapter = own if cfg.component == "decoder" else resolve_adapter(cfg.decoder_adapter, "decoder")
    try:
        prior_parts = load_prior(cfg.prior, cfg.prior_revision, gen.dtype, device)
        decoder_parts = load_decoder(cfg.decoder, cfg.decoder_revision, gen.dtype, device)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UserError(str(e)) from None
    if prior_adapter:
        load_adapter(prior_parts.prior, prior_adapter)
    if decoder_adapter:
        load_adapter(decoder_parts.unet, decoder_adapter)
    height = gen.height or cfg.data.resolution
    width = gen.width or cfg.data.resolution
    info = {
        "family": FAMILIES[cfg.component],
        "prior": prior_parts.source.to_dict() | {"folder": None},
        "decoder": decoder_parts.source.to_dict() | {"folder": None},
        "prior_adapter": _adapter_info(prior_adapter),
        "decoder_adapter": _adapter_info(decoder_adapter),
        "sampling": dataclasses.asdict(gen) | {"height": height, "width": width},
    }
    return KandinskyGenerator(prior_parts, decoder_parts, gen, height, width, device, info)
