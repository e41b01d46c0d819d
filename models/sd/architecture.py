"""The real SD 1.5 architecture from shipped configs, built on the meta device (no weights, no download).

configs/*.json are the architecture keys of stable-diffusion-v1-5/stable-diffusion-v1-5 (unet, text_encoder, vae,
scheduler). Counts on SD 1.5: U-Net 859,520,964 (343,684 biases), text encoder 123,060,480, VAE 83,653,863;
LoRA r=4 on the U-Net's to_q,to_k,to_v,to_out.0 = 797,184 (checked in tests/test_sd_counts.py). A local pipeline
folder's own configs can be counted the same way (`component_configs(folder)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from models.sd import methods as M

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_FILES = {"unet": "unet.json", "text_encoder": "text_encoder.json", "vae": "vae.json",
                "scheduler": "scheduler.json"}
PIPELINE_FILES = {"unet": "unet/config.json", "text_encoder": "text_encoder/config.json", "vae": "vae/config.json",
                  "scheduler": "scheduler/scheduler_config.json"}


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def shipped_config(component: str) -> dict:
    """The shipped SD 1.5 config of unet, text_encoder, vae or scheduler (provenance keys dropped)."""
    if component not in CONFIG_FILES:
        raise ValueError(f"component must be one of {', '.join(CONFIG_FILES)}, got {component!r}")
    return _clean(json.loads((CONFIG_DIR / CONFIG_FILES[component]).read_text(encoding="utf-8")))


def component_configs(folder: str | Path | None = None) -> dict[str, dict]:
    """Configs of the three networks and the scheduler: shipped SD 1.5 (folder None) or a pipeline folder's own."""
    if folder is None:
        return {c: shipped_config(c) for c in CONFIG_FILES}
    folder = Path(folder)
    out = {}
    for c, rel in PIPELINE_FILES.items():
        p = folder / rel
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (not a Stable Diffusion pipeline folder)")
        out[c] = _clean(json.loads(p.read_text(encoding="utf-8")))
    return out


def build_on_meta(component: str, config: dict):
    """Instantiate one network with every tensor on the meta device."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        if component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            keep = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype",
                                                                  "dtype", "transformers_version")}
            return CLIPTextModel(CLIPTextConfig(**keep))
    raise ValueError(f"unknown component {component!r}")


def trainable_counts(method: str, components: Sequence[str], configs: dict[str, dict] | None = None, rank: int = 4,
                     alpha: float | None = None, unet_targets: Sequence[str] = M.UNET_LORA_TARGETS,
                     text_encoder_targets: Sequence[str] = M.TEXT_ENCODER_LORA_TARGETS) -> dict[str, dict[str, int]]:
    """{component: {"total": all parameters (incl. added ones), "trainable": what `method` trains}} built on the
    meta device exactly as training applies the method."""
    configs = configs or component_configs()
    models = {c: build_on_meta(c, configs[c]) for c in components}
    trained = M.apply_method(models, method, components, rank=rank, alpha=alpha, unet_targets=unet_targets,
                             text_encoder_targets=text_encoder_targets)
    return {c: {"total": M.count(models[c].parameters()), "trainable": M.count(trained.get(c, []))}
            for c in components}


def sizes(configs: dict[str, dict] | None = None) -> dict[str, dict[str, int]]:
    """Parameters and bias parameters of each network."""
    configs = configs or component_configs()
    out = {}
    for c in M.COMPONENTS:
        m = build_on_meta(c, configs[c])
        out[c] = {"parameters": M.count(m.parameters()), "biases": M.count(M.bias_parameters(m))}
    return out
