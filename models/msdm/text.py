"""Frozen CLIP text encoder for MSDM: tokenizer + `CLIPTextModel`, last hidden state (not pooled) + padding mask.

`source` is a hub id (default `openai/clip-vit-large-patch14`, whose repo holds tokenizer and model at its root) or
a local directory in either layout:
    DIR/tokenizer/ + DIR/text_encoder/     (diffusers pipeline layout; `models.tiny_clip.save_tiny_clip_text` writes it)
    DIR/ with tokenizer files and config.json + weights side by side (a downloaded CLIP checkpoint)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"


def resolve_text_source(source: str | Path) -> tuple[str, str | None]:
    """(root, layout): layout 'pipeline' (tokenizer/ + text_encoder/), 'flat' (a local CLIP dir) or None (hub id)."""
    p = Path(source)
    if p.is_dir():
        if (p / "tokenizer").is_dir() and (p / "text_encoder").is_dir():
            return str(p), "pipeline"
        return str(p), "flat"
    return str(source), None  # hub id: flat layout at the repo root


class CLIPText(nn.Module):
    """Tokenize and encode prompts -> (hidden [B, L, D], mask [B, L] bool). Frozen; always in eval mode."""

    def __init__(self, tokenizer, model, max_length: int = 77):
        super().__init__()
        self.tokenizer, self.model = tokenizer, model
        self.max_length = min(max_length, model.config.max_position_embeddings)
        self.model.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, source: str | Path = DEFAULT_TEXT_ENCODER, max_length: int = 77,
                        torch_dtype: torch.dtype | None = None) -> "CLIPText":
        from transformers import CLIPTextModel, CLIPTokenizer

        root, layout = resolve_text_source(source)
        tok_kw = {"subfolder": "tokenizer"} if layout == "pipeline" else {}
        enc_kw = {"subfolder": "text_encoder"} if layout == "pipeline" else {}
        tokenizer = CLIPTokenizer.from_pretrained(root, **tok_kw)
        if torch_dtype is not None:
            enc_kw["dtype"] = torch_dtype
        model = CLIPTextModel.from_pretrained(root, **enc_kw)
        return cls(tokenizer, model, max_length)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True) -> "CLIPText":
        return super().train(False)  # frozen: dropout never on

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool()
