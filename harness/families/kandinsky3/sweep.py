"""`harness sweep kandinsky3`: what the generic sweep (harness/sweep.py) needs from this family, and the plan
`--dry-run` prints (LoRA parameters and memory of each cell on the real architecture, meta device)."""

from __future__ import annotations

from typing import Any

from harness.runs import Run
from harness.sweep import SweepTarget


class Kandinsky3Sweep(SweepTarget):
    kind = "kandinsky3"
    aliases = {"lora_targets": "lora.targets"}

    def matches(self, cfg) -> bool:
        from harness.families.kandinsky3.train import Kandinsky3Config

        return isinstance(cfg, Kandinsky3Config)

    def config_from_dict(self, d: dict[str, Any]):
        from harness.families.kandinsky3.train import config_from_dict

        return config_from_dict(d, where="sweep cell")

    def check(self, cfg) -> None:
        cfg.validate()

    def train(self, cfg, on_run) -> Run:
        from harness.families.kandinsky3 import train as tk

        return tk.train(cfg, on_run=on_run)

    def continue_run(self, run: Run) -> Run:
        from harness.families.kandinsky3.train import continue_run

        return continue_run(run)

    def finished(self, run: Run) -> bool:
        from harness.families.kandinsky3.train import ADAPTER_DIR
        from models.kandinsky3.lora import WEIGHT_NAME

        return (run.dir / ADAPTER_DIR / WEIGHT_NAME).is_file()

    def trainable(self, cfg) -> int | None:
        from models.kandinsky3.lora import count_parameters

        return count_parameters(cfg.lora.rank, cfg.lora)["lora"]


K3 = Kandinsky3Sweep()


def plan_table(cells: list[tuple[str, Any]]):
    from rich.table import Table

    from models.kandinsky3.memory import estimate

    t = Table(title="kandinsky3 LoRA sweep plan (real architecture, meta device)")
    for col in ("cell", "rank", "LoRA params", "GiB cached", "GiB encoder resident"):
        t.add_column(col, justify="left" if col == "cell" else "right")
    for label, cfg in cells:
        e = estimate(cfg.lora, cfg.loop.batch_size, cfg.data.resolution, cfg.loop.mixed_precision, cfg.base_dtype,
                     cfg.gradient_checkpointing)
        t.add_row(label, str(cfg.lora.rank), f"{e['lora_parameters']:,}", f"{e['cached_gib']:.2f}",
                  f"{e['encoder_resident_gib']:.2f}")
    return t
