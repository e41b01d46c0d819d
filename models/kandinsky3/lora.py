"""LoRA on the Kandinsky 3.0 U-Net through peft, and counting it on the real architecture on the meta device.

Targets: every diffusers `Attention` of the U-Net (self- and cross-attention of the levels, and the attention
pooling of the time/text condition) through its projections to_q, to_k, to_v, to_out.0 - the same names as the
Kandinsky 2.2 "paper" preset, so `models.kandinsky.lora.LoraSpec` describes the adapter (rank, alpha, DoRA, rsLoRA,
init).

diffusers 0.42's `Kandinsky3UNet` does not mix in `PeftAdapterMixin` (no `add_adapter` / `load_lora_adapter`), so
the adapter is injected with `peft.inject_adapter_in_model` and saved as peft's state dict + `adapter_config.json`.
Loading it in plain diffusers + peft (no harness):

    import json, torch
    from diffusers import Kandinsky3Pipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    pipe = Kandinsky3Pipeline.from_pretrained("kandinsky-community/kandinsky-3", variant="fp16",
                                              torch_dtype=torch.float16).to("cuda")
    cfg = LoraConfig(**json.load(open("runs/<run>/final/adapter_config.json")))
    inject_adapter_in_model(cfg, pipe.unet)
    set_peft_model_state_dict(pipe.unet, load_file("runs/<run>/final/pytorch_lora_weights.safetensors"))
    image = pipe("Generate an image containing a polyp", negative_prompt="", height=256, width=256).images[0]

(On a diffusers whose Kandinsky3UNet has `load_lora_adapter`, `pipe.unet.load_lora_adapter("runs/<run>/final",
prefix=None, weight_name="pytorch_lora_weights.safetensors")` reads the same file: its keys are peft's.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.kandinsky.lora import LoraSpec, lora_config, lora_parameters

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CONFIG_NAME = "adapter_config.json"
META_NAME = "adapter_meta.json"
TARGETS = ("paper",)  # LoraSpec target presets that exist on Kandinsky3UNet (to_q, to_k, to_v, to_out.0)
CONFIG_JSON = Path(__file__).parent / "configs" / "unet_config.json"


def add_lora(unet: nn.Module, spec: LoraSpec) -> nn.Module:
    """Freeze every base weight, inject a trainable fp32 LoRA adapter."""
    from peft import inject_adapter_in_model

    if spec.targets not in TARGETS:
        raise ValueError(f"LoRA targets {spec.targets!r} do not exist on Kandinsky3UNet; choose {', '.join(TARGETS)}")
    unet.requires_grad_(False)
    inject_adapter_in_model(lora_config(spec), unet)
    for p in lora_parameters(unet):
        p.requires_grad_(True)
        if p.dtype != torch.float32 and p.device.type != "meta":
            p.data = p.data.float()
    return unet


def _config_dict(spec: LoraSpec) -> dict[str, Any]:
    d = lora_config(spec).to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()
            if k in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "init_lora_weights",
                     "lora_dropout", "bias")}


def write_adapter(unet: nn.Module, spec: LoraSpec, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(sd, str(out_dir / WEIGHT_NAME))
    (out_dir / CONFIG_NAME).write_text(json.dumps(_config_dict(spec), indent=2, sort_keys=True) + "\n")
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_adapter(unet: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject and fill an adapter written by `write_adapter` (the plain-peft recipe of the module docstring)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = LoraConfig(**json.loads((adapter_dir / CONFIG_NAME).read_text()))
    inject_adapter_in_model(cfg, unet)
    p = next(unet.parameters())
    sd = {k: v.to(p.device) for k, v in load_file(str(adapter_dir / WEIGHT_NAME)).items()}
    res = set_peft_model_state_dict(unet, sd)
    if getattr(res, "unexpected_keys", None):
        raise ValueError(f"{adapter_dir}: adapter keys not in this U-Net: {res.unexpected_keys[:3]}")
    for q in lora_parameters(unet):
        q.data = q.data.to(p.dtype)
    unet.requires_grad_(False)
    return unet


def real_unet_config() -> dict[str, Any]:
    return {k: v for k, v in json.loads(CONFIG_JSON.read_text()).items() if not k.startswith("_")}


def count_parameters(rank: int, spec: LoraSpec | None = None, config: dict | None = None) -> dict[str, int]:
    """U-Net and LoRA parameter counts of the real architecture (configs/unet_config.json), built on the meta
    device (no memory, no download)."""
    from dataclasses import replace

    from diffusers import Kandinsky3UNet

    spec = replace(spec or LoraSpec(), rank=rank)
    with torch.device("meta"):
        unet = Kandinsky3UNet.from_config(config or real_unet_config())
        base = sum(p.numel() for p in unet.parameters())
        add_lora(unet, spec)
    lora = sum(p.numel() for p in lora_parameters(unet))
    return {"unet": base, "lora": lora}


TEXT_ENCODER_JSON = Path(__file__).parent / "configs" / "text_encoder_config.json"


def real_text_encoder_config() -> dict[str, Any]:
    """FLAN-UL2's encoder as the pipeline ships it (kandinsky-community/kandinsky-3 text_encoder/config.json: d_model
    4096, 32 layers, d_ff 16384 gated-SiLU, 16 heads x d_kv 256, vocab 32128; sources in configs/SOURCES.md)."""
    return {k: v for k, v in json.loads(TEXT_ENCODER_JSON.read_text()).items() if not k.startswith("_")}


def count_text_encoder(config: dict | None = None) -> int:
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        enc = T5EncoderModel(T5Config(**(config or real_text_encoder_config())))
    return sum(p.numel() for p in enc.parameters())
