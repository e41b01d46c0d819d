"""sweep.json as the one truth of a sweep that many processes (local cell processes, SLURM jobs) write at once.

Every change is a read-modify-write of the whole file under a lock file beside it (`sweep.json.lock`, the
`filelock` package: a lock *file*, so it also holds across NFS where `fcntl` locks alone do not), and the write
itself is atomic (harness.io: temp file + rename), so a reader never sees half a file and no writer loses
another's update. Per cell the record holds: status (queued / running / done / failed / cancelled), run directory
(before training starts), launcher, job id, devices, host and pid, start / end times and a heartbeat that the
running cell refreshes every HEARTBEAT_S seconds. A running cell whose heartbeat is older than STALE_FACTOR
heartbeats (node lost, SIGKILL) or whose process on this host is gone reads as failed, so a rerun retries it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from harness.io import read_json, write_json

LOCK_TIMEOUT_S = 600  # a writer holds the lock for one small JSON write; waiting this long means a stuck lock
STALE_FACTOR = 4  # heartbeats missed before a running cell counts as dead


def heartbeat_s() -> float:
    """Seconds between a running cell's heartbeats (HARNESS_SWEEP_HEARTBEAT_S; 30 s by default: one small write
    per cell every 30 s is nothing next to training, and a lost node shows as failed within 2 minutes)."""
    return float(os.environ.get("HARNESS_SWEEP_HEARTBEAT_S", "30"))


def now() -> float:
    return time.time()


class SweepStore:
    """Locked, atomic access to one sweep.json."""

    def __init__(self, path: str | Path):
        from filelock import FileLock

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)

    def read(self) -> dict[str, Any]:
        with self._lock:
            return read_json(self.path) if self.path.is_file() else {}

    def update(self, fn: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply `fn` to the current record and write it back, all under the lock; returns what `fn` returns."""
        with self._lock:
            record = read_json(self.path) if self.path.is_file() else {}
            out = fn(record)
            write_json(self.path, record)
            return out

    def put_cell(self, key: str, label: str, entry: dict[str, Any]) -> None:
        """Replace one cell's entry (the process running a cell owns its entry)."""
        def put(rec: dict) -> None:
            rec.setdefault(key, {})[label] = entry
        self.update(put)

    def patch_cell(self, key: str, label: str, **fields: Any) -> dict[str, Any]:
        """Set some fields of one cell's entry, keeping the others; returns the new entry."""
        def patch(rec: dict) -> dict:
            e = rec.setdefault(key, {}).setdefault(label, {})
            e.update(fields)
            return dict(e)
        return self.update(patch)


def cells_of(record: dict[str, Any]) -> tuple[str, dict[str, dict]]:
    key = "ranks" if "ranks" in record else "cells"
    return key, record.get(key, {})


def _alive_here(entry: dict[str, Any]) -> bool | None:
    """Whether the cell's process is alive when it ran on this host (None: another host, or no pid recorded)."""
    if entry.get("host") != socket.gethostname() or not entry.get("pid"):
        return None
    try:
        os.kill(int(entry["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process not yet reaped by its (lost) parent is a zombie: dead all the same
        stat = Path(f"/proc/{int(entry['pid'])}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def effective(entry: dict[str, Any], at: float | None = None) -> tuple[str, str | None]:
    """(status, error) of a cell as a reader should take it: a "running" cell with a stale heartbeat, or whose
    process on this host is gone, is "failed" (it died without saying so)."""
    status = entry.get("status", "pending")
    if status != "running":
        return status, entry.get("error")
    at = now() if at is None else at
    beat = entry.get("heartbeat") or entry.get("started")
    if _alive_here(entry) is False:
        return "failed", f"the cell's process {entry.get('pid')} is gone without a word (killed)"
    if beat is not None and at - float(beat) > STALE_FACTOR * heartbeat_s():
        return "failed", (f"no heartbeat for {at - float(beat):.0f} s (process or node lost) on "
                          f"{entry.get('host', '?')}")
    return status, None


class Heartbeat:
    """A daemon thread refreshing a cell's heartbeat in sweep.json while the cell runs."""

    def __init__(self, store: SweepStore, key: str, label: str, entry: dict[str, Any]):
        self.store, self.key, self.label, self.entry = store, key, label, entry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"heartbeat-{label}")

    def _loop(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            t = now()
            self.entry["heartbeat"] = t
            try:
                self.store.patch_cell(self.key, self.label, heartbeat=t)
            except Exception:  # noqa: BLE001 - a missed beat is retried; it must never kill the cell
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
