"""Tiny Kandinsky 2.2 pipelines built offline, for tests, the benchmark and CPU smoke runs.

Same component classes and wiring as the real pipelines (diffusers' own fast tests use these shapes): a 1-layer
PriorTransformer, CLIP text/vision towers with projection, a CLIPImageProcessor, the UnCLIP scheduler; a 2-level
UNet with the Kandinsky block types and image conditioning, a spatial-norm MoVQ, a DDPM scheduler with the decoder's
betas. The tokenizer is learned offline (models/tiny_clip) with model_max_length 77 (the prior's 77 text positions).
clip_std is set to ones (zeros would make `post_process_latents` return a constant). Written with
`save_pretrained`, so tests load them through the real loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from models.tiny_clip import build_clip_tokenizer, tiny_clip_text_config


def tiny_prior_pipeline(embed_dim: int = 32, text_layers: int = 2, vision_layers: int = 2, vision_hidden: int = 32,
                        image_size: int = 32, patch_size: int = 8, prior_layers: int = 1,
                        corpus: Iterable[str] | None = None, seed: int = 0):
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    tokenizer = build_clip_tokenizer(corpus, model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(
        tiny_clip_text_config(len(tokenizer), hidden_size=embed_dim, layers=text_layers, heads=2,
                              projection_dim=embed_dim))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=vision_hidden, image_size=image_size, patch_size=patch_size, projection_dim=embed_dim,
        intermediate_size=vision_hidden * 2, num_attention_heads=2, num_hidden_layers=vision_layers, num_channels=3))
    image_processor = CLIPImageProcessor(
        crop_size=image_size, size=image_size, do_center_crop=True, do_normalize=True, do_resize=True, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=embed_dim,
                             num_layers=prior_layers)
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                clip_sample=True, clip_sample_range=10.0)
    return KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                                     tokenizer=tokenizer, scheduler=scheduler, image_processor=image_processor)


def tiny_decoder_pipeline(embed_dim: int = 32, base_channels: int = 32, seed: int = 0):
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(base_channels, base_channels * 2), layers_per_block=1,
        encoder_hid_dim=embed_dim, encoder_hid_dim_type="image_proj", cross_attention_dim=32,
        attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None)
    # Three levels: latents at 1/4 of the image size (the real MoVQ is 1/8); keeps 64 px images cheap.
    movq = VQModel(
        block_out_channels=[32, 32, 64], down_block_types=["DownEncoderBlock2D"] * 2 + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 2, in_channels=3, out_channels=3,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12,
        vq_embed_dim=4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, prediction_type="epsilon", thresholding=False)
    return KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)


def save_tiny_kandinsky(out_dir: str | Path, seed: int = 0, **prior_kwargs) -> tuple[Path, Path]:
    """Write `<out_dir>/prior` and `<out_dir>/decoder` pipeline folders (diffusers' layout); returns their paths.

    Each folder is written under a temporary name and renamed into place, so an interrupted call leaves no folder
    that looks complete; existing folders are an error (FileExistsError), never overwritten."""
    import os
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    targets = (out_dir / "prior", out_dir / "decoder")
    for t in targets:
        if t.exists():
            raise FileExistsError(f"{t} already exists")
    out_dir.mkdir(parents=True, exist_ok=True)
    prior = tiny_prior_pipeline(seed=seed, **prior_kwargs)
    decoder = tiny_decoder_pipeline(embed_dim=prior.prior.config.embedding_dim, seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-kandinsky.tmp-", dir=out_dir))
    try:
        prior.save_pretrained(tmp / "prior")
        decoder.save_pretrained(tmp / "decoder")
        for t in targets:
            os.replace(tmp / t.name, t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return targets
