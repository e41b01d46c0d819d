"""Optimizer factory of the SD family: the optimizers kohya's sd-scripts offer and da Silva et al. compared.

    adamw       torch.optim.AdamW (built in)
    adamw8bit   bitsandbytes.optim.AdamW8bit - needs CUDA (bitsandbytes' 8-bit kernels run on the GPU only)
    adafactor   transformers.optimization.Adafactor with a fixed learning rate (scale_parameter=False,
                relative_step=False, warmup_init=False: the arguments kohya's docs give for a set --lr)
    dadapt-sgd  dadaptation.DAdaptSGD (learning rate = multiplier of the adapted step, kohya uses 1.0)
    prodigy     prodigyopt.Prodigy (same convention)

bitsandbytes, dadaptation and prodigyopt are the `optim` extra: `pip install -e ".[optim]"`. transformers is a base
dependency, so Adafactor is always there.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from harness.errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "dadapt-sgd", "prodigy")
_EXTRA = {"adamw8bit": "bitsandbytes", "dadapt-sgd": "dadaptation", "prodigy": "prodigyopt"}


def _import(name: str):
    module = _EXTRA[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--optimizer {name} needs the {module} package: pip install -e \".[optim]\"") from None


def check_available(name: str) -> None:
    """One-line UserError when `name` cannot run here (unknown, package missing, or no CUDA for adamw8bit)."""
    if name not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name in _EXTRA:
        _import(name)
    if name == "adamw8bit" and not torch.cuda.is_available():
        raise UserError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on CUDA only)")


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """`groups`: torch parameter groups (each may carry its own "lr")."""
    check_available(name)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    mod = _import(name)
    if name == "adamw8bit":
        return mod.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)
    if name == "dadapt-sgd":
        return mod.DAdaptSGD(groups, lr=lr, weight_decay=weight_decay)
    return mod.Prodigy(groups, lr=lr, weight_decay=weight_decay)
