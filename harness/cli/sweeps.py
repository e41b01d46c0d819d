"""`harness sweep status SWEEP_DIR [--cancel]` and the hidden `harness sweep-cell SWEEP_DIR CELL` that each cell
process or SLURM job of a launched sweep runs (harness/launchers); the `harness sweep KIND` commands themselves
come from the families (harness.cli.common.sweep_command)."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import existing_dir


def register(cli: click.Group, **groups: click.Group) -> None:
    groups["sweep"].add_command(status)
    cli.add_command(sweep_cell)


@click.command()
@click.argument("sweep_dir", type=existing_dir)
@click.option("--cancel", is_flag=True, help="Cancel the cells still queued (SLURM: scancel of their array tasks; "
                                             "--launcher local: the running scheduler skips them).")
def status(sweep_dir: Path, cancel: bool) -> None:
    """Every cell of a sweep: queued / running (step, loss) / done (FID ± its bootstrap 95 % interval) / failed
    (the error's first line and the log) / cancelled, with the launcher's job ids. A running cell whose heartbeat
    stopped (node lost, killed) shows as failed: rerunning the sweep command retries it.

    \b
    Example:
      harness sweep status runs/sweeps/kandinsky-prior-0123456789
    """
    import sys

    from rich.console import Console

    from harness.launchers.status import cancel_queued, status_table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    if cancel:
        done = cancel_queued(sweep_dir)
        console.print(f"cancelled {len(done)} queued cell(s)" + (f": {', '.join(done)}" if done else ""))
    console.print(status_table(sweep_dir))


@click.command("sweep-cell", hidden=True)
@click.argument("sweep_dir", type=existing_dir)
@click.argument("cell")
@click.option("--launcher", type=str, default="local", help="Recorded as the cell's launcher.")
@click.option("--job-id", type=str, default=None, help="Recorded as the cell's job id.")
@click.option("--devices", type=str, default=None,
              help="Recorded as the cell's devices (default: CUDA_VISIBLE_DEVICES).")
def sweep_cell(sweep_dir: Path, cell: str, launcher: str, job_id: str | None, devices: str | None) -> None:
    """Run one cell of a sweep (train -> generate -> score) from its sweep.json: what each process of
    `harness sweep ... --launcher local` runs."""
    import os

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():  # --devices cpu:N pins each cell to one thread: N cells on N cores
        import torch

        torch.set_num_threads(int(threads))
    from harness.errors import UserError
    from harness.launchers.cell import run_cell_from_record

    entry = run_cell_from_record(sweep_dir, cell, launcher=launcher, job_id=job_id, devices=devices)
    if entry.get("status") == "failed":
        raise UserError(f"cell {cell} failed: {entry.get('error')}", sweep_dir / "sweep.json")
