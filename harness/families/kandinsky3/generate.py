"""`harness generate` on a kandinsky3 run: diffusers' Kandinsky3Pipeline (its U-Net with the run's LoRA, its MoVQ
and scheduler) fed prompt embeddings from the text-encoder cache.

Each unique prompt is encoded once (fp16, into the same on-disk cache training uses); the 8.7 B T5 encoder is
loaded lazily, on the CPU, only when a prompt is missing from the cache, so the accelerator holds the U-Net and
MoVQ only. The negative prompt defaults to "" - the caption the training dropped captions to (diffusers' default,
no negative prompt, feeds zero embeddings, a condition the fine-tune never saw). Image k draws all its noise from a
generator seeded with seeds[k]: images do not depend on the batch they are made in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from harness.errors import UserError
from harness.generate import Generator
from harness.runs import Run


class Kandinsky3Generator(Generator):
    def __init__(self, pipe, store, text_fp: str, load_encoder, gen, height: int, width: int, info: dict):
        self.pipe, self.store, self.text_fp, self._load_encoder = pipe, store, text_fp, load_encoder
        self.gen, self.height, self.width, self._info = gen, height, width, info
        self._encoder = None
        self._text: dict[str, dict[str, torch.Tensor]] = {}

    def _encodings(self, texts: Sequence[str]) -> None:
        from harness.families.kandinsky3.train import fill_text_cache

        new = [t for t in dict.fromkeys(texts) if t not in self._text]
        if not new:
            return

        def loader():
            if self._encoder is None:
                self._encoder = self._load_encoder()
            return self._encoder

        keys, _ = fill_text_cache(self.store, loader, self.text_fp, new, 16, torch.device("cpu"), "encode prompts")
        self._encoder = None  # freed once this batch's new prompts are in the cache
        for t in new:
            self._text[t] = self.store.get(keys[t])

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        from models.kandinsky3.loading import cut_context

        neg = self.gen.negative_prompt
        self._encodings(list(prompts) + [neg])
        unet = self.pipe.unet
        p = next(unet.parameters())
        emb = torch.stack([self._text[t]["text_embeds"] for t in prompts])
        mask = torch.stack([self._text[t]["text_mask"] for t in prompts])
        emb, mask = cut_context(emb, mask)
        n = emb.shape[1]
        nemb = self._text[neg]["text_embeds"][None, :n].expand(len(prompts), -1, -1)
        nmask = self._text[neg]["text_mask"][None, :n].expand(len(prompts), -1)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            out = self.pipe(prompt_embeds=emb.to(p.device, p.dtype), attention_mask=mask.to(p.device),
                            negative_prompt_embeds=nemb.to(p.device, p.dtype),
                            negative_attention_mask=nmask.to(p.device), num_inference_steps=self.gen.steps,
                            guidance_scale=self.gen.guidance, height=self.height, width=self.width,
                            generator=gens, output_type="np").images
        return [np.clip(np.round(im * 255), 0, 255).astype(np.uint8) for im in out]

    def info(self) -> dict[str, Any]:
        return self._info


def load_generator(run: Run, overrides: dict[str, Any]) -> Generator:
    from diffusers import Kandinsky3Pipeline

    from harness.encoder_cache import TensorStore, default_cache_dir
    from harness.families.kandinsky3.train import ADAPTER_DIR, _load_parts, config_from_run
    from models.kandinsky.lora import adapter_content_hash
    from models.kandinsky3.lora import WEIGHT_NAME, load_adapter

    cfg = config_from_run(run)
    gen = dataclasses.replace(cfg.generation)
    if overrides.get("steps") is not None:
        gen.steps = int(overrides["steps"])
    if overrides.get("guidance") is not None:
        gen.guidance = float(overrides["guidance"])
    for key in ("negative_prompt", "height", "width", "dtype"):
        if overrides.get(key) is not None:
            setattr(gen, key, overrides[key])
    gen.validate()
    adapter = run.dir / ADAPTER_DIR
    if not (adapter / WEIGHT_NAME).is_file():
        raise UserError(f"run has no finished adapter ({ADAPTER_DIR}/{WEIGHT_NAME}); train it to the end first",
                        run.dir)
    device = torch.device(overrides.get("device") or "cpu")
    load_cfg = dataclasses.replace(cfg, base_dtype=gen.dtype)
    parts = _load_parts(load_cfg, text_encoder=False)
    load_adapter(parts.unet, adapter)
    pipe = Kandinsky3Pipeline(tokenizer=parts.tokenizer, text_encoder=None, unet=parts.unet,
                              scheduler=parts.scheduler, movq=parts.movq).to(device)
    pipe.set_progress_bar_config(disable=True)
    store = TensorStore(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    height, width = gen.height or cfg.data.resolution, gen.width or cfg.data.resolution
    info = {"family": "kandinsky3", "base": parts.source.to_dict() | {"folder": None},
            "adapter": {"path": str(adapter.resolve()), "tensors_sha256": adapter_content_hash(adapter)},
            "sampling": dataclasses.asdict(gen) | {"height": height, "width": width}}
    # The encoder runs in the training's base dtype, so prompts shared with training captions hit its cache entries.
    text_fp = parts.fingerprints["text"].rsplit(":", 1)[0] + f":{cfg.base_dtype}"
    return Kandinsky3Generator(pipe, store, text_fp, lambda: _load_parts(cfg, text_encoder=True),
                               gen, height, width, info)
