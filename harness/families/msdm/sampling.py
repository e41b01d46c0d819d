"""MSDM text -> image sampling (training-time grids, --select-best fid) and the `harness generate` Generator.

`load_generator(run, overrides)` is the family loader registered for "msdm-unet" in harness/families/registry.py.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from harness.config import from_dict
from harness.distributed import pick_device
from harness.errors import UserError
from harness.generate import Generator
from harness.io import read_json
from harness.families.msdm.config import UNET_FAMILY, SamplingConfig
from harness.families.msdm.data import to_uint8
from harness.runs import Run
from models.msdm.diffusion import DiffusionConfig, GaussianDiffusion, sample
from models.msdm.text import CLIPText


class TextCache:
    """Encodings of captions, computed once each (a bounded LRU: paraphrase sets can hold 10k+ captions). Kept for
    the whole training (validations included); emptied only when the encoder moves to another device or dtype."""

    def __init__(self, text: CLIPText, capacity: int = 4096):
        self.text, self.capacity = text, capacity
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._where = self._placement(text)

    @staticmethod
    def _placement(text) -> tuple[Any, Any]:
        p = next(text.parameters())
        return p.device, p.dtype

    def use(self, text: CLIPText) -> None:
        """Encode with `text` from now on (the same weights, possibly wrapped or moved)."""
        self.text = text
        where = self._placement(text)
        if where != self._where:
            self.cache.clear()
            self._where = where

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if todo:
            h, m = self.text(todo)
            for p, hi, mi in zip(todo, h, m):
                self.cache[p] = (hi, mi)
        for p in prompts:
            self.cache.move_to_end(p)
        hs, ms = zip(*(self.cache[p] for p in prompts))
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return torch.stack(hs), torch.stack(ms)


class MSDMSampler:
    """Text -> images with CFG in one batched forward, per-sample generators, clamp -> uint8."""

    def __init__(self, unet, vae, texts: TextCache, diffusion: GaussianDiffusion, latent_scale: float,
                 resolution: int, dtype: torch.dtype = torch.float32):
        self.unet, self.vae, self.texts, self.diffusion = unet, vae, texts, diffusion
        self.latent_scale, self.resolution, self.dtype = latent_scale, resolution, dtype
        f = vae.downsample_factor
        self.latent_shape = (vae.config.latent_channels, resolution // f, resolution // f)

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 150, guidance: float = 4.5,
                 sampler_name: str = "ddpm", eta: float = 0.0) -> list[np.ndarray]:
        B = len(prompts)
        ctx, mask = self.texts(list(prompts))
        guided = guidance != 1.0
        if guided:
            u_ctx, u_mask = self.texts([""])
            ctx = torch.cat([ctx, u_ctx.expand(B, -1, -1)])
            mask = torch.cat([mask, u_mask.expand(B, -1)])
        ctx = ctx.to(self.dtype)

        def eps_fn(x, t, x0_prev):
            if not guided:
                return self.unet(x, t, ctx, mask, x0_prev)
            sc = None if x0_prev is None else torch.cat([x0_prev, x0_prev])
            e_c, e_u = self.unet(torch.cat([x, x]), torch.cat([t, t]), ctx, mask, sc).chunk(2)
            return e_u + guidance * (e_c - e_u)

        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        z = sample(self.diffusion, eps_fn, self.latent_shape, gens, steps=steps, sampler=sampler_name, eta=eta,
                   device=self.device, dtype=self.dtype, self_condition=bool(self.unet.config.self_condition))
        x = self.vae.decode((z / self.latent_scale).to(next(self.vae.parameters()).dtype))
        return list(to_uint8(x))


class MSDMGenerator(Generator):
    def __init__(self, run: Run, sampler: MSDMSampler, meta: dict, weights: str, steps: int, guidance: float,
                 sampler_name: str, eta: float):
        self.run, self.sampler, self.meta, self.weights = run, sampler, meta, weights
        self.steps, self.guidance, self.sampler_name, self.eta = steps, guidance, sampler_name, eta

    def generate(self, prompts, seeds):
        return self.sampler.generate(prompts, seeds, self.steps, self.guidance, self.sampler_name, self.eta)

    def info(self):
        return {"family": UNET_FAMILY, "run_id": self.run.id, "preset": self.meta["preset"],
                "text_encoder": self.meta["text_encoder"], "resolution": self.meta["resolution"],
                "weights": f"{self.weights} ({'ema' if self.meta.get('ema') else 'raw'})", "steps": self.steps,
                "guidance": self.guidance, "guidance_form": "uncond + w * (cond - uncond)",
                "sampler": self.sampler_name, "eta": self.eta if self.sampler_name == "ddim" else None,
                "dtype": str(self.sampler.dtype).removeprefix("torch."),
                "unet_sha256": _dir_hash(self.run.dir / self.weights / "unet"),
                "vae_sha256": _dir_hash(self.run.dir / self.weights / "vae")}


def _dir_hash(d: Path) -> str:
    from harness.io import sha256_files

    files = sorted(p for p in d.iterdir() if p.is_file())
    return sha256_files(files, d)[:16]


def load_text(source: str, max_length: int) -> CLIPText:
    try:
        return CLIPText.from_pretrained(source, max_length=max_length)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the CLIP text encoder {source!r} (a hub id needs network or a filled HF cache; "
                        f"a directory needs tokenizer/ + text_encoder/ or a flat CLIP checkpoint): "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def load_generator(run: Run, overrides: dict[str, Any]) -> Generator:
    """Generator of a trained msdm-unet run. overrides: steps, guidance, sampler, eta, device, dtype, weights
    ("best" = the weights --select-best kept, the default when the run has them, as the paper selected its model;
    "final" = the last step's)."""
    from models.msdm.unet import MSDMUNet
    from models.msdm.vae import MSDMAutoencoder

    known = {"steps", "guidance", "sampler", "eta", "device", "dtype", "weights"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"unknown msdm-unet generation option(s): {', '.join(unknown)}")
    weights = overrides.get("weights") or ("best" if (run.dir / "best" / "msdm.json").is_file() else "final")
    if weights not in ("best", "final"):
        raise UserError(f"weights must be best or final, got {weights!r}")
    root = run.dir / weights
    meta_path = root / "msdm.json"
    if not meta_path.is_file():
        raise UserError(f"run has no {weights}/msdm.json (training not finished? resume it with "
                        "`harness train msdm-unet --resume RUN`)", run.dir)
    meta = read_json(meta_path)
    s = from_dict(SamplingConfig, {**meta["sampling"], **{k: overrides[k] for k in ("steps", "guidance", "sampler",
                                                                                       "eta") if k in overrides}})
    device = pick_device(overrides.get("device"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[overrides.get("dtype", "fp32")]
    unet = MSDMUNet.from_pretrained(root / "unet", torch_dtype=dtype).to(device).eval()
    vae = MSDMAutoencoder.from_pretrained(root / "vae", torch_dtype=dtype).to(device).eval()
    # Found again through RUN/paths.json when the run (or a local text-encoder folder) was moved or copied.
    text_source = str(run.resolve_recorded(meta["text_encoder"], "text encoder", True))
    text = load_text(text_source, meta["max_length"]).to(device, dtype)
    sampler = MSDMSampler(unet, vae, TextCache(text), GaussianDiffusion(from_dict(DiffusionConfig, meta["diffusion"])),
                          float(meta["latent_scale"]), int(meta["resolution"]), dtype)
    return MSDMGenerator(run, sampler, meta, weights, s.steps, s.guidance, s.sampler, s.eta)
