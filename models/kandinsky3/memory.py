"""Analytic training-memory estimate of Kandinsky 3.0 LoRA on the real architecture (meta device, no weights).

    resident weights  = U-Net params x bytes(base dtype) [+ T5 encoder params x bytes when the encoder is resident]
    LoRA state        = LoRA params x 16 B (fp32 weight + fp32 grad + two fp32 AdamW moments)
    activations       = per sample: the sum of every leaf module's output of one U-Net forward at the training
                        latent size, traced on the meta device (what autograd keeps is of this order: an upper-bound
                        proxy, not a measurement); with gradient checkpointing, the level outputs plus the largest
                        level's own activations (recomputed one level at a time)
Activation bytes use the autocast dtype (2 B under bf16/fp16, else 4 B). The T5 encoder's own activations (no grad,
128 tokens) are small next to its weights and not counted.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from models.kandinsky.lora import LoraSpec

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "no": 4}
GIB = 1024 ** 3


@lru_cache(maxsize=8)
def activation_elements(latent: int, text_len: int = 128) -> tuple[int, int]:
    """(all leaf outputs, checkpointed) elements of one sample's real-U-Net forward at latent x latent."""
    from diffusers import Kandinsky3UNet

    from models.kandinsky3.lora import real_unet_config

    cfg = real_unet_config()
    with torch.device("meta"):
        unet = Kandinsky3UNet.from_config(cfg)
    sizes: list[int] = []
    level = {"cur": None}
    per_level: dict[int, int] = {}
    blocks = list(unet.down_blocks) + list(unet.up_blocks)
    block_out: list[int] = []
    hooks = []

    def leaf(_m, _i, out):
        n = out.numel() if isinstance(out, torch.Tensor) else 0
        sizes.append(n)
        if level["cur"] is not None:
            per_level[level["cur"]] = per_level.get(level["cur"], 0) + n

    for m in unet.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(leaf))
    for k, b in enumerate(blocks):
        def enter(_m, _i, k=k):
            level["cur"] = k

        def leave(_m, _i, out):
            block_out.append(out.numel())
            level["cur"] = None

        hooks.append(b.register_forward_pre_hook(enter))
        hooks.append(b.register_forward_hook(leave))
    with torch.device("meta"), torch.no_grad():
        x = torch.empty(1, cfg["in_channels"], latent, latent)
        ctx = torch.empty(1, text_len, cfg["encoder_hid_dim"])
        mask = torch.ones(1, text_len, dtype=torch.bool)
        unet(x, torch.tensor([10]), encoder_hidden_states=ctx, encoder_attention_mask=mask)
    for h in hooks:
        h.remove()
    total = sum(sizes)
    outside = total - sum(per_level.values())
    ckpt = outside + sum(block_out) + max(per_level.values())
    return total, ckpt


def estimate(spec: LoraSpec, batch_size: int, resolution: int = 256, mixed_precision: str = "no",
             base_dtype: str = "fp32", gradient_checkpointing: bool = False, text_len: int = 32) -> dict:
    """Memory figures (GiB) of one training process, with the text-encoder cache and with the encoder resident.
    `text_len`: the cut context length (longest caption + 1; MEDVQA-GI prompts are < 32 T5 tokens)."""
    from models.kandinsky3.lora import count_parameters, count_text_encoder

    counts = count_parameters(spec.rank, spec)
    enc = count_text_encoder()
    wb = BYTES[base_dtype]
    ab = BYTES[mixed_precision]
    latent = resolution // 8  # MoVQ downsamples 8x
    full, ckpt = activation_elements(latent, text_len)
    act = (ckpt if gradient_checkpointing else full) * ab * batch_size
    unet_w = counts["unet"] * wb
    lora_state = counts["lora"] * 16
    cached = unet_w + lora_state + act
    return {"unet_parameters": counts["unet"], "lora_parameters": counts["lora"],
            "text_encoder_parameters": enc, "activations_per_sample_gib": round(act / batch_size / GIB, 3),
            "cached_gib": round(cached / GIB, 2), "encoder_resident_gib": round((cached + enc * wb) / GIB, 2),
            "assumes": {"batch_size": batch_size, "resolution": resolution, "latent": latent,
                        "base_dtype": base_dtype, "activation_dtype": mixed_precision,
                        "gradient_checkpointing": gradient_checkpointing, "text_len": text_len}}
