"""`harness sweep ... --launcher local --devices 0,1,2,3 [--gpus-per-cell K]`: up to floor(devices / K) cells at
once on this machine, each device group pinned with CUDA_VISIBLE_DEVICES; `--devices cpu:N` runs N cells at once on
CPU, each with one torch thread (N processes with several threads each on N cores oversubscribe them and run many
times slower).

A single-device group (one GPU, or one CPU slot) keeps one long-lived worker process (harness/launchers/worker.py)
that runs the cells handed to it one after another, so the process start-up (Python, torch, diffusers, the models'
modules: seconds, more than a short cell's work) is paid once per device group, not once per cell. On a machine
without CUDA the CPU slots' workers are forked from the scheduler after it has imported, once, what every cell
imports first, so they start at once (`_Forked`); GPU workers start fresh (`python -m harness.launchers.worker`),
as a CUDA driver does not survive a fork. A K-GPU group (K > 1) runs each cell as its own `accelerate launch` of
`harness sweep-cell` with K processes.
The parent only schedules: it hands a free device group the next queued cell, waits, and records a cell whose
process died without recording its end as failed (with its log's last line); a dead worker is replaced for the
next cell. Each cell's stdout/stderr go to <sweep dir>/logs/<cell>.log (a worker's own, between cells, to
logs/worker-<slot>.log)."""

from __future__ import annotations

import os
import re
import signal
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


def worker_command(sweep_dir: Path, group: list[str], launcher: str = "local") -> list[str]:
    """The long-lived process of one single-device group (harness/launchers/worker.py): runs the cells it is handed
    one after another, paying the process start-up once."""
    return [sys.executable, "-m", "harness.launchers.worker", str(sweep_dir), "--launcher", launcher,
            "--devices", ",".join(group)]


class _Forked:
    """A worker forked from the scheduler (CPU slots on a machine without CUDA): it starts with every module the
    scheduler has imported (torch, the family's modules warmed by `LocalLauncher._warm`), so a CPU slot's start-up
    costs nothing, as DataLoader workers do. Runs harness/launchers/worker.py's `serve` with one torch thread (a
    forked process must not use an OpenMP pool of its parent: with one thread it has none). The subset of Popen the
    scheduler uses."""

    def __init__(self, sweep_dir: Path, group: list[str], log, inherited: list[int], run: Any = None):
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for fd in (req_w, rep_r, *inherited):  # other workers' pipes: their EOF must not wait for us
                    os.close(fd)
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                code = _forked_worker(sweep_dir, group, os.fdopen(req_r, "r", encoding="utf-8"), rep_w, run)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported in the worker's log, then the worker ends
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        self.pid = pid
        self.stdin = os.fdopen(req_w, "wb")
        self.stdout = os.fdopen(rep_r, "rb", buffering=0)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


def _forked_worker(sweep_dir: Path, group: list[str], requests, reply_fd: int, run: Any) -> int:
    os.environ.update({k: v for k, v in cell_env(group).items() if k in (
        "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "HARNESS_NO_PROGRESS")})
    import torch

    torch.set_num_threads(1)
    from harness.launchers.worker import _run_cell, serve

    serve(sweep_dir, requests, reply_fd, devices=",".join(group), run=run or _run_cell)
    return 0


def can_fork(groups: list[list[str]]) -> bool:
    """Whether CPU slots may be forked workers: Linux/macOS fork, every group a CPU slot, and no CUDA device (a forked
    child cannot use a CUDA driver its parent initialised; with GPUs present the workers are started fresh)."""
    if not hasattr(os, "fork") or not all(g == ["cpu"] for g in groups):
        return False
    import torch

    return not torch.cuda.is_available()


@dataclass
class _Slot:
    group: list[str]
    proc: subprocess.Popen | None = None  # the slot's worker, or (multi-GPU) its current cell's process
    label: str | None = None  # the cell it runs now
    log: Any = None  # the file its stderr goes to
    buf: bytes = b""


@dataclass
class LocalLauncher:
    devices: str = "cpu:1"
    gpus_per_cell: int = 1
    poll_s: float = 0.5
    fork: bool | None = None  # CPU slots as workers forked from here; None: when `can_fork`
    cell_runner: Any = None  # what a forked worker runs per cell (tests); None: harness/launchers/worker.py's

    name = "local"

    def __post_init__(self) -> None:
        self.groups = parse_devices(self.devices, self.gpus_per_cell)

    def owns(self, entry: dict[str, Any]) -> bool:
        return False  # a local cell "running" here with a live process belongs to another sweep command: left alone

    def describe(self, entry: dict[str, Any]) -> str:
        return f"pid {entry.get('pid')}"

    def launch(self, store: SweepStore, labels: list[str]) -> None:
        """Hand the queued cells to the device groups as they free up. A single-device group keeps one worker
        process for all its cells (start-up paid once); a multi-GPU group starts one `accelerate launch` of
        `harness sweep-cell` per cell."""
        sweep_dir = store.path.parent
        logs = sweep_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        key, _ = cells_of(store.read())
        for label in labels:  # the whole plan is visible in `harness sweep status` from the start
            store.patch_cell(key, label, status="queued", launcher=self.name, queued=now(), error=None,
                             log=str(logs / f"{safe_name(label)}.log"))
        queue = list(labels)
        slots = [_Slot(g) for g in self.groups]
        workers = all(len(g) == 1 for g in self.groups)
        forked = workers and (can_fork(self.groups) if self.fork is None else self.fork)
        if forked and queue:
            self._warm(store, queue[0])
        try:
            while queue or any(s.label for s in slots):
                for n, slot in enumerate(slots):
                    while slot.label is None and queue:
                        self._start(store, key, sweep_dir, n, slot, queue.pop(0), workers, forked, slots)
                if workers:
                    self._read_replies(store, key, slots)
                for slot in slots:  # a process gone while a cell was assigned: died, or (per-cell) finished
                    if slot.label is not None and slot.proc is not None and slot.proc.poll() is not None:
                        self._read_replies(store, key, [slot], wait=0)
                        if slot.label is not None:
                            self._finish(store, key, slot, slot.proc.returncode)
                        self._close(slot)
                if not workers and any(s.label for s in slots):
                    time.sleep(self.poll_s)
            for slot in slots:  # every cell handed out: the workers end with their stdin
                self._close(slot, wait=True)
        except BaseException:
            for slot in slots:  # Ctrl-C: the cells stop with the sweep (a rerun resumes)
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.terminate()
            for slot in slots:
                if slot.proc is not None:
                    try:
                        slot.proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        slot.proc.kill()
                self._close(slot)
            raise

    @staticmethod
    def _warm(store: SweepStore, label: str) -> None:
        """Before forking the CPU workers: import here, once, what every cell imports first (the family's modules,
        diffusers, transformers, peft: several seconds), by counting the first cell's trainable parameters as each
        cell does; each forked worker then starts with them."""
        from harness.launchers.cell import cell_config

        try:
            target, _key, cfg = cell_config(store.read(), label)
            target.trainable(cfg)
        except Exception:  # noqa: BLE001 - a warm-up only: the cell itself reports any real error
            pass

    def _start(self, store: SweepStore, key: str, sweep_dir: Path, n: int, slot: _Slot, label: str,
               workers: bool, forked: bool = False, slots: list[_Slot] = ()) -> None:
        from harness.progress import console

        entry = cells_of(store.read())[1].get(label, {})
        if entry.get("status") == "cancelled":  # `harness sweep status --cancel` meanwhile
            console.print(f"{label}: cancelled, not started")
            return
        logs = sweep_dir / "logs"
        group = slot.group
        if workers:
            if slot.proc is not None and slot.proc.poll() is not None:  # died between cells
                self._close(slot)
            if slot.proc is None:
                slot.log = open(logs / f"worker-{n}.log", "ab")
                if forked:
                    inherited = [f.fileno() for s in slots if s.proc is not None
                                 for f in (s.proc.stdin, s.proc.stdout) if f is not None and not f.closed]
                    slot.proc = _Forked(sweep_dir, group, slot.log, inherited, self.cell_runner)
                else:
                    slot.proc = subprocess.Popen(worker_command(sweep_dir, group), env=cell_env(group),
                                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slot.log)
                slot.buf = b""
            try:
                slot.proc.stdin.write(f"{label}\n".encode())
                slot.proc.stdin.flush()
            except BrokenPipeError:  # died between cells: noticed by the poll, the cell recorded failed there
                pass
        else:
            slot.log = open(logs / f"{safe_name(label)}.log", "ab")
            slot.proc = subprocess.Popen(cell_command(sweep_dir, label, group), env=cell_env(group),
                                         stdout=slot.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        slot.label = label
        store.patch_cell(key, label, devices=",".join(group), pid=slot.proc.pid, job_id=str(slot.proc.pid))
        console.print(f"{label}: started on {','.join(group)} (pid {slot.proc.pid}, log "
                      f"{logs / (safe_name(label) + '.log')})")

    def _read_replies(self, store: SweepStore, key: str, slots: list[_Slot], wait: float | None = None) -> None:
        """Take the workers' `label\tstatus` answers (waiting up to poll_s for one) and free their slots."""
        import select

        live = {s.proc.stdout.fileno(): s for s in slots if s.proc is not None and s.proc.stdout is not None
                and s.label is not None}
        if not live:
            return
        ready, _, _ = select.select(list(live), [], [], self.poll_s if wait is None else wait)
        for fd in ready:
            slot = live[fd]
            chunk = os.read(fd, 4096)
            slot.buf += chunk
            while b"\n" in slot.buf:
                line, slot.buf = slot.buf.split(b"\n", 1)
                label = line.decode(errors="replace").split("\t", 1)[0]
                if label == slot.label:
                    self._finish(store, key, slot, None)

    def _finish(self, store: SweepStore, key: str, slot: _Slot, code: int | None) -> None:
        """The cell of `slot` ended (its worker answered: code None) or its process exited with `code`."""
        from harness.progress import console

        label, slot.label = slot.label, None
        log = store.path.parent / "logs" / f"{safe_name(label)}.log"
        entry = cells_of(store.read())[1].get(label, {})
        if entry.get("status") in ("running", "queued"):  # died before recording its end (killed, OOM-killed)
            first = _last_error_line(log) or (_last_error_line(Path(slot.log.name)) if slot.log else None)
            how = f"exited with code {code}" if code is not None else "ended"
            store.patch_cell(key, label, status="failed", ended=now(),
                             error=f"cell process {how} without recording its end: {first or how}")
            entry = cells_of(store.read())[1][label]
        console.print(f"{label}: {entry.get('status')}" + (f" ({entry.get('error')})" if entry.get("error") else ""))

    @staticmethod
    def _close(slot: _Slot, wait: bool = False) -> None:
        proc = slot.proc
        if proc is not None:
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            if wait or proc.poll() is not None:
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
                slot.proc = None
        if slot.log is not None and slot.proc is None:
            slot.log.close()
            slot.log = None


def _last_error_line(log: Path) -> str | None:
    try:
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1].strip()[:300] if lines else None
