"""Kandinsky 2.2 (prior + decoder) for LoRA fine-tuning: loaders, LoRA helpers, frozen encoders, sampling, counts.

    from models.kandinsky import LoraSpec, add_lora, load_decoder, load_prior

    parts = load_prior("kandinsky-community/kandinsky-2-2-prior", dtype="fp16", device="cuda")
    add_lora(parts.prior, LoraSpec(rank=32))          # only the LoRA weights are trainable

No training logic lives here (that is harness/families/kandinsky22/train.py); nothing here imports the harness.
"""

from models.kandinsky.loading import (DEFAULT_DECODER, DEFAULT_PRIOR, DecoderParts, PriorParts, load_decoder,
                                      load_prior)
from models.kandinsky.lora import (PAPER_TARGETS, TARGET_PRESETS, LoraSpec, add_lora, load_adapter, lora_parameters,
                                   save_adapter)

__all__ = ["DEFAULT_DECODER", "DEFAULT_PRIOR", "DecoderParts", "PriorParts", "load_decoder", "load_prior",
           "PAPER_TARGETS", "TARGET_PRESETS", "LoraSpec", "add_lora", "load_adapter", "lora_parameters",
           "save_adapter"]
