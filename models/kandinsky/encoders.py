"""The frozen encoders of Kandinsky 2.2, called exactly as the pipelines call them.

- text: CLIP text tower -> (text_embeds [B, D], last_hidden_state [B, 77, D], mask [B, 77] bool), padded to the
  tokenizer's max length as `KandinskyV22PriorPipeline._encode_prompt` does (the prior has 77 text positions);
- image: CLIP image tower on the image processor's output -> image_embeds [B, D]; the "zero" embedding (the
  negative the pipelines use) is the tower applied to an all-zero processed image;
- MoVQ: unscaled encoder latents `movq.encode(x).latents` (no quantisation; the decoder is trained on these).

Pixels enter as float tensors [B, 3, H, W] in [-1, 1] (the dataset's format).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], device: torch.device | str | None = None
                ) -> dict[str, torch.Tensor]:
    device = device or text_encoder.device
    tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    out = text_encoder(tok.input_ids.to(device))
    return {
        "text_embeds": out.text_embeds,
        "text_hidden": out.last_hidden_state,
        "text_mask": tok.attention_mask.bool().to(device),
    }


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [B, 3, H, W], the exact pixels a saved PNG of the training image would hold."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def clip_image_embeds(image_processor, image_encoder, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings of images given as [-1, 1] tensors (through the pipeline's own image processor)."""
    images = [im for im in pixels_to_uint8(pixels).cpu()]
    values = image_processor(images=images, return_tensors="pt").pixel_values
    values = values.to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(values).image_embeds


@torch.no_grad()
def zero_image_embed(image_encoder) -> torch.Tensor:
    """[1, D]: the negative image embedding of `KandinskyV22PriorPipeline.get_zero_embed`."""
    size = image_encoder.config.image_size
    zero = torch.zeros(1, 3, size, size, device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(zero).image_embeds


@torch.no_grad()
def movq_latents(movq, pixels: torch.Tensor) -> torch.Tensor:
    return movq.encode(pixels.to(device=movq.device, dtype=movq.dtype)).latents
