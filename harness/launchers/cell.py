"""One cell of a sweep, rebuilt from sweep.json alone and run in this process: what `harness sweep-cell SWEEP_DIR
CELL` runs in each local cell process and each SLURM job (the parent only schedules)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.launchers.state import SweepStore, cells_of


def target_for(kind: str):
    """The registered SweepTarget of a run kind."""
    from harness.families.registry import kinds, load_ref

    for k in kinds():
        if k.sweep and k.name == kind:
            return load_ref(k.sweep)
    raise UserError(f"no registered family sweeps run kind {kind!r}")


def cell_config(record: dict[str, Any], label: str):
    """(target, key, typed config) of the cell `label`: the base config with the cell's values set."""
    from harness.sweep import RANK_PATH, _set_path

    target = target_for(record["family"])
    key, cells = cells_of(record)
    if label not in cells:
        raise UserError(f"the sweep has no cell {label!r}; its cells: {', '.join(cells)}")
    params = {RANK_PATH: int(label)} if key == "ranks" else cells[label]["params"]
    d = copy.deepcopy(record["base_config"])
    for path, value in params.items():
        _set_path(d, path, value)
    return target, key, target.config_from_dict(d)


def run_cell_from_record(sweep_dir: str | Path, label: str, launcher: str, job_id: str | None = None,
                         devices: str | None = None) -> dict[str, Any]:
    """Run (or continue) one cell of the sweep in `sweep_dir`: a killed training continues from its last
    checkpoint in the run dir sweep.json recorded (the trainer's exact resume)."""
    from harness.sweep import CellOptions, run_cell

    from harness.distributed import launched

    sweep_dir = Path(sweep_dir)
    store = SweepStore(sweep_dir / "sweep.json")
    record = store.read()
    if not record:
        raise UserError("no sweep here (sweep.json is missing)", sweep_dir)
    target, key, cfg = cell_config(record, label)
    if launched() and int(os.environ.get("RANK", "0")) != 0:
        # A K-GPU cell under `accelerate launch`: every rank trains (the trainer shares the run dir rank 0 creates),
        # rank 0 alone records the cell, generates and scores.
        return _train_only(target, cfg, cells_of(record)[1][label])
    prompts = Path(record["prompts"]["file"]).read_text(encoding="utf-8").splitlines()
    ro = record["run_options"]
    opts = CellOptions(sweep_dir=sweep_dir, prompts=prompts, prompts_sha256=record["prompts"]["sha256"],
                       gen_batch_size=ro["gen_batch_size"], device=ro["device"], score=ro["score"],
                       gen_seed=ro["gen_seed"])
    if devices is None:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    return run_cell(store, target, cfg, key, label, opts, launcher=launcher, job_id=job_id, devices=devices)


def _train_only(target, cfg, entry: dict[str, Any]) -> dict[str, Any]:
    from harness.runs import open_run

    run = open_run(entry["run"]) if entry.get("run") and Path(entry["run"]).is_dir() else None
    if run is None:
        target.train(cfg, lambda _run: None)
    elif not target.finished(run):
        target.continue_run(run)
    return entry
