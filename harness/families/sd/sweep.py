"""`harness sweep sd --grid KEY=V1,V2 ...`: what the generic sweep (harness/sweep.py) needs from the SD family.

The trainable-parameter count of a cell (sweep.json and `--dry-run`) is built on the meta device exactly as training
applies the method (models/sd/architecture.py): from the base folder's own configs when --base is a local pipeline
folder, else from the shipped SD 1.5 configs (offline, no weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.runs import Run
from harness.sweep import SweepTarget


class SDSweep(SweepTarget):
    kind = "sd"
    # CLI option names whose config field is named otherwise (the rest are the fields' own names).
    aliases = {"sample_scheduler": "generation.scheduler"}

    def matches(self, cfg) -> bool:
        from harness.families.sd.config import SDConfig

        return isinstance(cfg, SDConfig)

    def config_from_dict(self, d: dict[str, Any]):
        from harness.families.sd.config import config_from_dict

        return config_from_dict(d, where="sweep cell")

    def check(self, cfg) -> None:
        from harness.errors import UserError
        from models.hub import resolve_source

        from harness.families.sd.task import check_vae_resolution

        cfg.validate()
        check_vae_resolution(cfg)
        try:  # a wrong --base or a hub id not cached offline: one line for the whole sweep
            resolve_source(cfg.base, cfg.revision)
        except FileNotFoundError as e:
            raise UserError(f"--base: {e}") from None

    def train(self, cfg, on_run) -> Run:
        from harness.families.sd import task  # looked up per call, so tests can replace task.train

        return task.train(cfg, on_run=on_run)

    def continue_run(self, run: Run) -> Run:
        from harness.families.sd.task import continue_run

        return continue_run(run)

    def finished(self, run: Run) -> bool:
        from harness.families.sd.generate import FINAL

        return (run.dir / FINAL / "sd_meta.json").is_file()  # written last, in the renamed final dir

    def trainable(self, cfg) -> int | None:
        from models.sd.architecture import trainable_counts

        counts = trainable_counts(cfg.method, cfg.components, count_configs(cfg.base), rank=cfg.rank,
                                  alpha=cfg.alpha, unet_targets=cfg.lora_targets,
                                  text_encoder_targets=cfg.text_encoder_lora_targets)
        return sum(c["trainable"] for c in counts.values())


SD = SDSweep()


def count_configs(base: str) -> dict[str, dict] | None:
    """The configs a count is built from: a local pipeline folder's own, else None (the shipped SD 1.5 configs)."""
    from models.sd.architecture import component_configs

    folder = Path(base)
    return component_configs(folder) if (folder / "model_index.json").is_file() else None


def plan_table(cells: list[tuple[str, Any]]):
    """`harness sweep sd --dry-run`: trainable parameters per cell, on the meta device (no data, no weights)."""
    from rich.table import Table

    base = cells[0][1].base
    where = base if count_configs(base) is not None else "stable-diffusion-v1-5 architecture (shipped configs)"
    t = Table(title=f"sd sweep plan: trainable parameters per cell, meta device, {where}")
    for col in ("cell", "method", "components", "rank", "trainable params"):
        t.add_column(col, justify="right" if col in ("rank", "trainable params") else "left", no_wrap=col == "cell")
    for label, cfg in cells:
        t.add_row(label, cfg.method, ",".join(cfg.components), str(cfg.rank) if cfg.adapter else "-",
                  f"{SD.trainable(cfg):,}")
    return t
