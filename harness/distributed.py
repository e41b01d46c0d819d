"""The process-group state shared by training and generation under `accelerate launch` / torchrun.

Always go through `state()`: accelerate's `PartialState()` without `cpu=True` on a machine with no GPU silently
sets up a *single*-process state under a multi-process launch (and the state is a process-wide singleton, so
whoever creates it first decides for everyone). Barriers then do nothing and every rank thinks it is rank 0.
"""

from __future__ import annotations

import os


def cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def state():
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def launched() -> bool:
    """True inside a multi-process launch (torchrun / accelerate launch with more than one process)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def pick_device(device: str | None):
    """`--device` of every command: auto/None = cuda when available, else cpu. A bad or unavailable device is a
    user error (one line, exit 2) before any work starts, not a traceback from deep inside torch."""
    import torch

    from harness.errors import UserError

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a torch device (use cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: unsupported device type {dev.type!r} (use cpu, cuda, cuda:N, auto)")
    return dev
