"""Named MSDM sizes. `paper` is the published model (256 px -> 8 x 32 x 32 latents); `tiny` trains on 64 px on a
laptop CPU in minutes (tests, quickstart). Parameter tables are computed on the meta device: nothing allocated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# The published text tower: CLIP ViT-L/14 text transformer (transformers' CLIPTextConfig fields).
CLIP_VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int
    vae: dict[str, Any] = field(default_factory=dict)
    unet: dict[str, Any] = field(default_factory=dict)  # context_dim is set from the text encoder at build time
    description: str = ""


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper", 256,
        vae=dict(block_out_channels=(64, 128, 256, 512), latent_channels=8, norm_groups=8, deep_supervision=1),
        unet=dict(block_out_channels=(256, 512, 1024), layers_per_block=2, emb_dim=1024, head_dim=64, ff_mult=4,
                  dropout=0.1, norm_groups=32, in_channels=8, out_channels=8),
        description="published MSDM: VAE 64/128/256/512 (x8, 8 latent channels), UNet 256/512/1024, CLIP ViT-L/14",
    ),
    "tiny": Preset(
        "tiny", 64,
        vae=dict(block_out_channels=(16, 32, 48, 64), latent_channels=8, norm_groups=8, deep_supervision=1),
        unet=dict(block_out_channels=(24, 32, 48), layers_per_block=1, emb_dim=64, head_dim=16, ff_mult=2,
                  dropout=0.1, norm_groups=8, in_channels=8, out_channels=8),
        description="CPU-sized MSDM for tests and the quickstart (64 px -> 8 x 8 x 8 latents)",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown MSDM preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# The paper's parameter table (MSDM, seed paper): what `harness models info msdm --preset paper` compares against.
PAPER_COUNTS = {"vae": 13.4e6, "unet": 326.5e6, "text_encoder (frozen)": 123e6}
# Why the built counts differ from the paper's, where they do (structure follows the release; nothing is tuned).
COUNT_NOTES = {
    "vae": "released blocks (Medfusion VAE, hid 64/128/256/512, GroupNorm 8, deep supervision 1): 13.37 M, "
           "the paper's 13.4 M rounded",
    "unet": "released widths/blocks and emb_dim 1024; the -0.8 % residual lies in layers the paper does not "
            "describe (the text pooling and the time/text embedding MLPs), not tuned to hit the number",
    "text_encoder (frozen)": "CLIP ViT-L/14 text tower",
}


def parameter_table(name: str, text_config: dict[str, Any] | None = None) -> list[tuple[str, int, str]]:
    """[(component, parameters, note)] for a preset, built on the meta device (no memory, no download).
    `text_config` defaults to CLIP ViT-L/14's text tower (what `--text-encoder openai/clip-vit-large-patch14` loads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.msdm.unet import MSDMUNet
    from models.msdm.vae import MSDMAutoencoder

    p = get_preset(name)
    tcfg = CLIPTextConfig(**(text_config or CLIP_VIT_L14_TEXT))
    with torch.device("meta"):
        vae = MSDMAutoencoder(**p.vae)
        unet = MSDMUNet(context_dim=tcfg.hidden_size, **p.unet)
        text = CLIPTextModel(tcfg)
    lat = p.resolution // vae.downsample_factor
    return [
        ("vae", count_parameters(vae), f"{p.resolution} px -> {p.vae['latent_channels']} x {lat} x {lat}"),
        ("unet", count_parameters(unet), f"channels {'/'.join(map(str, p.unet['block_out_channels']))}, "
                                         f"{sum(1 for m in unet.modules() if type(m).__name__ == 'CrossAttention')} "
                                         "cross-attention blocks"),
        ("text_encoder (frozen)", count_parameters(text), f"CLIP text, hidden {tcfg.hidden_size}, "
                                                          f"{tcfg.num_hidden_layers} layers"),
    ]
