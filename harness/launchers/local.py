"""`harness sweep ... --launcher local --devices 0,1,2,3 [--gpus-per-cell K]`: up to floor(devices / K) cells at
once on this machine, each its own `harness sweep-cell` process pinned to its devices with CUDA_VISIBLE_DEVICES
(K > 1: under `accelerate launch` with K processes); `--devices cpu:N` runs N cells at once on CPU, each with one
torch thread (N processes with several threads each on N cores oversubscribe them and run many times slower).
The parent only schedules: it hands a free device group to the next queued cell, waits, and records a cell whose
process exited without recording its end as failed (with its log). Each cell's stdout/stderr go to
<sweep dir>/logs/<cell>.log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.launchers.state import SweepStore, cells_of, now


def parse_devices(text: str, gpus_per_cell: int = 1) -> list[list[str]]:
    """`0,1,2,3` -> device groups of `gpus_per_cell` GPU ids ([["0"], ["1"], ...]); `cpu:N` -> N CPU slots."""
    text = str(text).strip()
    m = re.fullmatch(r"cpu(?::(\d+))?", text)
    if m:
        n = int(m.group(1) or 1)
        if n < 1:
            raise UserError(f"--devices cpu:N needs N >= 1, got {text!r}")
        if gpus_per_cell != 1:
            raise UserError("--gpus-per-cell applies to GPUs; --devices cpu:N runs N one-process cells")
        return [["cpu"] for _ in range(n)]
    ids = [d.strip() for d in text.split(",") if d.strip()]
    if not ids or not all(re.fullmatch(r"\d+", d) for d in ids):
        raise UserError(f"--devices takes GPU ids (0,1,2,3) or cpu:N, got {text!r}")
    if len(set(ids)) != len(ids):
        raise UserError(f"--devices lists a GPU twice: {text!r}")
    if len(ids) < gpus_per_cell:
        raise UserError(f"--gpus-per-cell {gpus_per_cell} needs at least that many --devices, got {len(ids)}")
    n = len(ids) // gpus_per_cell  # floor: GPUs left over are not used
    return [ids[i * gpus_per_cell:(i + 1) * gpus_per_cell] for i in range(n)]


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def cell_command(sweep_dir: Path, label: str, group: list[str], launcher: str = "local") -> list[str]:
    """The command of one cell process: `python -m harness sweep-cell ...`, under `accelerate launch` for a
    multi-GPU cell."""
    args = ["-m", "harness", "sweep-cell", str(sweep_dir), label, "--launcher", launcher,
            "--devices", ",".join(group)]
    if len(group) > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(len(group)),
                "--multi_gpu", *args]
    return [sys.executable, *args]


def cell_env(group: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    # the cell process imports this same harness (a source checkout run with PYTHONPATH, or the installed one)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["HARNESS_NO_PROGRESS"] = "1"  # N cells' bars interleaved in one terminal are noise; the log has the lines
    if group == ["cpu"]:
        env["CUDA_VISIBLE_DEVICES"] = ""
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
    return env


@dataclass
class LocalLauncher:
    devices: str = "cpu:1"
    gpus_per_cell: int = 1
    poll_s: float = 0.5

    name = "local"

    def __post_init__(self) -> None:
        self.groups = parse_devices(self.devices, self.gpus_per_cell)

    def owns(self, entry: dict[str, Any]) -> bool:
        return False  # a local cell "running" here with a live process belongs to another sweep command: left alone

    def describe(self, entry: dict[str, Any]) -> str:
        return f"pid {entry.get('pid')}"

    def launch(self, store: SweepStore, labels: list[str]) -> None:
        from harness.progress import console

        sweep_dir = store.path.parent
        logs = sweep_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        key, _ = cells_of(store.read())
        for label in labels:  # the whole plan is visible in `harness sweep status` from the start
            store.patch_cell(key, label, status="queued", launcher=self.name, queued=now(), error=None,
                             log=str(logs / f"{safe_name(label)}.log"))
        queue = list(labels)
        free = list(range(len(self.groups)))
        running: dict[int, tuple[subprocess.Popen, str, Any]] = {}
        try:
            while queue or running:
                while queue and free:
                    label = queue.pop(0)
                    entry = cells_of(store.read())[1].get(label, {})
                    if entry.get("status") == "cancelled":  # `harness sweep status --cancel` meanwhile
                        console.print(f"{label}: cancelled, not started")
                        continue
                    slot = free.pop(0)
                    group = self.groups[slot]
                    log = open(logs / f"{safe_name(label)}.log", "ab")
                    proc = subprocess.Popen(cell_command(sweep_dir, label, group), env=cell_env(group),
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                    store.patch_cell(key, label, devices=",".join(group), pid=proc.pid, job_id=str(proc.pid))
                    console.print(f"{label}: started on {','.join(group)} (pid {proc.pid}, log {log.name})")
                    running[slot] = (proc, label, log)
                for slot, (proc, label, log) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    log.close()
                    del running[slot]
                    free.append(slot)
                    self._after(store, key, label, code, log.name)
                if running:
                    time.sleep(self.poll_s)
        except BaseException:
            for proc, label, log in running.values():  # Ctrl-C: the cells stop with the sweep (a rerun resumes)
                proc.terminate()
            for proc, label, log in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
            raise

    def _after(self, store: SweepStore, key: str, label: str, code: int, log: str) -> None:
        from harness.progress import console

        entry = cells_of(store.read())[1].get(label, {})
        if entry.get("status") in ("running", "queued"):  # died before recording its end (killed, OOM-killed)
            first = _last_error_line(Path(log)) or f"exit code {code}"
            store.patch_cell(key, label, status="failed", ended=now(),
                             error=f"cell process exited with code {code} without recording its end: {first}")
            entry = cells_of(store.read())[1][label]
        console.print(f"{label}: {entry.get('status')}" + (f" ({entry.get('error')})" if entry.get("error") else ""))


def _last_error_line(log: Path) -> str | None:
    try:
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1].strip()[:300] if lines else None
