"""`--launcher slurm` through submitit, offline: the sbatch script of the sweep's job array (a fake `sbatch` on PATH
receives the real submission), and submitit's checkpointing hook on a cell killed mid-training: the requeued job
continues the recorded run with the trainer's exact resume; and (slow) the whole path through submitit's local
executor, where the job is a real process that is signalled, requeued by submitit and resumed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_config, tiny_kandinsky  # noqa: F401 (fixtures)

submitit = pytest.importorskip("submitit")


def _prepare(tiny_kandinsky, mini_data, tmp_path, monkeypatch, ranks=(2, 3), **loop):
    """A rank sweep recorded in sweep.json with its cells not yet run (the launcher records nothing else)."""
    import harness.sweep as sweep

    class Recorder:
        name = "slurm"
        labels: list = []

        def owns(self, entry):
            return False

        def launch(self, store, labels):
            Recorder.labels = labels

    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "runs"))
    cfg = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, loop=loop or {"max_steps": 2})
    sweep.run_sweep(cfg, list(ranks), sweep_dir=tmp_path / "sw", n_prompts=1, gen_batch_size=2, device="cpu",
                    images_per_prompt=1, score=False, launcher=Recorder())
    return Recorder.labels


def test_sbatch_job_array_of_the_sweep(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    from harness.launchers.slurm import SlurmLauncher
    from harness.launchers.state import SweepStore

    labels = _prepare(tiny_kandinsky, mini_data, tmp_path, monkeypatch)
    assert labels == ["2", "3"]
    # a fake sbatch: keeps the submitted script, answers like SLURM
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 4242\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that it is on a SLURM machine
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    launcher = SlurmLauncher.from_options(partition="gpu", time_limit="02:00:00", gpus_per_cell=2, account="lab",
                                          slurm_options=("qos=high", "constraint=a100"))
    store = SweepStore(tmp_path / "sw" / "sweep.json")
    launcher.launch(store, labels)
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --array=0-1", "#SBATCH --signal=USR2@90",
                 f"#SBATCH --output={tmp_path / 'sw' / 'slurm'}"):
        assert line in script, (line, script)
    cells = store.read()["ranks"]
    assert [cells[x]["job_id"] for x in labels] == ["4242_0", "4242_1"]
    assert all(cells[x]["status"] == "queued" and cells[x]["launcher"] == "slurm" for x in labels)
    # the pickled callables are the cells' CellJobs
    pickles = sorted((tmp_path / "sw" / "slurm").rglob("*_submitted.pkl"))
    assert len(pickles) == 2
    from submitit.core.utils import DelayedSubmission

    fns = sorted((DelayedSubmission.load(p).function.label) for p in pickles)
    assert fns == labels
    from harness.launchers.status import cell_rows

    assert {r["job"] for r in cell_rows(store.read())} == {"4242_0", "4242_1"}


def test_rerun_leaves_queued_slurm_cells_alone(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    from harness.launchers.state import SweepStore

    labels = _prepare(tiny_kandinsky, mini_data, tmp_path, monkeypatch)
    store = SweepStore(tmp_path / "sw" / "sweep.json")
    store.patch_cell("ranks", "2", status="queued", launcher="slurm", job_id="9_0")
    store.patch_cell("ranks", "3", status="failed", launcher="slurm", job_id="9_1", error="boom")
    import harness.sweep as sweep
    from harness.launchers.slurm import SlurmLauncher

    submitted = []
    launcher = SlurmLauncher.from_options(partition="gpu", time_limit="00:10:00")
    monkeypatch.setattr(launcher, "launch", lambda store, labels: submitted.extend(labels))
    cfg = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, loop={"max_steps": 2})
    sweep.run_sweep(cfg, [2, 3], sweep_dir=tmp_path / "sw", n_prompts=1, gen_batch_size=2, device="cpu",
                    images_per_prompt=1, score=False, launcher=launcher)
    assert labels == ["2", "3"] and submitted == ["3"]  # only the failed cell is resubmitted


def test_requeued_job_resumes_the_killed_training(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    """A job killed mid-training (the preemption signal -> submitit calls CellJob.checkpoint) is requeued; the
    requeued job continues the recorded run from its last checkpoint (continue_run), not a new run."""
    import harness.families.kandinsky22.sweep as ks
    import harness.families.kandinsky22.train as tk
    from harness.launchers.slurm import CellJob
    from harness.launchers.state import SweepStore

    labels = _prepare(tiny_kandinsky, mini_data, tmp_path, monkeypatch, ranks=(2,), max_steps=6, batch_size=2,
                      checkpoint_every=2, keep_last=2)
    assert labels == ["2"]
    real_train = tk.train

    class Preempted(BaseException):  # what submitit's signal handler does: the job's process stops mid-step
        pass

    def killed_train(cfg, *a, **k):
        from harness import trainer

        real_save = trainer._save_checkpoint
        calls = {"n": 0}

        def save_then_die(*sa, **sk):
            out = real_save(*sa, **sk)
            calls["n"] += 1
            if calls["n"] == 2:  # after the step-4 checkpoint
                raise Preempted()
            return out

        monkeypatch.setattr(trainer, "_save_checkpoint", save_then_die)
        try:
            return real_train(cfg, *a, **k)
        finally:
            monkeypatch.setattr(trainer, "_save_checkpoint", real_save)

    monkeypatch.setattr(tk, "train", killed_train)
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: type("E", (), {"num_tasks": 1, "job_id": "77_0"})())
    job = CellJob(tmp_path / "sw", "2")
    with pytest.raises(Preempted):
        job()
    store = SweepStore(tmp_path / "sw" / "sweep.json")
    entry = store.read()["ranks"]["2"]
    run_dir = Path(entry["run"])
    assert entry["status"] == "running" and entry["job_id"] == "77_0" and not (run_dir / "final").exists()

    # submitit's hook on the signal: the cell is marked requeued and a fresh CellJob of it is resubmitted
    delayed = job.checkpoint()
    assert store.read()["ranks"]["2"]["status"] == "queued" and "requeued" in store.read()["ranks"]["2"]
    assert isinstance(delayed.function, CellJob) and delayed.function.label == "2"
    resumed = []
    orig = type(ks.PRIOR).continue_run

    def spy(self, run):
        resumed.append(run.dir)
        return orig(self, run)

    monkeypatch.setattr(type(ks.PRIOR), "continue_run", spy)
    monkeypatch.setattr(tk, "train", lambda *a, **k: pytest.fail("the requeued job must resume, not retrain"))
    entry = delayed.function(*delayed.args, **delayed.kwargs)  # what the requeued job runs
    assert resumed == [run_dir] and entry["status"] == "done" and entry["run"] == str(run_dir)
    stats = json.loads((run_dir / "train_stats.json").read_text())
    assert stats["start_step"] == 4 and stats["steps"] == 6


# Put on the job's PYTHONPATH: in the job process only (submitit's local task sets SUBMITIT_LOCAL_GLOBALID; its
# controller does not), SIGUSR2 - what SLURM sends before a preemption or the time limit - right after the second
# checkpoint of the first attempt (a marker file keeps the requeued attempt from being preempted again).
PREEMPT_HOOK = '''
import os
import signal

if os.environ.get("SUBMITIT_LOCAL_GLOBALID") is not None and os.environ.get("PREEMPT_MARKER"):
    from harness import trainer

    _real_save, _saves = trainer._save_checkpoint, []

    def _save_then_preempt(*args, **kwargs):
        out = _real_save(*args, **kwargs)
        _saves.append(1)
        marker = os.environ["PREEMPT_MARKER"]
        if len(_saves) == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    trainer._save_checkpoint = _save_then_preempt
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_executor_preempted_job_is_requeued_and_resumes(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    """submitit's local executor: the same submission code as on SLURM, the job a real process. It gets SIGUSR2
    right after its step-4 checkpoint; submitit's handler calls CellJob.checkpoint, the job exits to be requeued,
    the controller runs it again, and the new attempt continues the recorded run from step 4 (not a new run)."""
    from harness.launchers.slurm import SlurmLauncher
    from harness.launchers.state import SweepStore

    labels = _prepare(tiny_kandinsky, mini_data, tmp_path, monkeypatch, ranks=(2,), max_steps=6, batch_size=2,
                      checkpoint_every=2, keep_last=3)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PREEMPT_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PREEMPT_MARKER", str(tmp_path / "preempted"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launcher = SlurmLauncher.from_options(partition=None, time_limit="00:10:00", cluster="local")
    store = SweepStore(tmp_path / "sw" / "sweep.json")
    launcher.launch(store, labels)
    job = launcher.jobs[0]
    entry = job.result()  # waits for the requeued attempt; raises if the job failed
    log = job.stdout() + (job.stderr() or "")
    assert (tmp_path / "preempted").is_file(), log  # the first attempt was preempted ...
    # ... and requeued by submitit (its local environment calls any SIGUSR2 a time-out; same checkpoint path)
    assert "Caught signal SIGUSR2" in log and "Calling checkpoint method" in log and "Requeued job" in log, log
    rec = store.read()["ranks"]["2"]
    assert entry["status"] == "done" and rec["status"] == "done" and "requeued" in rec, rec
    run_dir = Path(rec["run"])
    stats = json.loads((run_dir / "train_stats.json").read_text())
    assert stats["start_step"] == 4 and stats["steps"] == 6  # resumed from the checkpoint, in the same run
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()] == [run_dir.name]  # no second run
