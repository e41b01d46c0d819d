"""Fine-tuning methods on Stable Diffusion components: which parameters train, and how they are added.

    full     every parameter of the chosen components (any subset of unet, text_encoder, vae);
    lora     peft LoRA on the U-Net (and optionally the text encoder), base weights frozen;
    dora     the same with peft's weight decomposition (use_dora: a trained magnitude vector per target);
    bitfit   bias terms only (Ben Zaken et al. 2022): every parameter named `*.bias`;
    difffit  DiffFit (Xie et al. 2023, "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple
             Parameter-Efficient Fine-Tuning"), see `add_difffit_scales`.

All of it works on the meta device too, so the parameter counts of the real SD 1.5 are exact and cost no memory.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
from torch import nn

METHODS = ("full", "lora", "dora", "bitfit", "difffit")
COMPONENTS = ("unet", "text_encoder", "vae")
# diffusers' train_text_to_image_lora.py targets (and the issue's 797,184 count at r=4).
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# diffusers' train_dreambooth_lora.py text-encoder targets (CLIP attention projections).
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SCALE_NAME = "difffit_scale"


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str], dora: bool = False) -> list[nn.Parameter]:
    """Inject a peft LoRA (or DoRA) adapter named "default": through diffusers' `add_adapter` on a diffusers model
    (as diffusers' LoRA trainers do), with peft's `inject_adapter_in_model` on the CLIP text tower (transformers'
    own `add_adapter` needs a newer peft than this project pins; the injected layers are the same). Returns the
    adapter parameters, made trainable. The base weights are left frozen."""
    from diffusers import ModelMixin
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True, use_dora=dora)
    if isinstance(model, ModelMixin):
        model.add_adapter(cfg)
    else:
        inject_adapter_in_model(cfg, model, adapter_name="default")
        model.peft_config = {"default": cfg}  # what get_peft_model_state_dict reads
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no module of {type(model).__name__} matches the LoRA targets {', '.join(targets)}")
    for p in params:
        p.requires_grad_(True)
    return params


def bias_parameters(model: nn.Module) -> list[nn.Parameter]:
    """BitFit: every bias term (convolutions, linears, norms)."""
    return [p for n, p in model.named_parameters() if n.endswith(".bias") or n == "bias"]


def _norm_weights(model: nn.Module) -> list[nn.Parameter]:
    norms = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
    return [m.weight for m in model.modules() if isinstance(m, norms) and getattr(m, "weight", None) is not None]


def _scaled_modules(unet: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
    """(module whose output is scaled, its last Linear) for attn1, attn2 and ff of every transformer block."""
    from diffusers.models.attention import BasicTransformerBlock

    out = []
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            for name in ("attn1", "attn2", "ff"):
                m = getattr(block, name, None)
                if m is None:
                    continue
                last = m.to_out[0] if name != "ff" else [x for x in m.net if isinstance(x, nn.Linear)][-1]
                out.append((m, last))
    return out


def _scale_hook(module: nn.Module, args, output):
    return output * getattr(module, SCALE_NAME)


def add_difffit_scales(unet: nn.Module) -> list[nn.Parameter]:
    """DiffFit on the SD U-Net: trainable bias terms, normalisation weights and per-block scale factors.

    The paper (Xie et al. 2023, Sec. 3 and its Algorithm 1) fine-tunes a DiT's bias terms, normalisation layers and
    class embedding, and adds learnable scale factors gamma = ones(d) (one per channel of the block width d,
    initialised to 1) that multiply the residual branches of every block: x <- x + gamma_1 * MHSA(x) and
    x <- x + gamma_2 * FFN(x). Translated to the SD U-Net, whose attention lives in `BasicTransformerBlock`s (there is
    no class embedding: text conditions through cross-attention; the same translation as mkshing/DiffFit-pytorch):
      * every transformer block gets three channel vectors gamma, multiplying the outputs of self-attention
        (attn1), cross-attention (attn2) and the feed-forward (ff) just before each is added to the residual
        stream (16 blocks on SD 1.5: 3 x 12,480 = 37,440 scale parameters); ResNet blocks get none;
      * every bias term and every GroupNorm/LayerNorm weight trains; everything else stays frozen.
    The scale is a forward hook on those modules, so the model's forward code is unchanged; gamma = 1 leaves the
    model exactly as loaded. `fold_difffit_scales` multiplies gamma into the rows of the last Linear of each scaled
    module (exact: the module output is affine in that layer) so the exported U-Net is a plain diffusers model.
    Returns the trainable parameters (biases, norm weights, scales), each once.
    """
    scales = []
    for m, last in _scaled_modules(unet):
        if not hasattr(m, SCALE_NAME):
            w = last.weight
            m.register_parameter(SCALE_NAME, nn.Parameter(torch.ones(w.shape[0], device=w.device, dtype=w.dtype)))
            m._difffit_hook = m.register_forward_hook(_scale_hook)
        scales.append(getattr(m, SCALE_NAME))
    params = _unique(bias_parameters(unet) + _norm_weights(unet) + scales)
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def fold_difffit_scales(unet: nn.Module) -> int:
    """Multiply each DiffFit scale into its module's last Linear (row-wise) and remove the scale and its hook;
    returns how many were folded."""
    n = 0
    for m, last in _scaled_modules(unet):
        if not hasattr(m, SCALE_NAME):
            continue
        g = getattr(m, SCALE_NAME).detach()
        last.weight.mul_(g.to(last.weight.dtype)[:, None])
        if last.bias is not None:
            last.bias.mul_(g.to(last.bias.dtype))
        m._difffit_hook.remove()
        del m._difffit_hook
        delattr(m, SCALE_NAME)
        n += 1
    return n


@contextlib.contextmanager
def difffit_folded(unet: nn.Module):
    """Fold the DiffFit scales for the duration of the block (e.g. to `save_pretrained` a plain diffusers U-Net),
    then put back exactly what was there: the unfolded weights (restored from copies, not divided) and the same
    scale Parameter objects with their hooks, so training can go on (an export of the best weights mid-training)."""
    saved = []
    for m, last in _scaled_modules(unet):
        if hasattr(m, SCALE_NAME):
            saved.append((m, last, last.weight.detach().clone(),
                          None if last.bias is None else last.bias.detach().clone(), getattr(m, SCALE_NAME)))
    fold_difffit_scales(unet)
    try:
        yield unet
    finally:
        with torch.no_grad():
            for m, last, w, b, gamma in saved:
                last.weight.copy_(w)
                if b is not None:
                    last.bias.copy_(b)
                m.register_parameter(SCALE_NAME, gamma)
                m._difffit_hook = m.register_forward_hook(_scale_hook)


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def apply_method(models: dict[str, nn.Module], method: str, components: Sequence[str], rank: int = 4,
                 alpha: float | None = None, unet_targets: Sequence[str] = UNET_LORA_TARGETS,
                 text_encoder_targets: Sequence[str] = TEXT_ENCODER_LORA_TARGETS) -> dict[str, list[nn.Parameter]]:
    """Freeze every model in `models` ({"unet", "text_encoder", "vae"}), then make the method's parameters of the
    named components trainable. Returns {component: trainable parameters} (components with none are left out)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    for m in models.values():
        freeze(m)
    out: dict[str, list[nn.Parameter]] = {}
    for comp in components:
        model = models[comp]
        if method == "full":
            params = list(model.parameters())
            for p in params:
                p.requires_grad_(True)
        elif method in ("lora", "dora"):
            targets = unet_targets if comp == "unet" else text_encoder_targets
            params = add_lora(model, rank, float(alpha if alpha is not None else rank), targets, dora=method == "dora")
        elif method == "bitfit":
            params = bias_parameters(model)
            for p in params:
                p.requires_grad_(True)
        else:
            params = add_difffit_scales(model)
        out[comp] = params
    return out


def count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
