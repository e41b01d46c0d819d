"""`harness sweep ... --launcher local --devices cpu:2`: a 4-cell tiny Kandinsky sweep, two cells at once (one
worker process per CPU slot, harness/launchers/worker.py, one torch thread each); killing the whole sweep (parent
and workers) mid-training and rerunning continues the unfinished cells in their own run dirs and skips the finished
ones; `harness sweep status` reports each state."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_kandinsky  # noqa: F401 (fixtures)

LABELS = ["rank=2,lr=0.001", "rank=2,lr=0.002", "rank=3,lr=0.001", "rank=3,lr=0.002"]


def _args(tiny_kandinsky, mini_data, tmp_path, *extra) -> list[str]:
    return ["sweep", "kandinsky-prior", "--split", str(mini_data[1]), "--data", str(mini_data[0]),
            "--prior", str(tiny_kandinsky[0]), "--decoder", str(tiny_kandinsky[1]),
            "--grid", "rank=2,3", "--grid", "lr=1e-3,2e-3",
            "--batch-size", "2", "--resolution", "32", "--n-prompts", "1", "--images-per-prompt", "1", "--no-score",
            "--prior-steps", "2", "--decoder-steps", "2", "--cache-dir", str(tmp_path / "c"),
            "--sweep-dir", str(tmp_path / "sw"), "--launcher", "local", "--devices", "cpu:2", *extra]


def _env(tmp_path) -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    return dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", HARNESS_NO_PROGRESS="1", HARNESS_RUNS_DIR=str(tmp_path / "runs"))


@pytest.mark.slow  # 30-160 s on 2 shared cores (two sweep commands, each importing torch + diffusers)
def test_local_launcher_two_at_once_kill_rerun_and_status(tiny_kandinsky, mini_data, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "runs"))
    args = _args(tiny_kandinsky, mini_data, tmp_path, "--max-steps", "30", "--checkpoint-every", "2",
                 "--keep-last", "2")
    rec_path = tmp_path / "sw" / "sweep.json"
    # The whole sweep in its own session, so one killpg takes the scheduler and both cell processes down at once.
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args], env=_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen_running: set[str] = set()
    killed = False
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if rec_path.is_file():
                try:
                    cells = json.loads(rec_path.read_text()).get("cells", {})
                except json.JSONDecodeError:
                    cells = {}
                running = {k for k, v in cells.items() if v.get("status") == "running"}
                seen_running |= running
                ckpt = [k for k in running if cells[k].get("run") and
                        list(Path(cells[k]["run"]).glob("checkpoints/step-*/trainer_state.json"))]
                if len(running) == 2 and ckpt:  # two cells at once, one of them past a checkpoint
                    killed = True
                    break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert killed, err.decode()[-3000:]
    rec = json.loads(rec_path.read_text())
    assert sum(v.get("status") == "running" for v in rec["cells"].values()) == 2
    assert {v["devices"] for v in rec["cells"].values() if v.get("status") == "running"} == {"cpu"}
    assert all(v.get("launcher") == "local" for v in rec["cells"].values())
    # the others wait for a free slot (or, on a slow machine, one may have finished before the kill)
    assert all(v.get("status") in ("queued", "done") for v in rec["cells"].values() if v.get("status") != "running")
    killed_runs = {k: v["run"] for k, v in rec["cells"].items() if v.get("run")}
    # only a cell killed past a checkpoint continues from one; the other restarts at 0 in the same run dir
    had_checkpoint = {k for k, run in killed_runs.items()
                      if list(Path(run).glob("checkpoints/step-*/trainer_state.json"))}
    assert had_checkpoint
    from harness.launchers.state import _alive_here

    for _ in range(200):  # SIGKILL is delivered asynchronously: wait until both cell processes are gone
        if not any(_alive_here(v) for v in rec["cells"].values() if v.get("status") == "running"):
            break
        time.sleep(0.05)

    # status after the kill: the two cells whose processes vanished are failed, the rest still queued
    code, out, err = run_cli("sweep", "status", str(tmp_path / "sw"))
    assert code == 0, err
    text = " ".join(out.split())
    assert "2 failed" in text and "is gone" in text and "running" not in text.split("┃")[-1]

    code, out, err = run_cli(*args[:args.index("--max-steps")], "--max-steps", "6", "--checkpoint-every", "2",
                             "--keep-last", "2")  # wrong: another base config -> refused, nothing touched
    assert code == 2 and "another base config" in err

    done = subprocess.run([sys.executable, "-m", "harness", *args], env=_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads(rec_path.read_text())
    assert list(rec["cells"]) == LABELS
    for label, cell in rec["cells"].items():
        assert cell["status"] == "done" and cell["n_images"] == 1, (label, cell)
        assert cell["launcher"] == "local" and cell["devices"] == "cpu" and cell["ended"] >= cell["started"]
        assert Path(cell["log"]).is_file()
        cfg = json.loads((Path(cell["run"]) / "config.json").read_text())
        assert (cfg["lora"]["rank"], cfg["loop"]["lr"]) == (cell["params"]["lora.rank"], cell["params"]["loop.lr"])
    for label, run in killed_runs.items():  # continued in the run dir recorded before training, not restarted
        assert rec["cells"][label]["run"] == run
        stats = json.loads((Path(run) / "train_stats.json").read_text())
        assert stats["steps"] == 30 and (stats["start_step"] >= 2 if label in had_checkpoint else True)
    runs = [d for d in (tmp_path / "runs").iterdir() if d.name.startswith("kandinsky-prior")]
    assert len(runs) == 4

    code, out, err = run_cli("sweep", "status", str(tmp_path / "sw"))
    assert code == 0 and "4 done" in " ".join(out.split())
    again = subprocess.run([sys.executable, "-m", "harness", *args], env=_env(tmp_path), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("skipped") == 4


def test_scheduler_runs_floor_devices_over_k_at_once_and_records_a_silent_death(tmp_path, monkeypatch):
    """The scheduler and its worker processes (harness/launchers/worker.py) with a stand-in cell: at most two at once
    on cpu:2, each with its devices and one thread, one worker process per device group running its cells one after
    another, each cell's output in its own log; a worker that dies mid-cell leaves the cell failed with its log's
    last line, and a new worker takes the next cell."""
    import harness.launchers.local as local
    from harness.launchers.state import SweepStore

    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        "from harness.launchers.state import SweepStore\n"
        "from harness.launchers.worker import serve\n"
        "def cell(sweep_dir, label, launcher, devices):\n"
        "    store = SweepStore(sweep_dir / 'sweep.json')\n"
        "    store.patch_cell('cells', label, status='running', threads=os.environ['OMP_NUM_THREADS'],\n"
        "                     cuda=os.environ['CUDA_VISIBLE_DEVICES'], t0=time.time(), pid=os.getpid())\n"
        "    print('cell', label, 'says hello')\n"
        "    if label == 'c': print('MemoryError: simulated', flush=True); os._exit(3)\n"
        "    time.sleep(1.0)\n"
        "    return store.patch_cell('cells', label, status='done', t1=time.time())\n"
        "reply = os.dup(1); os.dup2(2, 1)\n"
        "serve(sys.argv[1], sys.stdin, reply, run=cell)\n")
    store = SweepStore(tmp_path / "sw" / "sweep.json")
    store.update(lambda rec: rec.update(family="x", cells={k: {"status": "pending"} for k in "abcde"}))
    monkeypatch.setattr(local, "worker_command", lambda sweep_dir, group, launcher="local": [
        sys.executable, str(script), str(sweep_dir)])
    local.LocalLauncher(devices="cpu:2", poll_s=0.05, fork=False).launch(store, list("abcde"))
    cells = store.read()["cells"]
    assert [cells[k]["status"] for k in "abcde"] == ["done", "done", "failed", "done", "done"]
    assert "exited with code 3" in cells["c"]["error"] and "MemoryError: simulated" in cells["c"]["error"]
    assert all(cells[k]["threads"] == "1" and cells[k]["cuda"] == "" and cells[k]["devices"] == "cpu"
               for k in "abcde")
    spans = sorted((cells[k]["t0"], cells[k].get("t1", cells[k]["t0"])) for k in "abcde")  # c dies at once
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most == 2  # two at once, never more
    # two workers for five cells, plus the one that replaced the worker that died with c: c dies as it starts
    # (beside d, after a and b) while d runs for another second, so e can only go to the replacement
    assert len({cells[k]["pid"] for k in "abcde"}) == 3
    for k in "abde":
        log = (tmp_path / "sw" / "logs" / f"{k}.log").read_text()
        assert f"cell {k} says hello" in log and "simulated" not in log


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked CPU workers need os.fork")
def test_cpu_slots_fork_workers_from_the_scheduler(tmp_path):
    """On a machine without CUDA the CPU slots are workers forked from the scheduler (its imports already done):
    two cells at once, one thread each, no CUDA device, each cell's output in its own log; a worker that dies
    mid-cell leaves its cell failed with the log's last line and a new worker takes the next cell."""
    import harness.launchers.local as local
    from harness.launchers.state import SweepStore

    if not local.can_fork([["cpu"]]):
        pytest.skip("CUDA present: CPU slots start fresh workers")

    def cell(sweep_dir, label, launcher, devices):
        import torch

        st = SweepStore(sweep_dir / "sweep.json")
        st.patch_cell("cells", label, status="running", threads=torch.get_num_threads(), pid=os.getpid(),
                      cuda=os.environ["CUDA_VISIBLE_DEVICES"], t0=time.time(), dev=devices)
        print(f"cell {label} says hello")
        time.sleep(0.5)
        if label == "b":
            print("MemoryError: simulated", flush=True)
            os._exit(3)
        return st.patch_cell("cells", label, status="done", t1=time.time())

    store = SweepStore(tmp_path / "sw" / "sweep.json")
    store.update(lambda rec: rec.update(family="x", cells={k: {"status": "pending"} for k in "abcd"}))
    local.LocalLauncher(devices="cpu:2", poll_s=0.05, cell_runner=cell).launch(store, list("abcd"))
    cells = store.read()["cells"]
    assert [cells[k]["status"] for k in "abcd"] == ["done", "failed", "done", "done"]
    assert "exited with code 3" in cells["b"]["error"] and "MemoryError: simulated" in cells["b"]["error"]
    assert all(cells[k]["threads"] == 1 and cells[k]["cuda"] == "" and cells[k]["dev"] == "cpu" for k in "abcd")
    assert os.getpid() not in {cells[k]["pid"] for k in "abcd"} and len({cells[k]["pid"] for k in "abcd"}) == 3
    spans = sorted((cells[k]["t0"], cells[k].get("t1", cells[k]["t0"] + 0.5)) for k in "abcd")
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) == 2
    for k in "acd":
        log = (tmp_path / "sw" / "logs" / f"{k}.log").read_text()
        assert f"cell {k} says hello" in log and "simulated" not in log


def test_multi_gpu_groups_run_one_process_per_cell(tmp_path, monkeypatch):
    """K-GPU groups (K > 1) keep one process per cell (`accelerate launch` of `harness sweep-cell`), pinned to the
    group's GPUs; a process that exits without recording its end is failed with its log's last line."""
    import harness.launchers.local as local
    from harness.launchers.state import SweepStore

    script = tmp_path / "cell.py"
    script.write_text(
        "import os, sys, time\n"
        "from harness.launchers.state import SweepStore\n"
        "store = SweepStore(sys.argv[1]); label = sys.argv[2]\n"
        "store.patch_cell('cells', label, status='running', cuda=os.environ['CUDA_VISIBLE_DEVICES'], pid=os.getpid())\n"
        "if label == 'b': print('CUDA out of memory (simulated)'); sys.exit(1)\n"
        "store.patch_cell('cells', label, status='done')\n")
    store = SweepStore(tmp_path / "sw" / "sweep.json")
    store.update(lambda rec: rec.update(family="x", cells={k: {"status": "pending"} for k in "abc"}))
    monkeypatch.setattr(local, "cell_command", lambda sweep_dir, label, group, launcher="local": [
        sys.executable, str(script), str(sweep_dir / "sweep.json"), label])
    local.LocalLauncher(devices="0,1,2,3", gpus_per_cell=2, poll_s=0.05).launch(store, list("abc"))
    cells = store.read()["cells"]
    assert [cells[k]["status"] for k in "abc"] == ["done", "failed", "done"]
    assert "exited with code 1" in cells["b"]["error"] and "out of memory (simulated)" in cells["b"]["error"]
    assert {cells[k]["cuda"] for k in "abc"} <= {"0,1", "2,3"} and len({cells[k]["pid"] for k in "abc"}) == 3


def test_worker_answers_each_cell_and_records_a_user_error(tmp_path):
    """The worker loop in-process: a cell's UserError goes to that cell's log (one line, no traceback) and the
    worker goes on with the next cell."""
    from harness.errors import UserError
    from harness.launchers.worker import serve

    def cell(sweep_dir, label, launcher, devices):
        print(f"running {label} on {devices}")
        if label == "bad":
            raise UserError("no such base model", "/x")
        return {"status": "done"}

    r, w = os.pipe()
    reqs = io.StringIO("ok\nbad\n\nok2\n")
    assert serve(tmp_path, reqs, w, devices="cpu", run=cell) == 3
    os.close(w)
    with os.fdopen(r) as f:
        assert f.read().splitlines() == ["ok\tdone", "bad\tfailed", "ok2\tdone"]
    logs = tmp_path / "logs"
    assert (logs / "ok.log").read_text() == "running ok on cpu\n"
    bad = (logs / "bad.log").read_text()
    assert "running bad on cpu" in bad and "no such base model" in bad and "Traceback" not in bad


def test_gpu_cells_are_pinned_and_multi_gpu_cells_run_under_accelerate():
    from harness.launchers.local import cell_command, cell_env

    assert cell_env(["2", "3"])["CUDA_VISIBLE_DEVICES"] == "2,3"
    cmd = cell_command(Path("/s"), "rank=4", ["2", "3"])
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"] and cmd[4] == "2"
    assert cmd[cmd.index("harness"):] == ["harness", "sweep-cell", "/s", "rank=4", "--launcher", "local",
                                          "--devices", "2,3"]
    assert cell_command(Path("/s"), "4", ["1"])[1:4] == ["-m", "harness", "sweep-cell"]


def test_fresh_worker_process_protocol(tmp_path):
    """`python -m harness.launchers.worker` (the GPU slots' worker): labels on stdin, `label<TAB>status` on stdout
    and nothing else there; a cell it cannot run is answered failed, its error in the cell's log."""
    (tmp_path / "sw").mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("OMP_NUM_THREADS", None)  # no torch needed to answer
    out = subprocess.run([sys.executable, "-m", "harness.launchers.worker", str(tmp_path / "sw"), "--devices", "0"],
                         input="rank=4\n", capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "rank=4\tfailed\n"
    assert "no sweep here" in (tmp_path / "sw" / "logs" / "rank=4.log").read_text()

