"""Stable Diffusion fine-tuning on the shared loop (`harness.trainer.run_training`).

Objective (diffusers' train_text_to_image.py / kohya's sd-scripts): latents = VAE posterior sample x scaling
factor; noise ~ N(0, 1), optionally with an "original" offset or multires/pyramid noise (models/sd/noise.py);
t ~ U{0..T-1}; the U-Net predicts the noise (epsilon) or v (prediction type read from the base's scheduler config,
so SD 2.x v-models work); MSE, optionally Min-SNR-gamma weighted. Prompt embeddings use kohya's clip skip.

When the VAE trains (`--method full --components ...vae`) it is trained as an autoencoder on its own objective
(pixel MSE of the reconstruction + KL x 1e-6, the LDM autoencoder loss without its perceptual/GAN terms) added to
the denoising loss; the U-Net sees its latents detached. REFERENCE.md does not state the VAE objective of
Pixels Under Pressure; this is the choice that trains the VAE as a VAE.

Frozen-part caching (harness/encoder_cache.py): prompt embeddings are cached when the text encoder does not train
(keyed by text-encoder fingerprint, clip skip and caption), the VAE posterior (mean, std) when the VAE does not train
and the data has no augmentation (keyed by VAE fingerprint, resolution, fit and image sha256). The latent is sampled
from the cached posterior with the step generator, exactly as the uncached path samples it, so both paths give the
same losses (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import to_dict
from harness.dataset import CaptionedImages, item_rng, to_model_pixels
from harness.encoder_cache import CachedItemsBase
from harness.errors import UserError
from harness.families.sd.config import FAMILY, SDConfig, config_from_dict
from harness.runs import Run, create_run
from harness.trainer import LoopConfig, TrainTask, run_training, unwrap
from models.sd import methods as M
from models.sd.adapters import KOHYA_NAME, save_kohya, save_lora
from models.sd import noise as N
from models.sd.loading import SDParts, encode_prompts, load_sd

RUN_ONLY_KEYS = ("family", "run_id", "created", "harness_version", "summary", "sources")


class CachedSDItems(CachedItemsBase):
    """Items of `base` with cached prompt embeddings and/or VAE posteriors in place of what they replace; the
    caption draw is the one CaptionedImages makes for the same (seed, epoch, index)."""

    def __init__(self, base: CaptionedImages, store, text_keys: dict[str, str] | None,
                 latent_keys: dict[str, str] | None):
        super().__init__(base, store)
        self.text_keys, self.latent_keys = text_keys, latent_keys

    def __getitem__(self, index: int) -> dict:
        if self.latent_keys is None:
            item = self.base[index]  # pixels needed (VAE trains or augmentation)
        else:
            i, caption = self.base.caption_for(index, item_rng(self.base.cfg.seed, self.base.epoch, index))
            image_id = self.base.image_ids[i]
            item = {"caption": caption, "image_id": image_id, **self._load(self.latent_keys[image_id])}
        if self.text_keys is not None:
            item.update(self._load(self.text_keys[item["caption"]]))
        return item


def collate(items: list[dict]) -> dict:
    out: dict[str, Any] = {"caption": [it["caption"] for it in items], "image_id": [it["image_id"] for it in items]}
    for k, v in items[0].items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.stack([it[k] for it in items])
    return out


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=torch.float32)


class SDTask(TrainTask):
    """One SD fine-tuning method (see models/sd/methods.py) on the chosen components."""

    def __init__(self, cfg: SDConfig, parts: SDParts, train_ds, val_ds, source_info: dict, data_hashes: dict):
        self.cfg, self.parts = cfg, parts
        self._train, self._val = train_ds, val_ds
        self.source_info, self.data_hashes = source_info, data_hashes
        self.unet, self.text_encoder, self.vae = parts.unet, parts.text_encoder, parts.vae
        self.tokenizer = parts.tokenizer
        self.noise_scheduler = parts.noise_scheduler
        self.prediction_type = parts.prediction_type
        self.scaling_factor = float(parts.vae.config.scaling_factor)
        with torch.random.fork_rng(devices=[]):  # LoRA init depends on the run's seed only
            torch.manual_seed(cfg.loop.seed)
            self.trained = M.apply_method({"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae},
                                          cfg.method, cfg.components, rank=cfg.rank, alpha=cfg.alpha,
                                          unet_targets=cfg.lora_targets,
                                          text_encoder_targets=cfg.text_encoder_lora_targets)
        for comp in self.trained:  # trained weights stay fp32 (frozen ones may be half)
            if cfg.method == "full":
                getattr(self, comp).float()
            else:
                for p in self.trained[comp]:
                    p.data = p.data.float()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if "text_encoder" in self.trained:
                self.text_encoder.gradient_checkpointing_enable()
        self._params = [p for ps in self.trained.values() for p in ps]
        self.ema = None
        if cfg.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._params, decay=cfg.ema_decay)

    # -- TrainTask API --------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._params

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}

    def make_optimizer(self, params: list[nn.Parameter], cfg: LoopConfig) -> torch.optim.Optimizer:
        from harness.families.sd.optim import make_optimizer

        groups = []
        for comp, ps in self.trained.items():
            lr = self.cfg.text_encoder_lr if comp == "text_encoder" and self.cfg.text_encoder_lr else cfg.lr
            groups.append({"params": ps, "lr": lr})
        return make_optimizer(self.cfg.optimizer, groups, cfg.lr, cfg.weight_decay)

    def train_dataset(self):
        return self._train

    def val_dataset(self):
        return self._val

    def collate(self, items: list[dict]) -> dict:
        return collate(items)

    def on_step_end(self, step: int) -> None:
        if self.ema is not None:
            self.ema.step(self._params)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    # -- objective ------------------------------------------------------------------------------------------------
    def _prompt_embeds(self, batch: dict) -> torch.Tensor:
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"]
        if "text_encoder" in self.trained:
            return encode_prompts(self.tokenizer, self.text_encoder, list(batch["caption"]), self.cfg.clip_skip)
        with torch.no_grad():
            return encode_prompts(self.tokenizer, self.text_encoder, list(batch["caption"]), self.cfg.clip_skip)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        vae_loss = None
        pixels = to_model_pixels(batch["pixels"]) if "pixels" in batch else None
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        else:
            base_vae = unwrap(self.vae)
            with torch.no_grad():
                dist = base_vae.encode(pixels.to(base_vae.dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        # Drawn first and always: the stream of draws is the same with and without the cache.
        latents = (mean + std * _randn(mean.shape, generator, mean)) * self.scaling_factor
        if "vae" in self.trained:
            vae_loss = self._vae_loss(pixels, generator)
        b = latents.shape[0]
        noise = _randn(latents.shape, generator, latents)
        if self.cfg.noise_offset > 0:
            noise = N.offset_noise(noise, self.cfg.noise_offset, generator)
        if self.cfg.multires_noise_iterations > 0:
            noise = N.pyramid_noise(noise, self.cfg.multires_noise_iterations, self.cfg.multires_noise_discount,
                                    generator)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
        t = t.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise UserError(f"base scheduler has prediction_type {self.prediction_type!r}; SD training supports "
                            "epsilon and v_prediction")
        emb = self._prompt_embeds(batch)
        dtype = unwrap(self.unet).dtype
        pred = self.unet(noisy.to(dtype), t, encoder_hidden_states=emb.to(dtype)).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.snr_gamma:
            per_sample = per_sample * N.min_snr_weights(N.snr(self.noise_scheduler.alphas_cumprod, t),
                                                        self.cfg.snr_gamma, self.prediction_type)
        loss = per_sample.mean()
        if "unet" not in self.trained and "text_encoder" not in self.trained:
            loss = loss.detach()  # only the VAE trains: the denoising loss is reported, not optimised
        return loss + vae_loss if vae_loss is not None else loss

    def _vae_loss(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Reconstruction MSE (through the VAE's forward, so DDP synchronises it) + KL to N(0, 1) per latent
        element x vae_kl_weight."""
        recon = self.vae(pixels, sample_posterior=True, generator=generator).sample
        dist = unwrap(self.vae).encode(pixels).latent_dist
        kl = dist.kl().mean() / dist.mean[0].numel()
        return F.mse_loss(recon.float(), pixels.float()) + self.cfg.vae_kl_weight * kl

    def sample_grid(self, step: int, path: Path) -> bool:
        """A strip of 4 images for the first 4 validation captions at seeds 0..3, sampled from the in-training
        modules with the run's generation settings (at most 20 steps)."""
        import numpy as np
        from PIL import Image
        from diffusers import StableDiffusionPipeline

        from harness.families.sd.generate import SDGenerator
        from harness.io import atomic_path

        val = self._val
        if val is None:
            return False
        base = val.base if isinstance(val, CachedSDItems) else val
        prompts = list(dict.fromkeys(c for pool in base.pools for c in pool))[:4]
        pipe = StableDiffusionPipeline(vae=unwrap(self.vae), text_encoder=unwrap(self.text_encoder),
                                       tokenizer=self.tokenizer, unet=unwrap(self.unet),
                                       scheduler=self.noise_scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        gen = dataclasses.replace(self.cfg.generation, steps=min(self.cfg.generation.steps, 20))
        device = next(unwrap(self.unet).parameters()).device
        h, w = gen.height or self.cfg.data.resolution, gen.width or self.cfg.data.resolution
        images = SDGenerator(pipe, gen, self.cfg.clip_skip, h, w, device, {}).generate(prompts,
                                                                                       list(range(len(prompts))))
        with atomic_path(path) as tmp:
            Image.fromarray(np.concatenate(images, axis=1)).save(tmp, format="PNG")
        return True

    # -- export ---------------------------------------------------------------------------------------------------
    def _write(self, out_dir: Path) -> list[str]:
        unet = unwrap(self.unet)
        te = unwrap(self.text_encoder) if "text_encoder" in self.trained else None
        files = []
        if self.cfg.adapter:
            files.append(save_lora(out_dir, unet, te).name)
            if self.cfg.export_kohya:
                files.append(save_kohya(out_dir / KOHYA_NAME, unet, te).name)
            return files
        fold = M.difffit_folded(unet) if self.cfg.method == "difffit" else contextlib.nullcontext()
        with fold:
            for comp in self.trained:
                unwrap(getattr(self, comp)).save_pretrained(out_dir / comp)
                files.append(comp)
        return files

    def export(self, out_dir: Path) -> None:
        """Write the result into `out_dir`; leaves the live modules as they were (the loop may export the best
        weights mid-training): EMA weights are swapped in and back, DiffFit scales folded on the way out only."""
        from harness.io import write_json

        if self.ema is not None:  # the exported weights are the EMA weights (diffusers' trainers)
            self.ema.store(self._params)
            self.ema.copy_to(self._params)
        try:
            files = self._write(out_dir)
        finally:
            if self.ema is not None:
                self.ema.restore(self._params)
        write_json(out_dir / "sd_meta.json", {
            "format": "harness-sd/1", "method": self.cfg.method, "components": list(self.trained),
            "files": files, "base": self.source_info, "ema": self.cfg.ema, "clip_skip": self.cfg.clip_skip,
            "training": to_dict(self.cfg), "seed": self.cfg.loop.seed, "data": self.data_hashes,
            "load_with": "pipe.load_lora_weights(DIR)" if self.cfg.adapter else
            "UNet2DConditionModel/CLIPTextModel/AutoencoderKL.from_pretrained(DIR / component)"})


# ---------------------------------------------------------------------------------------------------------------
# Building: models, data, cache.


def _load_parts(cfg: SDConfig) -> SDParts:
    try:
        return load_sd(cfg.base, cfg.revision, cfg.base_dtype if cfg.method != "full" else "fp32", "cpu")
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UserError(str(e)) from None


def check_vae_resolution(cfg: SDConfig, vae_config: dict | None = None) -> None:
    """--resolution against the VAE's downsampling factor: of `vae_config` (the loaded VAE's), else of the base's
    config when it can be read without loading (a local folder, or the default base's shipped config)."""
    from harness.dataset import check_resolution, downsampling_factor
    from models.sd.architecture import component_configs
    from models.sd.loading import DEFAULT_BASE

    if vae_config is None:
        folder = Path(cfg.base)
        if (folder / "model_index.json").is_file():
            vae_config = component_configs(folder)["vae"]
        elif cfg.base == DEFAULT_BASE:
            vae_config = component_configs()["vae"]
        else:
            return  # a hub id: checked once loaded
    check_resolution(cfg.data.resolution, downsampling_factor(vae_config["block_out_channels"]),
                     "the VAE's downsampling factor")


def build_task(cfg: SDConfig, log: Callable[[str], None] = lambda s: None) -> tuple[SDTask, dict]:
    from harness.dataset import load_training_data
    from harness.paraphrase import training_paraphrases

    cfg.validate()
    check_vae_resolution(cfg)
    paraphrases, para_sha = training_paraphrases(cfg.paraphrases_path, cfg.data.paraphrase_strategy)
    train_ds, hashes = load_training_data(cfg.data_dir, cfg.split_path, "train", dataclasses.replace(cfg.data),
                                          paraphrases)
    hashes["paraphrases_sha256"] = para_sha
    try:
        val_ds, vh = load_training_data(cfg.data_dir, cfg.split_path, "val",
                                        dataclasses.replace(cfg.data, caption_dropout=0.0), paraphrases)
    except UserError as e:
        if "no images on this side" not in str(e):
            raise
        val_ds, vh = None, {"n_images": 0}
    hashes = dict(hashes, val_n_images=vh["n_images"])
    parts = _load_parts(cfg)
    check_vae_resolution(cfg, dict(parts.vae.config))
    sources = {"base": parts.source.to_dict(), "prediction_type": parts.prediction_type}
    cache_text = cfg.cache and "text_encoder" not in cfg.components
    augmented = cfg.data.jitter > 0 or cfg.data.hflip or cfg.data.hflip_uncond
    cache_latents = cfg.cache and "vae" not in cfg.components and not augmented
    if cache_text or cache_latents:
        train_ds, val_ds, stats = _cached(cfg, parts, train_ds, val_ds, cache_text, cache_latents, log)
        hashes["encoder_cache"] = stats
    return SDTask(cfg, parts, train_ds, val_ds, sources, hashes), hashes


def _cached(cfg: SDConfig, parts: SDParts, train_ds, val_ds, cache_text: bool, cache_latents: bool, log):
    from harness.distributed import state as dist_state
    from harness.encoder_cache import TensorStore, default_cache_dir, image_key, text_key, unique
    from harness.io import sha256_file
    from harness.progress import progress

    store = TensorStore(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    device = dist_state().device
    bs = cfg.cache_batch_size
    datasets = [d for d in (train_ds, val_ds) if d is not None]
    text_keys = latent_keys = None
    stats: dict[str, Any] = {"dir": str(store.root)}
    with dist_state().main_process_first(), progress() as bar:
        if cache_text:
            from harness.encoder_cache import needed_captions

            caps = unique(c for d in datasets for c in needed_captions(d))  # pools, paraphrases and ""
            fp = parts.fingerprints["text"] + f":clip_skip={cfg.clip_skip}"
            text_keys = {c: text_key(fp, c) for c in caps}
            t = bar.add_task("cache prompts", total=len(caps))
            parts.text_encoder.to(device)

            def encode(idx: list[int]) -> list[dict]:
                with torch.no_grad():
                    e = encode_prompts(parts.tokenizer, parts.text_encoder, [caps[i] for i in idx], cfg.clip_skip)
                return [{"prompt_embeds": e[j].float()} for j in range(len(idx))]

            stats["text"] = store.fill([text_keys[c] for c in caps], encode, bs, lambda n: bar.advance(t, n)).to_dict()
            parts.text_encoder.to("cpu")
        if cache_latents:
            devset = train_ds.devset
            ids = unique(i for d in datasets for i in d.image_ids)
            pre = {"resolution": cfg.data.resolution, "fit": cfg.data.fit, "decode": "draft"}  # as Kandinsky
            latent_keys = {i: image_key("sd-vae-posterior", parts.fingerprints["vae"], pre,
                                        sha256_file(devset.image_path(i))) for i in ids}
            t = bar.add_task("cache latents", total=len(ids))
            parts.vae.to(device)

            where = {i: (d, pos) for d in reversed(datasets) for pos, i in enumerate(d.image_ids)}

            def encode_images(idx: list[int]) -> list[dict]:
                # decoded exactly as the dataset's items are (CaptionedImages.clean_pixels), minus augmentation
                px = torch.stack([where[ids[i]][0].clean_pixels(where[ids[i]][1]) for i in idx])
                px = to_model_pixels(px, device, parts.vae.dtype)
                with torch.no_grad():
                    dist = parts.vae.encode(px).latent_dist
                return [{"latent_mean": dist.mean[j].float(), "latent_std": dist.std[j].float()}
                        for j in range(len(idx))]

            stats["latents"] = store.fill([latent_keys[i] for i in ids], encode_images, bs,
                                          lambda n: bar.advance(t, n)).to_dict()
            parts.vae.to("cpu")
    log(f"encoder cache {store.root}: prompts {'cached' if cache_text else 'encoded every step'}, "
        f"latents {'cached' if cache_latents else 'encoded every step'}")
    wrap = lambda d: CachedSDItems(d, store, text_keys, latent_keys) if d is not None else None  # noqa: E731
    return wrap(train_ds), wrap(val_ds), stats


def resolved_config(cfg: SDConfig) -> dict[str, Any]:
    """`--print-config`: the config with the loop resolved against the training split (steps per epoch, total
    steps); reads prompt-gt.csv and SPLIT.json only (no weights, no images)."""
    from harness.dataset import load_training_data
    from harness.trainer import loop_description, resolve_loop

    cfg.validate()
    check_vae_resolution(cfg)
    out = to_dict(cfg)
    if not (cfg.data_dir and cfg.split_path):
        out["loop"] = dict(out["loop"], derived=None)
        out["note"] = "give --split and --data to derive the steps per epoch and the total steps"
        return out
    ds, _ = load_training_data(cfg.data_dir, cfg.split_path, "train", dataclasses.replace(cfg.data), None)
    loop, plan = resolve_loop(cfg.loop, len(ds))
    out["loop"] = loop_description(loop, plan)
    return out


def config_from_run(run: Run) -> SDConfig:
    d = {k: v for k, v in run.config().items() if k not in RUN_ONLY_KEYS}
    return config_from_dict(d, where=str(run.config_path))


def train(cfg: SDConfig, run_id: str | None = None, tag: str | None = None,
          on_run: Callable[[Run], None] | None = None) -> Run:
    """Train a new run end to end; returns the run (result in RUN/final).

    `on_run(run)` is called on the main process once the run directory exists and before the first step (the sweep
    records the directory there, so a kill during training leaves a record that points at the run to continue)."""
    from harness.trainer import start_run

    cfg.validate()
    logs: list[str] = []
    task, hashes = build_task(cfg, log=logs.append)
    config = to_dict(cfg)
    config["summary"] = cfg.summary()
    config["sources"] = task.source_info
    default_tag = cfg.preset or (f"{cfg.method}-r{cfg.rank}" if cfg.adapter else f"{cfg.method}-"
                                 + "+".join(cfg.components))
    run = start_run(lambda: create_run(FAMILY, config, hashes, tag=tag if tag is not None else default_tag,
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
