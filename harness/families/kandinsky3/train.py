"""Kandinsky 3.0 LoRA training on the shared loop.

Objective: epsilon MSE on the MoVQ latents (unscaled, pre-quantisation) of the 256 px padded images, with the
pipeline's DDPM scheduler, conditioned on the FLAN-UL2 (T5) encoder's masked embeddings cut to the batch's longest
caption + 1 (what Kandinsky3Pipeline feeds the U-Net). Captions are dropped to "" with probability
`data.caption_dropout` (default 0.1, as this project's Kandinsky 2.2 prior; diffusers' trainers' equivalent
--proportion_empty_prompts defaults to 0) so the unconditional branch that
classifier-free guidance uses is trained; generation uses the same "" as its negative prompt. Min-SNR optional
(min(snr, gamma) / snr for epsilon).

Text-encoder cache: every caption the data can produce (captions, paraphrases, "") is encoded once with the T5
encoder into harness/encoder_cache.py (fp16 embeddings + masks by content hash), then the encoder is dropped: during
training only the U-Net (+ LoRA) is resident. MoVQ latents are cached too (no augmentation; --jitter/--hflip need
--no-cache, and then the MoVQ encodes the augmented pixels each step while the texts still come from the cache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import from_dict, to_dict
from harness.dataset import CaptionedImages, DatasetConfig, item_rng, to_model_pixels
from harness.encoder_cache import CachedItemsBase
from harness.errors import UserError
from harness.io import sha256_file
from harness.runs import Run, create_run
from harness.trainer import LoopConfig, TrainTask, run_training, unwrap
from models.kandinsky.lora import LoraSpec, lora_parameters
from models.kandinsky3.loading import DEFAULT_BASE

KIND = "kandinsky3"
ADAPTER_DIR = "final"


@dataclass
class GenerationConfig:
    steps: int = 25  # Kandinsky3Pipeline's num_inference_steps default
    guidance: float = 3.0  # Kandinsky3Pipeline's guidance_scale default
    negative_prompt: str = ""  # the caption dropout target (diffusers' default None = zero embeddings, untrained)
    height: int | None = None  # None = the training resolution
    width: int | None = None
    dtype: str = "fp32"

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError("generation steps must be >= 1")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise UserError(f"generation dtype must be fp32, bf16 or fp16, got {self.dtype!r}")


@dataclass
class Kandinsky3Config:
    data_dir: str = ""
    split_path: str = ""
    base: str = DEFAULT_BASE  # hub id or local pipeline folder
    revision: str | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DatasetConfig = field(default_factory=lambda: DatasetConfig(caption_dropout=0.1))
    loop: LoopConfig = field(default_factory=LoopConfig)
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None
    cache: bool = True  # MoVQ latents from the cache (texts always are)
    cache_dir: str | None = None
    cache_batch_size: int = 16
    base_dtype: str = "fp32"
    paraphrases_path: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def validate(self) -> None:
        from models.kandinsky3.lora import TARGETS

        if self.lora.targets not in TARGETS:
            raise UserError(f"LoRA targets {self.lora.targets!r} do not exist on Kandinsky3UNet; choose "
                            f"{', '.join(TARGETS)}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"snr_gamma must be > 0, got {self.snr_gamma}")
        if self.base_dtype not in ("fp32", "bf16", "fp16"):
            raise UserError(f"base_dtype must be fp32, bf16 or fp16, got {self.base_dtype!r}")
        if self.base_dtype != "fp32" and self.loop.mixed_precision != self.base_dtype:
            raise UserError(f"--base-dtype {self.base_dtype} needs --mixed-precision {self.base_dtype}")
        if self.cache and (self.data.jitter > 0 or self.data.hflip):
            raise UserError("the latent cache holds un-augmented images: with --jitter/--hflip use --no-cache")
        if self.cache_batch_size < 1:
            raise UserError(f"cache_batch_size must be >= 1, got {self.cache_batch_size}")
        self.generation.validate()

    def summary(self) -> dict[str, Any]:
        return {"rank": self.lora.rank, "alpha": self.lora.lora_alpha, "targets": self.lora.targets,
                "dora": self.lora.dora, "rslora": self.lora.rslora, "steps": self.loop.max_steps,
                "caption_dropout": self.data.caption_dropout, "paraphrase_strategy": self.data.paraphrase_strategy}


def config_from_dict(d: dict[str, Any], where: str = "Kandinsky3Config") -> Kandinsky3Config:
    try:
        cfg = from_dict(Kandinsky3Config, d, where)
    except ValueError as e:  # LoraSpec's own checks
        raise UserError(str(e), where) from None
    cfg.validate()
    return cfg


RUN_ONLY_KEYS = ("family", "run_id", "created", "harness_version", "summary", "sources")


def config_from_run(run: Run) -> Kandinsky3Config:
    d = {k: v for k, v in run.config().items() if k not in RUN_ONLY_KEYS}
    return config_from_dict(d, str(run.config_path))


def epsilon_loss(unet: nn.Module, scheduler, latents: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator, snr_gamma: float | None = None) -> torch.Tensor:
    x0 = latents.float()
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    p = next(unwrap(unet).parameters())
    out = unet(xt.to(p.dtype), t, encoder_hidden_states=embeds.to(p.dtype), encoder_attention_mask=mask.bool(),
               return_dict=False)[0]
    per = F.mse_loss(out.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        ac = scheduler.alphas_cumprod.to(t.device)[t]
        snr = ac / (1 - ac)
        per = per * snr.clamp(max=snr_gamma) / snr
    return per.mean()


class TextCachedItems(CachedItemsBase):
    """The items of `base` (same caption draws) with the caption's cached T5 encoding and, when `latent_keys`, the
    cached MoVQ latents instead of pixels."""

    def __init__(self, base: CaptionedImages, store, text_keys: dict[str, str], latent_keys: dict[str, str] | None):
        super().__init__(base, store)
        self.text_keys, self.latent_keys = text_keys, latent_keys

    def __getitem__(self, index: int) -> dict:
        if self.latent_keys is None:
            item = self.base[index]  # pixels (augmented) + caption
        else:
            i, caption = self.base.caption_for(index, item_rng(self.base.cfg.seed, self.base.epoch, index))
            image_id = self.base.image_ids[i]
            item = {"image_id": image_id, "caption": caption, **self._load(self.latent_keys[image_id])}
        item.update(self._load(self.text_keys[item["caption"]]))
        return item


def collate(items: list[dict]) -> dict:
    from models.kandinsky3.loading import cut_context

    out: dict[str, Any] = {"image_id": [it["image_id"] for it in items], "caption": [it["caption"] for it in items]}
    for k in ("latents", "pixels", "text_embeds", "text_mask"):
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in items])
    out["text_embeds"], out["text_mask"] = cut_context(out["text_embeds"], out["text_mask"])
    return out


class Kandinsky3Task(TrainTask):
    """LoRA on the U-Net; the T5 encoder is never held (texts come from the cache), the MoVQ only with --no-cache."""

    def __init__(self, cfg: Kandinsky3Config, train_ds, val_ds, parts, source_info: dict | None = None):
        from diffusers import DDPMScheduler

        from models.kandinsky3.lora import add_lora

        self.cfg, self._train, self._val = cfg, train_ds, val_ds
        self.source_info = source_info or {}
        self.unet = parts.unet
        self.movq = None if cfg.cache else parts.movq
        self.noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)
        with torch.random.fork_rng(devices=[]):  # LoRA A init depends on the run's seed only
            torch.manual_seed(cfg.loop.seed)
            add_lora(self.unet, cfg.lora)
        if cfg.gradient_checkpointing:
            from models.kandinsky3.loading import enable_gradient_checkpointing

            enable_gradient_checkpointing(self.unet)
        self._lora = lora_parameters(self.unet)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._lora

    def modules(self) -> dict[str, nn.Module]:
        return {n: m for n, m in (("unet", self.unet), ("movq", self.movq)) if m is not None}

    def train_dataset(self):
        return self._train

    def val_dataset(self):
        return self._val

    def collate(self, items: list[dict]) -> dict:
        return collate(items)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if "latents" in batch:
            latents = batch["latents"]
        else:
            from models.kandinsky3.loading import movq_latents

            latents = movq_latents(unwrap(self.movq), to_model_pixels(batch["pixels"]))
        dev = next(unwrap(self.unet).parameters()).device
        return epsilon_loss(self.unet, self.noise_scheduler, latents.to(dev), batch["text_embeds"].to(dev),
                            batch["text_mask"].to(dev), generator, self.cfg.snr_gamma)

    def export(self, out_dir: Path) -> None:
        from models.kandinsky3.lora import write_adapter

        meta = {"family": KIND, "lora": self.cfg.lora.to_dict(), "base": self.source_info,
                "load": "see models/kandinsky3/lora.py (peft inject_adapter_in_model + set_peft_model_state_dict)"}
        write_adapter(unwrap(self.unet), self.cfg.lora, out_dir, meta)


def _load_parts(cfg: Kandinsky3Config, text_encoder: bool):
    from models.kandinsky3.loading import load_parts

    try:
        return load_parts(cfg.base, cfg.revision, cfg.base_dtype, text_encoder=text_encoder)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UserError(str(e)) from None


def fill_text_cache(store, parts_loader: Callable[[], Any], text_fp: str, texts: list[str], batch_size: int,
                    device, label: str = "cache text") -> tuple[dict[str, str], dict[str, int]]:
    """Encode every text of `texts` not yet in `store` (fp16 embeddings + mask); the encoder is loaded only when
    some text is missing and released afterwards. Returns (text -> key, hit/miss counts)."""
    from harness.encoder_cache import text_key
    from harness.progress import progress
    from models.kandinsky3.loading import encode_text

    keys = {c: text_key(text_fp, c) for c in texts}
    missing = [c for c in texts if not store.has(keys[c])]
    if missing:
        parts = parts_loader()
        enc = parts.text_encoder.to(device)
        with progress() as bar:
            t = bar.add_task(label, total=len(missing))

            def encode(idx: list[int]) -> list[dict]:
                out = encode_text(parts.tokenizer, enc, [missing[i] for i in idx], device=device)
                return [{"text_embeds": out["text_embeds"][j].half(), "text_mask": out["text_mask"][j]}
                        for j in range(len(idx))]

            store.fill([keys[c] for c in missing], encode, batch_size, lambda n: bar.advance(t, n),
                       meta=lambda i: {"kind": "t5-text", "caption": missing[i]})
        parts.text_encoder = None
        del enc, parts
    store.stats.hits += len(texts) - len(missing)
    return keys, {"hits": len(texts) - len(missing), "misses": len(missing)}


def build_task(cfg: Kandinsky3Config, log: Callable[[str], None] = lambda s: None) -> tuple[Kandinsky3Task, dict]:
    from harness.dataset import load_training_data
    from harness.distributed import state as dist_state
    from harness.encoder_cache import TensorStore, default_cache_dir, image_key, needed_captions, unique
    from harness.paraphrase import training_paraphrases
    from models.kandinsky3.loading import movq_latents

    cfg.validate()
    paraphrases, para_sha = training_paraphrases(cfg.paraphrases_path, cfg.data.paraphrase_strategy)
    val_cfg = dataclasses.replace(cfg.data, caption_dropout=0.0, captions="sample")
    train_ds, hashes = load_training_data(cfg.data_dir, cfg.split_path, "train", cfg.data, paraphrases)
    try:
        val_ds, vh = load_training_data(cfg.data_dir, cfg.split_path, "val", val_cfg, paraphrases)
    except UserError as e:
        if "no images on this side" not in str(e):
            raise
        val_ds, vh = None, {"n_images": 0}
    hashes = dict(hashes, val_n_images=vh["n_images"], paraphrases_sha256=para_sha)
    parts = _load_parts(cfg, text_encoder=False)  # the 17 GB encoder is loaded only to fill cache misses
    store = TensorStore(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    device = dist_state().device
    datasets = [d for d in (train_ds, val_ds) if d is not None]
    texts = unique(c for d in datasets for c in needed_captions(d))
    with dist_state().main_process_first():
        text_keys, text_stats = fill_text_cache(store, lambda: _load_parts(cfg, text_encoder=True),
                                                parts.fingerprints["text"], texts, cfg.cache_batch_size, device)
        latent_keys = None
        img_stats = None
        if cfg.cache:
            pre = {"resolution": cfg.data.resolution, "fit": cfg.data.fit, "decode": "draft"}
            where = {img: (d, i) for d in reversed(datasets) for i, img in enumerate(d.image_ids)}
            ids = unique(i for d in datasets for i in d.image_ids)
            latent_keys = {i: image_key("movq", parts.fingerprints["movq"], pre,
                                        sha256_file(train_ds.devset.image_path(i))) for i in ids}
            missing = [i for i in ids if not store.has(latent_keys[i])]
            movq = parts.movq.to(device)
            for s in range(0, len(missing), cfg.cache_batch_size):
                chunk = missing[s : s + cfg.cache_batch_size]
                px = to_model_pixels(torch.stack([where[i][0].clean_pixels(where[i][1]) for i in chunk]), device)
                lat = movq_latents(movq, px)
                for j, i in enumerate(chunk):
                    store.put(latent_keys[i], {"latents": lat[j]}, {"kind": "movq", "image": i})
            parts.movq.to("cpu")
            img_stats = {"hits": len(ids) - len(missing), "misses": len(missing)}
    hashes["encoder_cache"] = {"dir": str(store.root), "text": text_stats, "latents": img_stats,
                               "n_captions": len(texts)}
    log(f"encoder cache {store.root}: {len(texts)} texts ({text_stats['misses']} new)")
    train = TextCachedItems(train_ds, store, text_keys, latent_keys)
    val = TextCachedItems(val_ds, store, text_keys, latent_keys) if val_ds is not None else None
    return Kandinsky3Task(cfg, train, val, parts, {"base": parts.source.to_dict()}), hashes


def resolved_config(cfg: Kandinsky3Config) -> dict[str, Any]:
    """--print-config: the config, LoRA parameter count and memory estimate on the real architecture."""
    from models.kandinsky3.memory import estimate

    d = to_dict(cfg)
    d["estimate"] = estimate(cfg.lora, cfg.loop.batch_size, cfg.data.resolution, cfg.loop.mixed_precision,
                             cfg.base_dtype, cfg.gradient_checkpointing)
    return d


def train(cfg: Kandinsky3Config, run_id: str | None = None, tag: str | None = None,
          on_run: Callable[[Run], None] | None = None) -> Run:
    from harness.trainer import start_run

    cfg.validate()
    logs: list[str] = [f"warning: {w}" for w in cfg.lora.warnings()]
    task, hashes = build_task(cfg, log=logs.append)
    config = to_dict(cfg)
    config["summary"] = cfg.summary()
    config["sources"] = task.source_info
    run = start_run(lambda: create_run(KIND, config, hashes, tag=tag if tag is not None else f"r{cfg.lora.rank}",
                                       run_id=run_id), logs, on_run)
    run_training(task, cfg.loop, run)
    return run


def resume(run: Run, max_steps: int | None = None) -> Run:
    """Continue `run` exactly from its last checkpoint (optionally to a new max_steps)."""
    from harness.trainer import resume_run

    return resume_run(run, config_from_run, build_task, max_steps)


def continue_run(run: Run) -> Run:
    """Finish `run` in its own directory: from its last checkpoint, or from step 0 (what a sweep rerun does)."""
    from harness.trainer import continue_in_place

    return continue_in_place(run, config_from_run, build_task)
