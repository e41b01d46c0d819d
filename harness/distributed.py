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
