"""Parameter counts of LoRA on the REAL Kandinsky 2.2 architectures, without weights and offline.

The two shipped JSON files (configs/prior.json, configs/decoder.json) are the architecture configs of
kandinsky-community/kandinsky-2-2-prior/prior and kandinsky-community/kandinsky-2-2-decoder/unet. The models are
built on the meta device (shapes only: no memory, no download, well under a second), the adapter is injected by peft
exactly as in training, and its parameters are counted. The result equals the paper's tables: prior 327,680 x r,
decoder 205,824 x r (291,072 x r with the added k/v projections).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from models.kandinsky.lora import LoraSpec, add_lora, count_lora_parameters

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
COMPONENTS = {"prior": "prior.json", "decoder": "decoder.json"}


def architecture_config(component: str) -> dict:
    """The shipped config of 'prior' or 'decoder' (keys starting with '_' are provenance, not arguments)."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {', '.join(COMPONENTS)}, got {component!r}")
    cfg = json.loads((CONFIG_DIR / COMPONENTS[component]).read_text(encoding="utf-8"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_on_meta(component: str, config: dict | None = None):
    """Instantiate the architecture with every tensor on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import PriorTransformer, UNet2DConditionModel

    cls = PriorTransformer if component == "prior" else UNet2DConditionModel
    cfg = config if config is not None else architecture_config(component)
    with init_empty_weights():
        return cls(**cfg)


@dataclass(frozen=True)
class LoraCount:
    component: str
    rank: int
    alpha: float
    targets: str
    dora: bool
    trainable: int  # LoRA (and DoRA magnitude) parameters
    base: int  # frozen parameters of the component

    def optimizer_bytes(self, param_bytes: int = 4) -> int:
        """AdamW memory for the trainable parameters: weights + grads + exp_avg + exp_avg_sq, fp32."""
        return 4 * param_bytes * self.trainable


@lru_cache(maxsize=2)
def _meta_model(component: str):
    # Building the 1-1.25 B parameter graph takes seconds even without storage; adapters are cheap to add/remove.
    model = build_on_meta(component)
    return model, sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=64)
def _count(component: str, rank: int, alpha: float, targets: str, dora: bool, rslora: bool) -> tuple[int, int]:
    model, base = _meta_model(component)
    add_lora(model, LoraSpec(rank=rank, alpha=alpha, targets=targets, dora=dora, rslora=rslora), adapter_name="count")
    try:
        return count_lora_parameters(model), base
    finally:
        model.delete_adapters("count")


def count_lora(component: str, spec: LoraSpec) -> LoraCount:
    """Trainable parameters of `spec` on the real `component` ('prior' or 'decoder'), computed on the meta device."""
    trainable, base = _count(component, spec.rank, spec.lora_alpha, spec.targets, spec.dora, spec.rslora)
    return LoraCount(component, spec.rank, spec.lora_alpha, spec.targets, spec.dora, trainable, base)


def architecture_summary(component: str) -> dict:
    """Parameter totals and attention-layer shapes of the real architecture (for `harness models info`)."""
    import torch.nn as nn

    model = build_on_meta(component)
    total = sum(p.numel() for p in model.parameters())
    per_target: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 2)
        key = ".".join(leaf[-2:]) if name.endswith("to_out.0") else leaf[-1]
        if isinstance(mod, nn.Linear) and key in ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"):
            n, _ = per_target.get(key, (0, 0))
            per_target[key] = (n + 1, mod.in_features + mod.out_features)
    return {"component": component, "parameters": total, "targets": per_target}
