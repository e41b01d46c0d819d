"""`harness sweep msdm-unet --grid KEY=V1,V2 ...`: what the generic sweep (harness/sweep.py) needs from MSDM."""

from __future__ import annotations

from typing import Any

from harness.runs import Run, open_run
from harness.sweep import SweepTarget


class UNetSweep(SweepTarget):
    kind = "msdm-unet"
    # CLI option names whose config field is named otherwise (the rest are the fields' own names).
    aliases = {"loss_kind": "loss", "sample_steps_gen": "sampling.steps"}

    def matches(self, cfg) -> bool:
        from harness.families.msdm.config import UNetConfig

        return isinstance(cfg, UNetConfig)

    def config_from_dict(self, d: dict[str, Any]):
        from harness.families.msdm.config import UNET_FAMILY, config_from_run

        return config_from_run(d, UNET_FAMILY)

    def check(self, cfg) -> None:
        from harness.families.msdm.config import VAE_FAMILY
        from harness.errors import UserError

        cfg.validate()
        vae = open_run(cfg.vae_run)  # fail once, before any cell, on a missing or wrong VAE run
        if vae.family != VAE_FAMILY:
            raise UserError(f"--vae must be an {VAE_FAMILY} run, this is {vae.family!r}", vae.dir)

    def train(self, cfg, on_run) -> Run:
        from harness.families.msdm import train as mt  # looked up per call, so tests can replace it

        return mt.train(cfg, on_run=on_run)

    def continue_run(self, run: Run) -> Run:
        from harness.families.msdm.train import continue_run

        return continue_run(run)

    def finished(self, run: Run) -> bool:
        from harness.trainer import FINAL_DIR

        return (run.dir / FINAL_DIR / "msdm.json").is_file()


UNET = UNetSweep()
