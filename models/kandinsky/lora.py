"""LoRA on the Kandinsky 2.2 prior and decoder through peft's model-level API.

The paper's parameter tables are reproduced by `LoraConfig(r, lora_alpha=r, target_modules=[to_q, to_k, to_v,
to_out.0])` (prior 327,680 x r, decoder 205,824 x r). On the decoder the image embedding reaches attention only
through `add_k_proj` / `add_v_proj`, so "paper+added-kv" adds those two (291,072 x r); "paper" stays the default.

Adapters are written in diffusers' format, so a plain diffusers script loads them without this project:

    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    # torch_dtype= works on every diffusers >= 0.35 (0.40+ also reads dtype=, and warns that torch_dtype is deprecated)
    prior = KandinskyV22PriorPipeline.from_pretrained("kandinsky-community/kandinsky-2-2-prior",
                                                      torch_dtype=torch.float16)
    prior.prior.load_lora_adapter("runs/<prior-run>/final", prefix=None,
                                  weight_name="pytorch_lora_weights.safetensors")
    decoder = KandinskyV22Pipeline.from_pretrained("kandinsky-community/kandinsky-2-2-decoder",
                                                   torch_dtype=torch.float16)
    decoder.unet.load_lora_adapter("runs/<decoder-run>/final", prefix=None,
                                   weight_name="pytorch_lora_weights.safetensors")
    prior.to("cuda"); decoder.to("cuda")
    emb, neg = prior("Generate an image containing a polyp", generator=torch.Generator().manual_seed(0)).to_tuple()
    image = decoder(image_embeds=emb, negative_image_embeds=neg, height=256, width=256).images[0]

(The Kandinsky pipelines have no `load_lora_weights`; the LoRA rank/alpha/DoRA settings travel inside the
safetensors metadata, which `load_lora_adapter` reads.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
META_NAME = "adapter_meta.json"

PAPER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "paper": PAPER_TARGETS,
    "paper+added-kv": PAPER_TARGETS + ("add_k_proj", "add_v_proj"),
}
INIT_CHOICES = ("true", "gaussian")  # peft's init_lora_weights values that leave the base weights untouched
# Inits that rewrite the base weights (W <- W - B0 A0) or need a quantisation config: an adapter saved from them only
# reproduces the trained model on the rewritten base, so a plain diffusers load of the hub base would silently give
# other outputs (and the rewritten base is not saved). Refused rather than half supported.
REFUSED_INITS = {
    "pissa": "PiSSA moves the top singular directions out of the base weights, so the adapter needs the rewritten base",
    "olora": "OLoRA rewrites the base weights with a QR factor, so the adapter needs the rewritten base",
    "loftq": "LoftQ rewrites the base weights and needs a LoftQConfig of a quantised base",
}


@dataclass
class LoraSpec:
    """What a LoRA adapter is: rank, scaling, where it goes and how it is initialised."""

    rank: int = 4
    alpha: float | None = None  # None = rank (the paper's choice: scale alpha / r = 1)
    targets: str = "paper"  # a key of TARGET_PRESETS
    dora: bool = False
    rslora: bool = False
    init_lora_weights: str = "true"  # peft default: A Kaiming, B zero (adapter starts as the identity)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.targets not in TARGET_PRESETS:
            raise ValueError(f"LoRA targets {self.targets!r} unknown; choose {', '.join(TARGET_PRESETS)}")
        if self.init_lora_weights in REFUSED_INITS:
            raise ValueError(f"init_lora_weights {self.init_lora_weights!r} is not supported: "
                             f"{REFUSED_INITS[self.init_lora_weights]}; use 'true' (B = 0) or 'gaussian'")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"init_lora_weights {self.init_lora_weights!r} unknown; choose {', '.join(INIT_CHOICES)}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")

    def warnings(self) -> list[str]:
        if self.rslora and self.alpha is None:
            return [f"--rslora with alpha = rank (no --alpha): the scale alpha/sqrt(r) is sqrt({self.rank}) = "
                    f"{self.rank ** 0.5:.2f}, not 1; pass --alpha to choose it (e.g. --alpha {self.rank ** 0.5:g} "
                    "for scale 1)"]
        return []

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def target_modules(self) -> list[str]:
        return list(TARGET_PRESETS[self.targets])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alpha"] = self.lora_alpha
        d["target_modules"] = self.target_modules
        return d


def lora_config(spec: LoraSpec):
    from peft import LoraConfig

    init: bool | str = True if spec.init_lora_weights == "true" else spec.init_lora_weights
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        target_modules=spec.target_modules,
        use_dora=spec.dora,
        use_rslora=spec.rslora,
        init_lora_weights=init,
    )


def add_lora(model: nn.Module, spec: LoraSpec, adapter_name: str = "default") -> nn.Module:
    """Freeze every base weight of `model`, then inject a trainable LoRA adapter (kept in float32)."""
    model.requires_grad_(False)
    model.add_adapter(lora_config(spec), adapter_name=adapter_name)
    for p in lora_parameters(model):
        p.requires_grad_(True)
        if p.dtype != torch.float32 and p.device.type != "meta":
            # A half-precision adapter update underflows; the base may stay in bf16/fp16.
            p.data = p.data.float()
    return model


def is_lora_name(name: str) -> bool:
    return "lora_" in name


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_lora_name(n)]


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not is_lora_name(n)}


def count_lora_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in lora_parameters(model))


def write_adapter(model: nn.Module, out_dir: str | Path, meta: dict[str, Any], adapter_name: str = "default") -> Path:
    """Write the adapter files into an existing (e.g. temporary) folder; see `save_adapter` for the atomic version."""
    out_dir = Path(out_dir)
    model.save_lora_adapter(out_dir, adapter_name=adapter_name, weight_name=WEIGHT_NAME)
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def save_adapter(model: nn.Module, out_dir: str | Path, meta: dict[str, Any], adapter_name: str = "default") -> Path:
    """Write `pytorch_lora_weights.safetensors` (diffusers format) + `adapter_meta.json` into `out_dir`, atomically:
    both files are written into a temp folder beside it that is renamed into place, so a reader never sees a
    weight file without its metadata."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_adapter(model, tmp, meta, adapter_name)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def adapter_content_hash(adapter_dir: str | Path) -> str:
    """sha256 of the adapter's tensors (names, dtypes, shapes, values). Not of the file: the header embeds peft's
    config, whose target-module set is written in a process-dependent order, so equal adapters can differ in bytes."""
    import hashlib

    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = load_file(str(Path(adapter_dir) / WEIGHT_NAME))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    p = Path(adapter_dir) / META_NAME
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def load_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load an adapter written by `save_adapter` (or any diffusers LoRA file without a prefix) into `model`."""
    model.load_lora_adapter(str(adapter_dir), prefix=None, weight_name=WEIGHT_NAME, adapter_name=adapter_name)
    return model
