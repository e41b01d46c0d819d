"""Load Kandinsky 3.0 the way `Kandinsky3Pipeline` does, and reproduce its text encoding for a cache.

Components (subfolders of `kandinsky-community/kandinsky-3`): tokenizer (T5), text_encoder (`T5EncoderModel`, the
encoder of FLAN-UL2, 8.72 B parameters), unet (`Kandinsky3UNet`, 3.06 B), scheduler (DDPM), movq (`VQModel`).

Text encoding = `Kandinsky3Pipeline.encode_prompt`: tokens padded to max_length 128 (truncated), encoder last hidden
state multiplied by the attention mask. The pipeline then cuts the batch to (longest mask + 1) positions
(`process_embeds`, `_cut_context=True`); `cut_context` below does the same on a batch of cached full-length rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.hub import Source, dtype_kwargs, fingerprint, resolve_source, to_dtype

DEFAULT_BASE = "kandinsky-community/kandinsky-3"
MAX_LENGTH = 128  # Kandinsky3Pipeline.encode_prompt's max_length


@dataclass
class Kandinsky3Parts:
    tokenizer: Any
    text_encoder: nn.Module | None
    unet: nn.Module
    scheduler: Any
    movq: nn.Module
    source: Source
    fingerprints: dict[str, str] = field(default_factory=dict)


def load_parts(source: str | Path = DEFAULT_BASE, revision: str | None = None, dtype: str | torch.dtype = "fp32",
               text_encoder: bool = True) -> Kandinsky3Parts:
    """The pipeline's components from a hub id (resolved to its commit) or a save_pretrained folder, on the CPU.
    `text_encoder=False` leaves the 17 GB (fp16) encoder unloaded (when every text is already cached)."""
    from diffusers import DDPMScheduler, Kandinsky3UNet, VQModel
    from transformers import AutoTokenizer, T5EncoderModel

    src = resolve_source(source, revision)
    kw = dtype_kwargs(to_dtype(dtype))
    folder = src.folder
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    enc = T5EncoderModel.from_pretrained(folder / "text_encoder", dtype=to_dtype(dtype)) if text_encoder else None
    unet = Kandinsky3UNet.from_pretrained(folder / "unet", **kw)
    movq = VQModel.from_pretrained(folder / "movq", **kw)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    fps = {"text": fingerprint(folder, ["tokenizer", "text_encoder"], src.commit) + f":{dtype}",
           "movq": fingerprint(folder, ["movq"], src.commit) + f":{dtype}"}
    for m in (enc, unet, movq):
        if m is not None:
            m.requires_grad_(False).eval()
    return Kandinsky3Parts(tok, enc, unet, scheduler, movq, src, fps)


@torch.no_grad()
def encode_text(tokenizer, text_encoder: nn.Module, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
    """Full-length (MAX_LENGTH) masked T5 embeddings + attention masks, as Kandinsky3Pipeline.encode_prompt computes
    them before cutting the context."""
    device = device or next(text_encoder.parameters()).device
    t = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    ids, mask = t.input_ids.to(device), t.attention_mask.to(device)
    emb = text_encoder(ids, attention_mask=mask)[0]
    return {"text_embeds": emb * mask.unsqueeze(2).to(emb.dtype), "text_mask": mask}


def cut_context(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kandinsky3Pipeline.process_embeds(cut_context=True): keep the batch's longest mask + 1 positions."""
    n = int(mask.sum(-1).max()) + 1
    return embeds[:, :n], mask[:, :n]


@torch.no_grad()
def movq_latents(movq, pixels: torch.Tensor) -> torch.Tensor:
    """MoVQ encoder latents (pre-quantisation, unscaled: Kandinsky3Pipeline decodes them with force_not_quantize)."""
    p = next(movq.parameters())
    return movq.encode(pixels.to(device=p.device, dtype=p.dtype)).latents


def enable_gradient_checkpointing(unet: nn.Module) -> nn.Module:
    """Recompute each down/up level's activations in backward. diffusers' Kandinsky3UNet does not support
    `enable_gradient_checkpointing` (_supports_gradient_checkpointing is False), so each level's forward is wrapped
    in torch.utils.checkpoint (non-reentrant: works with frozen inputs and LoRA-only gradients)."""
    from torch.utils.checkpoint import checkpoint

    for block in list(unet.down_blocks) + list(unet.up_blocks):
        if getattr(block, "_harness_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._harness_checkpointed = True
    return unet
