"""`harness sweep status SWEEP_DIR [--cancel]`: every cell of a sweep as sweep.json (the one truth) and the cells'
own training logs say: queued / running (step of max steps, last loss) / done (FID with its bootstrap 95 %
interval) / failed (the error's first line and the log to read) / cancelled, with the launcher's job ids.
`--cancel` cancels the cells still queued (SLURM: scancel of their array tasks; local: the scheduler skips them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.launchers.state import SweepStore, cells_of, effective


def last_train_line(run_dir: str | None) -> dict[str, Any] | None:
    """The last training-loss line of a run's train_log.jsonl (step, loss), or None."""
    from harness.trainer import TRAIN_LOG

    if not run_dir:
        return None
    path = Path(run_dir) / TRAIN_LOG
    if not path.is_file():
        return None
    last = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if "loss" in rec:
                last = rec
    return last


def _max_steps(run_dir: str | None) -> int | None:
    if not run_dir or not (Path(run_dir) / "config.json").is_file():
        return None
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())["loop"]["max_steps"]
    except (KeyError, TypeError, ValueError):
        return None


def cell_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell: label, status (as a reader takes it: a silently dead cell is failed), job, devices, detail."""
    key, cells = cells_of(record)
    items = sorted(cells.items(), key=lambda kv: int(kv[0])) if key == "ranks" else list(cells.items())
    rows = []
    for label, e in items:
        status, error = effective(e)
        detail = ""
        if status == "running":
            line = last_train_line(e.get("run"))
            stage = e.get("stage", "train")
            if stage == "train" and line is not None:
                total = _max_steps(e.get("run"))
                detail = f"step {line['step']}" + (f"/{total}" if total else "") + \
                    (f", loss {line['loss']:.4f}" if isinstance(line.get("loss"), (int, float)) else "")
            else:
                detail = stage
        elif status == "done":
            fid = (e.get("intervals") or {}).get("fid")
            if fid:
                half = (fid["high"] - fid["low"]) / 2
                detail = f"FID {fid['value']:.2f} ± {half:.2f} [{fid['low']:.2f}, {fid['high']:.2f}]"
            else:
                detail = e.get("metrics_summary") or f"{e.get('n_images', 0)} images, not scored"
        elif status == "failed":
            first = (error or "").strip().splitlines()[0] if (error or "").strip() else "failed"
            detail = first + (f" (log: {e['log']})" if e.get("log") else "")
        rows.append({"cell": label, "status": status, "job": e.get("job_id") or "-", "launcher": e.get("launcher"),
                     "devices": e.get("devices") or "-", "run": e.get("run"), "detail": detail})
    return rows


def status_table(sweep_dir: str | Path):
    from rich.table import Table

    record = SweepStore(Path(sweep_dir) / "sweep.json").read()
    if not record:
        raise UserError("no sweep here (sweep.json is missing)", sweep_dir)
    rows = cell_rows(record)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    t = Table(title=f"{record.get('family')} sweep {Path(sweep_dir)}: "
                    + ", ".join(f"{n} {s}" for s, n in counts.items()))
    t.add_column("rank" if "ranks" in record else "cell", no_wrap=True)
    for col in ("status", "launcher", "job id", "devices", "run", "progress / result / error"):
        t.add_column(col)
    colour = {"done": "green", "failed": "red", "running": "cyan", "queued": "yellow"}
    for r in rows:
        st = f"[{colour[r['status']]}]{r['status']}[/]" if r["status"] in colour else r["status"]
        t.add_row(r["cell"], st, r["launcher"] or "-", r["job"], r["devices"],
                  Path(r["run"]).name if r["run"] else "-", r["detail"])
    return t


def cancel_queued(sweep_dir: str | Path) -> list[str]:
    """Cancel the queued cells: SLURM array tasks are scancel-ed through submitit; a local scheduler skips them.
    Returns the cancelled labels."""
    store = SweepStore(Path(sweep_dir) / "sweep.json")
    record = store.read()
    if not record:
        raise UserError("no sweep here (sweep.json is missing)", sweep_dir)
    key, cells = cells_of(record)
    queued = [label for label, e in cells.items() if e.get("status") == "queued"]
    for label in queued:
        e = cells[label]
        if e.get("launcher") == "slurm" and e.get("job_id"):
            from harness.launchers.slurm import cancel_job

            cancel_job(Path(sweep_dir), e["job_id"])

    def mark(rec: dict) -> None:
        for label in queued:
            c = rec[key][label]
            if c.get("status") == "queued":  # it may have started meanwhile: a running cell is not cancelled here
                c["status"] = "cancelled"
    store.update(mark)
    return queued
