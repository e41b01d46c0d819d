"""`harness sweep kandinsky-prior|kandinsky-decoder`: what the generic sweep (harness/sweep.py) needs from this
family - how to train, continue and count a cell - and the rank plan of `--dry-run`."""

from __future__ import annotations

from typing import Any

from harness.errors import UserError
from harness.runs import Run
from harness.sweep import SweepTarget


class KandinskySweep(SweepTarget):
    # CLI option names whose config field is named otherwise (the others are the fields' own names).
    aliases = {"lora_targets": "lora.targets"}
    fixed = SweepTarget.fixed + ("component",)

    def __init__(self, component: str):
        self.component = component
        self.kind = f"kandinsky-{component}"

    def matches(self, cfg) -> bool:
        from harness.families.kandinsky22.train import KandinskyConfig

        return isinstance(cfg, KandinskyConfig) and cfg.component == self.component

    def config_from_dict(self, d: dict[str, Any]):
        from harness.families.kandinsky22.train import config_from_dict

        return config_from_dict(d, where="sweep cell")

    def check(self, cfg) -> None:
        from harness.families.kandinsky22.train import resolve_adapter

        cfg.validate()
        other = "decoder" if cfg.component == "prior" else "prior"
        resolve_adapter(cfg.decoder_adapter if other == "decoder" else cfg.prior_adapter, other)  # fail early
        check_bases(cfg)

    def train(self, cfg, on_run) -> Run:
        from harness.families.kandinsky22 import train as tk  # looked up per call: tests replace tk.train

        return tk.train(cfg, on_run=on_run)

    def continue_run(self, run: Run) -> Run:
        from harness.families.kandinsky22.train import continue_run

        return continue_run(run)

    def finished(self, run: Run) -> bool:
        from harness.families.kandinsky22.train import ADAPTER_DIR, WEIGHT_NAME

        return (run.dir / ADAPTER_DIR / WEIGHT_NAME).is_file()

    def trainable(self, cfg) -> int | None:
        from models.kandinsky.counting import count_lora

        return count_lora(cfg.component, cfg.lora).trainable  # of the real architecture


PRIOR = KandinskySweep("prior")
DECODER = KandinskySweep("decoder")


def check_bases(base) -> None:
    """Resolve the base pipelines once, before any rank: a wrong --prior/--decoder or a hub id that is not cached
    offline is one line for the whole sweep, not one traceback per rank."""
    from models.hub import resolve_source

    for which in ("prior", "decoder"):
        try:
            resolve_source(getattr(base, which), getattr(base, f"{which}_revision"))
        except FileNotFoundError as e:
            raise UserError(f"--{which}: {e}") from None


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def plan_rows(component: str, ranks: list[int], alpha: float | None = None, targets: str = "paper",
              dora: bool = False, rslora: bool = False) -> list[dict[str, Any]]:
    from models.kandinsky.counting import count_lora
    from models.kandinsky.lora import LoraSpec

    rows = []
    for r in ranks:
        try:
            spec = LoraSpec(rank=r, alpha=alpha, targets=targets, dora=dora, rslora=rslora)
        except ValueError as e:
            raise UserError(str(e)) from None
        c = count_lora(component, spec)
        rows.append({"rank": r, "alpha": c.alpha, "targets": targets, "dora": dora, "trainable": c.trainable,
                     "base": c.base, "optimizer_bytes": c.optimizer_bytes()})
    return rows


def plan_table(component: str, ranks: list[int], alpha: float | None = None, targets: str = "paper",
               dora: bool = False, rslora: bool = False):
    from rich.table import Table

    rows = plan_rows(component, ranks, alpha, targets, dora, rslora)
    t = Table(title=f"kandinsky-{component} LoRA sweep plan (real architecture, meta device; "
                    f"base {rows[0]['base']:,} frozen parameters)")
    for col in ("rank", "alpha", "targets", "trainable params", "% of base", "AdamW memory (fp32 w+g+m+v)"):
        t.add_column(col, justify="left" if col == "targets" else "right")
    for r in rows:
        t.add_row(str(r["rank"]), f"{r['alpha']:g}", r["targets"] + (" +DoRA" if r["dora"] else ""),
                  f"{r['trainable']:,}", f"{100 * r['trainable'] / r['base']:.2f}",
                  _human_bytes(r["optimizer_bytes"]))
    return t


