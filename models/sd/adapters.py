"""Write and read trained SD adapters in the layouts practitioners load.

diffusers layout (RUN/final/pytorch_lora_weights.safetensors): written by `StableDiffusionPipeline.save_lora_weights`
with the peft config as metadata (so alpha != rank and DoRA reload exactly); loads in plain diffusers:

    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_lora_weights("runs/<run>/final")

kohya / A1111 layout (`lora_unet_*`, `lora_te_*`, `.lora_down/.lora_up/.alpha`): converted by diffusers' own
`convert_state_dict_to_kohya`; the SD WebUI and ComfyUI read it, and so does `pipe.load_lora_weights(file)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NAME = "kohya_lora.safetensors"


def _peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _metadata(model: nn.Module) -> dict:
    cfg = model.peft_config["default"].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    return cfg


def save_lora(out_dir: Path, unet: nn.Module | None, text_encoder: nn.Module | None) -> Path:
    """diffusers-format LoRA/DoRA file of the adapted models (None = not adapted)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    kw = {}
    if unet is not None:
        kw["unet_lora_layers"] = convert_state_dict_to_diffusers(_peft_state(unet))
        kw["unet_lora_adapter_metadata"] = _metadata(unet)
    if text_encoder is not None:
        kw["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(_peft_state(text_encoder))
        kw["text_encoder_lora_adapter_metadata"] = _metadata(text_encoder)
    StableDiffusionPipeline.save_lora_weights(str(out_dir), weight_name=WEIGHT_NAME, safe_serialization=True, **kw)
    return Path(out_dir) / WEIGHT_NAME


def save_kohya(path: Path, unet: nn.Module | None, text_encoder: nn.Module | None) -> Path:
    """The kohya/A1111 layout of the same adapters, through diffusers' `convert_state_dict_to_kohya`. SD 1.x/2.x
    have one text encoder, which kohya names `lora_te_` (diffusers' converter writes `lora_te1_`, SDXL's name)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    peft_sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None:
            continue
        peft_sd.update({f"{prefix}.{k}": v for k, v in _peft_state(model).items()})
        alphas[prefix] = float(model.peft_config["default"].lora_alpha)
    kohya = convert_state_dict_to_kohya(peft_sd)
    out = {}
    for k, v in kohya.items():
        k = k.replace("lora_te1_", "lora_te_")
        out[k] = v.contiguous()
    # kohya stores alpha per module; the converter sets it to the rank, the trained scale is alpha / rank.
    for k in list(out):
        if k.endswith(".alpha"):
            comp = "unet" if k.startswith("lora_unet_") else "text_encoder"
            out[k] = torch.tensor(alphas[comp], dtype=torch.float32)
    path = Path(path)
    save_file(out, str(path), metadata={"ss_network_module": "networks.lora", "format": "pt"})
    return path
