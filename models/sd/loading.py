"""Load a Stable Diffusion pipeline's parts (hub id or local folder) for training and generation.

Components are loaded one by one (no safety checker, no feature extractor: neither is part of training, and
`harness generate` writes every image for scoring). The hub id is resolved to its snapshot commit, recorded with the
run, and the folder is fingerprinted for the frozen-encoder cache (same helpers as the Kandinsky family).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.hub import Source, fingerprint, resolve_source, to_dtype

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass
class SDParts:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any  # DDPMScheduler with the pipeline's training config (prediction type included)
    scheduler_config: dict
    source: Source
    dtype: torch.dtype
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def load_sd(source: str | Path = DEFAULT_BASE, revision: str | None = None, dtype: str | torch.dtype = "fp32",
            device: str | torch.device = "cpu") -> SDParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src = resolve_source(source, revision)
    dt = to_dtype(dtype)
    f = src.folder
    missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (f / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{f}: not a Stable Diffusion pipeline folder (no {', '.join(missing)}/)")
    sched = DDPMScheduler.from_pretrained(f, subfolder="scheduler")
    parts = SDParts(
        tokenizer=CLIPTokenizer.from_pretrained(f, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(f, subfolder="text_encoder", dtype=dt),
        vae=AutoencoderKL.from_pretrained(f, subfolder="vae", torch_dtype=dt),
        unet=UNet2DConditionModel.from_pretrained(f, subfolder="unet", torch_dtype=dt),
        noise_scheduler=sched, scheduler_config=dict(sched.config), source=src, dtype=dt,
        fingerprints={"text": fingerprint(f, ["text_encoder", "tokenizer"], src.commit) + f":{dt}",
                      "vae": fingerprint(f, ["vae"], src.commit) + f":{dt}"},
    )
    for m in (parts.text_encoder, parts.vae, parts.unet):
        m.eval().requires_grad_(False).to(device)
    return parts


def encode_prompts(tokenizer, text_encoder, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """Prompt embeddings as SD's pipelines compute them. `clip_skip` counts as kohya / A1111 do: 1 = the last
    layer's output (the default), 2 = the penultimate layer's output passed through the final layer norm (what
    diffusers' pipelines call clip_skip=1)."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    if clip_skip <= 1:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    base = getattr(text_encoder, "module", text_encoder)  # DDP-wrapped while the text encoder trains
    # transformers 5 flattened CLIPTextModel (no .text_model); 4.x nests it. diffusers 0.42's own clip_skip path
    # reads .text_model and fails on transformers 5, so generation passes these embeddings to the pipeline.
    inner = getattr(base, "text_model", base)
    return inner.final_layer_norm(hidden)


def diffusers_clip_skip(clip_skip: int) -> int | None:
    """kohya/A1111 clip skip -> the `clip_skip` argument of diffusers' pipelines (layers skipped after the last)."""
    return None if clip_skip <= 1 else clip_skip - 1
