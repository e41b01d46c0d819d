"""Load the Kandinsky 2.2 prior and decoder parts from a hub id or a local pipeline folder.

    prior = load_prior("kandinsky-community/kandinsky-2-2-prior", revision=None, dtype="fp16", device="cuda")
    decoder = load_decoder("/data/models/kandinsky-2-2-decoder")          # a folder written by save_pretrained

A hub id is first resolved to its snapshot folder (the HF cache; offline when HF_HUB_OFFLINE=1), so the exact commit
is known and recorded with every run; a local folder is fingerprinted from its configs and weight-file sizes and
times. The fingerprint keys the frozen-encoder cache: a different model or revision never reuses stale encodings.
Tests build tiny components (models/kandinsky/testing.py), save them with save_pretrained and come back through
these same functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.hub import Source, dtype_kwargs, fingerprint, resolve_source, to_dtype

DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"

@dataclass
class PriorParts:
    prior: Any  # PriorTransformer
    text_encoder: Any  # CLIPTextModelWithProjection
    tokenizer: Any  # CLIPTokenizer
    image_encoder: Any  # CLIPVisionModelWithProjection
    image_processor: Any  # CLIPImageProcessor
    scheduler: Any  # UnCLIPScheduler (sampling)
    source: Source
    dtype: torch.dtype = torch.float32
    fingerprints: dict[str, str] = field(default_factory=dict)  # text / image encoder identities

    def to(self, device: str | torch.device) -> "PriorParts":
        for m in (self.prior, self.text_encoder, self.image_encoder):
            m.to(device)
        return self


@dataclass
class DecoderParts:
    unet: Any  # UNet2DConditionModel
    movq: Any  # VQModel
    scheduler: Any  # DDPMScheduler (training noise and sampling)
    source: Source
    dtype: torch.dtype = torch.float32
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def movq_scale_factor(self) -> int:
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    def to(self, device: str | torch.device) -> "DecoderParts":
        self.unet.to(device)
        self.movq.to(device)
        return self


def load_prior(source: str | Path = DEFAULT_PRIOR, revision: str | None = None, dtype: str | torch.dtype = "fp32",
               device: str | torch.device = "cpu") -> PriorParts:
    """The prior pipeline's parts (prior, CLIP text and image towers, tokenizer, image processor, UnCLIP scheduler)."""
    from diffusers import KandinskyV22PriorPipeline

    src = resolve_source(source, revision)
    dt = to_dtype(dtype)
    pipe = KandinskyV22PriorPipeline.from_pretrained(src.folder, **dtype_kwargs(dt))
    parts = PriorParts(
        prior=pipe.prior, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, image_encoder=pipe.image_encoder,
        image_processor=pipe.image_processor, scheduler=pipe.scheduler, source=src, dtype=dt,
        fingerprints={
            "text": fingerprint(src.folder, ["text_encoder", "tokenizer"], src.commit) + f":{dt}",
            "image": fingerprint(src.folder, ["image_encoder", "image_processor"], src.commit) + f":{dt}",
        },
    )
    for m in (parts.prior, parts.text_encoder, parts.image_encoder):
        m.eval().requires_grad_(False)
    return parts.to(device)


def load_decoder(source: str | Path = DEFAULT_DECODER, revision: str | None = None, dtype: str | torch.dtype = "fp32",
                 device: str | torch.device = "cpu") -> DecoderParts:
    """The decoder pipeline's parts (UNet, MoVQ, scheduler)."""
    from diffusers import KandinskyV22Pipeline

    src = resolve_source(source, revision)
    dt = to_dtype(dtype)
    pipe = KandinskyV22Pipeline.from_pretrained(src.folder, **dtype_kwargs(dt))
    parts = DecoderParts(unet=pipe.unet, movq=pipe.movq, scheduler=pipe.scheduler, source=src, dtype=dt,
                         fingerprints={"movq": fingerprint(src.folder, ["movq"], src.commit) + f":{dt}"})
    for m in (parts.unet, parts.movq):
        m.eval().requires_grad_(False)
    return parts.to(device)


def scheduler_config(scheduler) -> dict[str, Any]:
    return json.loads(json.dumps(dict(scheduler.config), default=str))


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute activations in the backward pass instead of storing them (the memory of a large batch).

    The UNet has diffusers' own switch (`enable_gradient_checkpointing`, as diffusers' Kandinsky decoder trainer
    uses). `PriorTransformer` has none, so each of its transformer blocks is wrapped here: the block's `forward` runs
    under non-reentrant `torch.utils.checkpoint` while the model trains with gradients on. Parameter names do not
    change, so checkpoints and exported adapters are the same; the gradients are the same up to float rounding.
    """
    if getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing()
        return model
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no gradient-checkpointing support")
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_harness_checkpointed", False):
            continue
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            if model.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward
        block._harness_checkpointed = True
    return model
