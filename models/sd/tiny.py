"""A tiny Stable Diffusion pipeline in diffusers' layout, built offline, for tests and CPU smoke runs.

The U-Net, VAE and scheduler configs are those of diffusers' own Stable Diffusion pipeline tests (U-Net block
channels (32, 64), 2 layers per block, cross-attention 32; VAE (32, 64) with 4 latent channels; the SD 1.5 noise
schedule with DDIM). The tokenizer and text tower come from models/tiny_clip.py (a real CLIPTokenizer learned offline,
hidden size 32). The folder loads with `StableDiffusionPipeline.from_pretrained(DIR)` and through `load_sd`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from models.tiny_clip import save_tiny_clip_text

TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
TINY_VAE = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4)
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                   set_alpha_to_one=False, num_train_timesteps=1000, steps_offset=1)


def save_tiny_sd(out_dir: str | Path, corpus: Iterable[str] | None = None, seed: int = 0,
                 prediction_type: str = "epsilon") -> Path:
    """Write a complete tiny SD pipeline folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/).
    `prediction_type="v_prediction"` gives an SD 2.x-style v-prediction pipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    save_tiny_clip_text(out_dir, corpus, hidden_size=32, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    scheduler = DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel.from_pretrained(out_dir / "text_encoder"),
                                   tokenizer=CLIPTokenizer.from_pretrained(out_dir / "tokenizer"), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir
