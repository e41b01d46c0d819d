"""One long-lived cell process per device group of `--launcher local`: it pays the process start-up (Python, torch,
diffusers, the families' modules: ~3-15 s, more than a short cell's own work) once per device group instead of once
per cell, then runs the cells the scheduler hands it one after another, exactly as `harness sweep-cell` runs one
(harness/launchers/cell.py: rebuilt from sweep.json alone, recorded there under its lock, a killed training
continued from its checkpoint on the next run).

    python -m harness.launchers.worker SWEEP_DIR --launcher local --devices 0

(On a machine without CUDA the CPU slots' workers are forked from the scheduler instead and run the same `serve`:
harness/launchers/local.py `_Forked`.)

Protocol: the scheduler writes one cell label per line on the worker's stdin; the worker runs it with its stdout
and stderr (file descriptors 1 and 2, so C-level messages too) sent to <sweep dir>/logs/<cell>.log, then answers
`<label>\\t<status>` on its original stdout; it exits at the end of its stdin. Between cells fds 1 and 2 go to the
worker's own stderr (the scheduler's <sweep dir>/logs/worker-<slot>.log). A cell that raises is recorded by
`run_cell` and the worker goes on with the next; a worker that dies (killed, out of memory) leaves its cell
"running" in sweep.json, and the scheduler records it failed with the last line of its log and starts a new worker.

The module imports no click and no CLI: only what a cell needs (the families' code is imported when the first cell
builds its config)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

CellRunner = Callable[[Path, str, str, "str | None"], dict[str, Any]]


def log_path(sweep_dir: Path, label: str) -> Path:
    from harness.launchers.local import safe_name

    return sweep_dir / "logs" / f"{safe_name(label)}.log"


@contextmanager
def redirected(path: Path) -> Iterator[None]:
    """fds 1 and 2 (anything a C library prints) and sys.stdout / sys.stderr appended to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    stream = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = stream
        yield
    finally:
        stream.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
        stream.close()


def _run_cell(sweep_dir: Path, label: str, launcher: str, devices: str | None) -> dict[str, Any]:
    from harness.launchers.cell import run_cell_from_record

    return run_cell_from_record(sweep_dir, label, launcher=launcher, devices=devices)


def serve(sweep_dir: str | Path, requests: TextIO, reply_fd: int, launcher: str = "local",
          devices: str | None = None, run: CellRunner = _run_cell) -> int:
    """Run every cell label read from `requests`, answering each on `reply_fd`; returns the number of cells run."""
    from harness.errors import UserError

    sweep_dir = Path(sweep_dir)
    n = 0
    for line in requests:
        label = line.rstrip("\n")
        if not label:
            continue
        status = "failed"
        with redirected(log_path(sweep_dir, label)):
            try:
                status = str(run(sweep_dir, label, launcher, devices).get("status"))
            except UserError as e:  # recorded in sweep.json by run_cell; the log gets the CLI's one line
                print(f"Error: {e}", file=sys.stderr)
            except Exception:  # noqa: BLE001 - before run_cell could record it (sweep.json unreadable, ...)
                traceback.print_exc()
        _release()
        os.write(reply_fd, f"{label}\t{status}\n".encode())
        n += 1
    return n


def _release() -> None:
    """Free the finished cell's models before the next one (the caching allocator would keep its GPU memory)."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m harness.launchers.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--launcher", default="local", help="recorded as each cell's launcher")
    ap.add_argument("--devices", default=None, help="recorded as each cell's devices (default: CUDA_VISIBLE_DEVICES)")
    args = ap.parse_args(argv)
    reply_fd = os.dup(1)  # the protocol channel; stray prints between cells go to the worker's stderr instead
    os.dup2(2, 1)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():  # --devices cpu:N: one thread per cell process, N processes on N cores
        import torch

        torch.set_num_threads(int(threads))
    serve(args.sweep_dir, sys.stdin, reply_fd, args.launcher, args.devices)


if __name__ == "__main__":
    main()
