"""Kandinsky 2.2 sampling (prior, then decoder) with one torch.Generator per sample.

The steps follow `KandinskyV22PriorPipeline.__call__` and `KandinskyV22Pipeline.__call__` (classifier-free guidance
as uncond + w (cond - uncond), the "" prompt as the prior's negative, the zero image embedding as the decoder's),
with two differences that generation at submission scale needs: text encodings come in precomputed (each unique
prompt is encoded once for thousands of lines), and every random tensor of row k is drawn from generators[k], so an
image depends on its own seed only, never on which other prompts share its batch.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor


@torch.no_grad()
def sample_image_embeds(prior, scheduler, text: dict[str, torch.Tensor], negative_text: dict[str, torch.Tensor],
                        generators: list[torch.Generator], steps: int = 25, guidance: float = 4.0) -> torch.Tensor:
    """Image embeddings [B, D] for B prompts encoded in `text`; `negative_text` holds the "" prompt (1 row)."""
    b = text["text_embeds"].shape[0]
    dtype, device = prior.dtype, prior.device
    cfg = guidance > 1.0
    if cfg:
        def both(key: str) -> torch.Tensor:
            neg = negative_text[key].expand(b, *negative_text[key].shape[1:])
            return torch.cat([neg, text[key]]).to(device)
    else:
        def both(key: str) -> torch.Tensor:
            return text[key].to(device)
    proj, hidden, mask = both("text_embeds").to(dtype), both("text_hidden").to(dtype), both("text_mask")

    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    latents = randn_tensor((b, prior.config.embedding_dim), generator=list(generators), device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        model_in = torch.cat([latents] * 2) if cfg else latents
        pred = prior(model_in, timestep=t, proj_embedding=proj, encoder_hidden_states=hidden,
                     attention_mask=mask).predicted_image_embedding
        if cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        prev_t = None if i + 1 == len(timesteps) else timesteps[i + 1]
        latents = scheduler.step(pred, timestep=t, sample=latents, generator=list(generators),
                                 prev_timestep=prev_t).prev_sample
    return prior.post_process_latents(latents)


def latent_size(height: int, width: int, scale_factor: int) -> tuple[int, int]:
    """The decoder pipeline's latent grid: ceil(side / f^2) * f (so the output is a multiple of f^2 pixels)."""
    def one(side: int) -> int:
        n = side // scale_factor**2 + (1 if side % scale_factor**2 else 0)
        return n * scale_factor
    return one(height), one(width)


@torch.no_grad()
def decode_images(unet, movq, scheduler, image_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                  generators: list[torch.Generator], steps: int = 50, guidance: float = 4.0, height: int = 256,
                  width: int = 256) -> list[np.ndarray]:
    """uint8 RGB images (H, W, 3) from image embeddings [B, D]; `negative_embeds` [1 or B, D]."""
    b = image_embeds.shape[0]
    dtype, device = unet.dtype, unet.device
    cfg = guidance > 1.0
    cond = image_embeds.to(device=device, dtype=dtype)
    if cfg:
        neg = negative_embeds.to(device=device, dtype=dtype).expand(b, -1)
        cond = torch.cat([neg, cond])
    f = 2 ** (len(movq.config.block_out_channels) - 1)
    lh, lw = latent_size(height, width, f)
    c = unet.config.in_channels
    scheduler.set_timesteps(steps, device=device)
    latents = randn_tensor((b, c, lh, lw), generator=list(generators), device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if cfg else latents
        out = unet(sample=model_in, timestep=t, encoder_hidden_states=None,
                   added_cond_kwargs={"image_embeds": cond}, return_dict=False)[0]
        if cfg:
            eps, var = out.split(c, dim=1)
            eps_u, eps_c = eps.chunk(2)
            out = torch.cat([eps_u + guidance * (eps_c - eps_u), var.chunk(2)[1]], dim=1)
        if not learned:
            out = out[:, :c]
        latents = scheduler.step(out, t, latents, generator=list(generators)).prev_sample
    images = movq.decode(latents, force_not_quantize=True).sample
    images = (images.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [(im * 255).round().astype(np.uint8) for im in images]
