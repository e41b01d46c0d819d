"""sweep.json as the one truth of a launched sweep (harness/launchers/state.py): concurrent writers lose no update,
a silently dead cell (stale heartbeat, vanished process) reads as failed, the status table, the --devices and
--time parsers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time

import pytest

from harness.errors import UserError


def _writer(path: str, worker: int, n: int) -> None:
    from harness.launchers.state import SweepStore

    store = SweepStore(path)
    for i in range(n):
        def bump(rec: dict) -> None:
            rec["counter"] = rec.get("counter", 0) + 1
            rec.setdefault("cells", {}).setdefault(f"w{worker}", {"seen": []})["seen"].append(i)
        store.update(bump)
        store.patch_cell("cells", f"w{worker}", heartbeat=time.time())


def test_concurrent_processes_lose_no_update(tmp_path):
    path = tmp_path / "sweep.json"
    n_proc, n = 4, 25
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, n)) for w in range(n_proc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rec = json.loads(path.read_text())
    assert rec["counter"] == n_proc * n  # every read-modify-write happened under the lock
    for w in range(n_proc):
        assert rec["cells"][f"w{w}"]["seen"] == list(range(n)) and "heartbeat" in rec["cells"][f"w{w}"]
    assert not [p for p in tmp_path.iterdir() if p.name not in ("sweep.json", "sweep.json.lock")]  # no temp left


def test_a_silently_dead_cell_reads_as_failed(monkeypatch):
    from harness.launchers.state import STALE_FACTOR, effective

    monkeypatch.setenv("HARNESS_SWEEP_HEARTBEAT_S", "10")
    t = 1000.0
    other_host = {"status": "running", "host": "node-lost", "pid": 1, "heartbeat": t}
    assert effective(other_host, at=t + 10) == ("running", None)
    status, err = effective(other_host, at=t + STALE_FACTOR * 10 + 1)
    assert status == "failed" and "no heartbeat" in err and "node-lost" in err
    # on this host a vanished process is failed at once, whatever its heartbeat
    proc = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    gone = {"status": "running", "host": socket.gethostname(), "pid": proc.pid, "heartbeat": time.time()}
    assert effective(gone)[0] == "failed"
    alive = dict(gone, pid=os.getpid())
    assert effective(alive) == ("running", None)
    assert effective({"status": "done"}) == ("done", None)


def test_heartbeat_thread_refreshes_the_record(tmp_path, monkeypatch):
    from harness.launchers.state import Heartbeat, SweepStore

    monkeypatch.setenv("HARNESS_SWEEP_HEARTBEAT_S", "0.05")
    store = SweepStore(tmp_path / "sweep.json")
    entry = {"status": "running", "heartbeat": 0.0}
    store.put_cell("cells", "a", dict(entry))
    with Heartbeat(store, "cells", "a", entry):
        time.sleep(0.3)
    assert store.read()["cells"]["a"]["heartbeat"] > 0 and entry["heartbeat"] > 0


def test_status_rows_for_each_state(tmp_path):
    from rich.console import Console

    from harness.launchers.state import SweepStore
    from harness.launchers.status import cell_rows, status_table

    run = tmp_path / "run-a"
    run.mkdir()
    (run / "train_log.jsonl").write_text(json.dumps({"step": 3, "loss": 0.25}) + "\n" +
                                         json.dumps({"step": 3, "val_loss": 0.5}) + "\n")
    (run / "config.json").write_text(json.dumps({"loop": {"max_steps": 8}}))
    now = time.time()
    cells = {
        "a": {"status": "running", "run": str(run), "stage": "train", "host": socket.gethostname(),
              "pid": os.getpid(), "heartbeat": now, "launcher": "local", "job_id": "11", "devices": "0"},
        "b": {"status": "done", "intervals": {"fid": {"value": 12.5, "low": 11.5, "high": 13.5}}},
        "c": {"status": "failed", "error": "RuntimeError: boom\nmore", "log": "/x/c.log"},
        "d": {"status": "queued", "launcher": "slurm", "job_id": "77_3"},
        "e": {"status": "running", "host": "gone", "pid": 5, "heartbeat": now - 3600},
    }
    store = SweepStore(tmp_path / "sweep.json")
    store.update(lambda rec: rec.update(family="kandinsky-prior", cells=cells))
    rows = {r["cell"]: r for r in cell_rows(store.read())}
    assert rows["a"]["status"] == "running" and rows["a"]["detail"] == "step 3/8, loss 0.2500"
    assert rows["b"]["detail"].startswith("FID 12.50 ± 1.00 [11.50, 13.50]")
    assert rows["c"]["status"] == "failed" and rows["c"]["detail"] == "RuntimeError: boom (log: /x/c.log)"
    assert rows["d"]["status"] == "queued" and rows["d"]["job"] == "77_3"
    assert rows["e"]["status"] == "failed" and "no heartbeat" in rows["e"]["detail"]
    console = Console(record=True, width=300)
    console.print(status_table(tmp_path))
    text = " ".join(console.export_text().split())  # the title wraps to the table's width
    assert "1 running, 1 done, 2 failed, 1 queued" in text and "77_3" in text and "step 3/8" in text


def test_local_cancel_marks_queued_cells(tmp_path):
    from harness.launchers.state import SweepStore
    from harness.launchers.status import cancel_queued

    store = SweepStore(tmp_path / "sweep.json")
    store.update(lambda rec: rec.update(family="x", cells={"a": {"status": "queued", "launcher": "local"},
                                                           "b": {"status": "done"}}))
    assert cancel_queued(tmp_path) == ["a"]
    assert store.read()["cells"]["a"]["status"] == "cancelled" and store.read()["cells"]["b"]["status"] == "done"


def test_device_and_time_parsers():
    from harness.launchers.local import parse_devices
    from harness.launchers.slurm import parse_slurm_options, parse_time

    assert parse_devices("0,1,2,3") == [["0"], ["1"], ["2"], ["3"]]
    assert parse_devices("0,1,2,3,4", gpus_per_cell=2) == [["0", "1"], ["2", "3"]]  # floor(5 / 2) cells
    assert parse_devices("cpu:2") == [["cpu"], ["cpu"]]
    for bad in ("gpu0", "0,0", "cpu:0"):
        with pytest.raises(UserError):
            parse_devices(bad)
    with pytest.raises(UserError, match="at least"):
        parse_devices("0", gpus_per_cell=2)
    assert parse_time("01:30:00") == 90 and parse_time("1-00:00:30") == 1441
    with pytest.raises(UserError, match="HH:MM:SS"):
        parse_time("90")
    assert parse_slurm_options(["qos=high", "--constraint=a100"]) == {"qos": "high", "constraint": "a100"}
    with pytest.raises(UserError):
        parse_slurm_options(["qos"])
