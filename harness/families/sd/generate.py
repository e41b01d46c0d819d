"""`harness generate` on an SD run: the base pipeline plus the run's adapter (plain `pipe.load_lora_weights`) or
its fine-tuned components, sampled with DDIM, Euler or DPM-Solver++ (2M).

Image k depends only on (prompts[k], seeds[k]): the pipeline gets one torch.Generator per image (diffusers draws
each sample's initial latents from its own generator; the three samplers add no other noise). Prompt embeddings
(clip skip included, kohya numbering) are computed here once per unique prompt and handed to the pipeline; with
clip skip 1 and no negative prompt they are exactly what `pipe(prompt)` computes itself (empty negative prompt "").
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from harness.errors import UserError
from harness.families.sd.config import SDGenerationConfig
from harness.generate import Generator
from harness.runs import Run
from models.sd.adapters import WEIGHT_NAME
from models.sd.loading import encode_prompts

FINAL = "final"


def make_scheduler(name: str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise UserError(f"unknown scheduler {name!r} (ddim, euler, dpmpp)")


def _files_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
                    and p.name not in ("sd_meta.json", "provenance.json")):
        h.update(f.relative_to(folder).as_posix().encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def build_pipeline(base: str, revision: str | None, final: Path | None, method: str, components: list[str],
                   dtype: str = "fp32", device: str | torch.device = "cpu"):
    """StableDiffusionPipeline of the base with a run's result applied (final None = the base model)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from models.hub import resolve_source, to_dtype

    dt = to_dtype(dtype)
    try:
        src = resolve_source(base, revision)
        pipe = StableDiffusionPipeline.from_pretrained(src.folder, torch_dtype=dt, safety_checker=None,
                                                       requires_safety_checker=False)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UserError(str(e)) from None
    if final is not None:
        if method in ("lora", "dora"):
            pipe.load_lora_weights(str(final), weight_name=WEIGHT_NAME)
        else:
            classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "vae": AutoencoderKL}
            for comp in components:
                setattr(pipe, comp, None)
                model = classes[comp].from_pretrained(final / comp, torch_dtype=dt) if comp != "text_encoder" \
                    else classes[comp].from_pretrained(final / comp, dtype=dt)
                pipe.register_modules(**{comp: model})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), src


class SDGenerator(Generator):
    def __init__(self, pipe, gen: SDGenerationConfig, clip_skip: int, height: int, width: int, device,
                 info: dict[str, Any]):
        self.pipe, self.gen, self.clip_skip = pipe, gen, clip_skip
        self.height, self.width, self.device, self._info = height, width, torch.device(device), info
        self.pipe.scheduler = make_scheduler(gen.scheduler, pipe.scheduler.config)
        self._emb: dict[str, torch.Tensor] = {}

    def _embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings with the run's clip skip, computed once per unique prompt."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._emb]
        if new:
            with torch.no_grad():
                e = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, new, self.clip_skip)
            self._emb.update({p: e[j : j + 1] for j, p in enumerate(new)})
        return torch.cat([self._emb[p] for p in prompts])

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        neg = self._embeds([self.gen.negative_prompt] * len(prompts))
        out = self.pipe(prompt_embeds=self._embeds(prompts), negative_prompt_embeds=neg, generator=gens,
                        num_inference_steps=self.gen.steps, guidance_scale=self.gen.guidance, height=self.height,
                        width=self.width, output_type="np").images
        return [np.clip(np.round(im * 255), 0, 255).astype(np.uint8) for im in out]

    def info(self) -> dict[str, Any]:
        return self._info


def load_generator(run: Run, overrides: dict[str, Any]) -> Generator:
    from harness.families.sd.task import config_from_run

    cfg = config_from_run(run)
    gen = dataclasses.replace(cfg.generation)
    for key in ("steps", "guidance", "scheduler", "negative_prompt", "height", "width", "dtype"):
        if overrides.get(key) is not None:
            setattr(gen, key, overrides[key])
    gen.validate()
    final = run.dir / FINAL
    if not (final / "sd_meta.json").is_file():
        raise UserError(f"run has no finished result ({FINAL}/sd_meta.json); train it to the end (or --resume it) "
                        "first", run.dir)
    device = overrides.get("device") or "cpu"
    pipe, src = build_pipeline(cfg.base, cfg.revision, final, cfg.method, list(cfg.components), gen.dtype, device)
    height, width = gen.height or cfg.data.resolution, gen.width or cfg.data.resolution
    info = {"family": "sd", "base": src.to_dict() | {"folder": None}, "method": cfg.method,
            "components": list(cfg.components), "result_sha256": _files_hash(final), "clip_skip": cfg.clip_skip,
            "sampling": dataclasses.asdict(gen) | {"height": height, "width": width}}
    return SDGenerator(pipe, gen, cfg.clip_skip, height, width, device, info)
