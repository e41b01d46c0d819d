"""`harness sweep ... --launcher slurm --partition P --time HH:MM:SS --gpus-per-cell K [--account A]
[--slurm-option key=value ...]`: the sweep's cells as one SLURM job array, submitted through submitit, with the
jobs' logs and pickles under <sweep dir>/slurm/. Each job runs one cell (CellJob -> harness.launchers.cell, the
same code as a local cell process) and records its job id in sweep.json. A job that is preempted or reaches its
time limit is requeued by submitit's checkpointing hook (`CellJob.checkpoint`, a `submitit.helpers.Checkpointable`):
the requeued job finds the cell's run dir in sweep.json and continues it with the trainer's exact resume from its
last checkpoint (harness.sweep._run_cell -> SweepTarget.continue_run). The submitting command returns once the
array is queued; `harness sweep status SWEEP_DIR` follows it, rerunning the command resubmits only the failed or
missing cells, `harness sweep status SWEEP_DIR --cancel` cancels the queued ones."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.launchers.state import SweepStore, cells_of, now

try:  # the [cluster] extra; only this launcher needs it
    from submitit.helpers import Checkpointable
except ModuleNotFoundError:  # pragma: no cover - reported by SlurmLauncher.from_options
    Checkpointable = object  # type: ignore[assignment,misc]

CPUS_PER_GPU = 8  # submitit / Hydra examples' rule of thumb for data loading workers per GPU


def parse_time(text: str) -> int:
    """SLURM's [D-]HH:MM:SS -> whole minutes (rounded up: submitit takes timeout_min)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})", str(text).strip())
    if not m or int(m.group(3)) > 59 or int(m.group(4)) > 59:
        raise UserError(f"--time takes HH:MM:SS (or D-HH:MM:SS), got {text!r}")
    days, h, mi, s = (int(g or 0) for g in m.groups())
    minutes = math.ceil(((days * 24 + h) * 60 + mi) + s / 60)
    if minutes < 1:
        raise UserError(f"--time must be at least one minute, got {text!r}")
    return minutes


def parse_slurm_options(items) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        k, sep, v = str(item).partition("=")
        k = k.strip().lstrip("-").replace("_", "-")
        if not sep or not k:
            raise UserError(f"--slurm-option takes KEY=VALUE (an sbatch option without its dashes), got {item!r}")
        out[k] = v.strip()
    return out


class CellJob(Checkpointable):
    """One cell as a submitit job. Pickled with its sweep dir and label only: all state is in sweep.json and the
    run dir, so a requeued job continues where the killed one checkpointed."""

    def __init__(self, sweep_dir: str | Path, label: str):
        self.sweep_dir = str(sweep_dir)
        self.label = label

    def __call__(self) -> dict[str, Any]:
        import os

        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # a K-GPU cell: one task per GPU, torch.distributed set up from SLURM's variables
            submitit.helpers.TorchDistributedEnvironment().export()
        os.environ.setdefault("HARNESS_NO_PROGRESS", "1")
        from harness.launchers.cell import run_cell_from_record

        entry = run_cell_from_record(self.sweep_dir, self.label, launcher="slurm", job_id=str(env.job_id))
        if entry.get("status") == "failed":
            raise RuntimeError(f"cell {self.label} failed: {entry.get('error')}")
        return entry

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's hook on preemption / time limit (SIGUSR2 before the kill): mark the cell requeued and
        resubmit a fresh CellJob of it; the requeued job resumes from the run's last checkpoint."""
        from submitit.helpers import DelayedSubmission

        store = SweepStore(Path(self.sweep_dir) / "sweep.json")
        key, _ = cells_of(store.read())
        store.patch_cell(key, self.label, status="queued", requeued=now(),
                         note="requeued after preemption / time limit; resumes from its last checkpoint")
        return DelayedSubmission(CellJob(self.sweep_dir, self.label), *args, **kwargs)


@dataclass
class SlurmLauncher:
    partition: str | None
    timeout_min: int
    gpus_per_cell: int = 1
    account: str | None = None
    slurm_options: dict[str, str] = field(default_factory=dict)
    cpus_per_cell: int | None = None
    cluster: str = "slurm"  # "local" / "debug" in tests: the same submission code, jobs as local processes
    jobs: list = field(default_factory=list)

    name = "slurm"

    @classmethod
    def from_options(cls, partition: str | None, time_limit: str | None, gpus_per_cell: int = 1,
                     account: str | None = None, slurm_options=(), cpus_per_cell: int | None = None,
                     cluster: str = "slurm") -> "SlurmLauncher":
        try:
            import submitit  # noqa: F401
        except ModuleNotFoundError:
            raise UserError("--launcher slurm needs submitit: pip install 'medvqa-harness[cluster]'") from None
        if cluster == "slurm" and not partition:
            raise UserError("--launcher slurm needs --partition")
        if not time_limit:
            raise UserError("--launcher slurm needs --time HH:MM:SS (each job's limit; a job reaching it is requeued)")
        return cls(partition=partition, timeout_min=parse_time(time_limit), gpus_per_cell=gpus_per_cell,
                   account=account, slurm_options=parse_slurm_options(slurm_options), cpus_per_cell=cpus_per_cell,
                   cluster=cluster)

    def owns(self, entry: dict[str, Any]) -> bool:
        # a queued or running SLURM cell is the cluster's: resubmitting it would run it twice
        return entry.get("launcher") == "slurm" and bool(entry.get("job_id"))

    def describe(self, entry: dict[str, Any]) -> str:
        return f"SLURM job {entry.get('job_id')}"

    def executor(self, sweep_dir: Path, family: str):
        import shutil

        import submitit

        if self.cluster == "slurm" and shutil.which("srun") is None:
            raise UserError("--launcher slurm: srun is not on this machine's PATH; submit from a SLURM login node")

        ex = submitit.AutoExecutor(folder=sweep_dir / "slurm" / "%j", cluster=self.cluster)
        params: dict[str, Any] = {
            "name": f"sweep-{family}", "timeout_min": self.timeout_min, "nodes": 1,
            "tasks_per_node": self.gpus_per_cell, "gpus_per_node": self.gpus_per_cell,
            "cpus_per_task": self.cpus_per_cell or CPUS_PER_GPU,
        }
        if self.cluster == "slurm":
            params["slurm_partition"] = self.partition
            if self.account:
                params["slurm_account"] = self.account
            if self.slurm_options:
                params["slurm_additional_parameters"] = dict(self.slurm_options)
        elif self.cluster == "local":
            params.pop("nodes")
            params.pop("cpus_per_task")
            params["gpus_per_node"] = 0 if not _has_cuda() else self.gpus_per_cell
        ex.update_parameters(**params)
        return ex

    def launch(self, store: SweepStore, labels: list[str]) -> None:
        from harness.progress import console

        if not labels:
            return
        record = store.read()
        key, _ = cells_of(record)
        sweep_dir = store.path.parent
        ex = self.executor(sweep_dir, record.get("family", "sweep"))
        # queued before submission: a job that starts at once finds its entry (and overwrites it with "running")
        for label in labels:
            store.patch_cell(key, label, status="queued", launcher=self.name, queued=now(), error=None,
                             log=str(sweep_dir / "slurm"))
        with ex.batch():  # one job array for the sweep
            jobs = [ex.submit(CellJob(sweep_dir, label)) for label in labels]
        self.jobs = jobs

        def ids(rec: dict) -> None:
            for label, job in zip(labels, jobs):
                e = rec[key][label]
                e["job_id"] = str(job.job_id)
                e["log"] = str(job.paths.stdout)
        store.update(ids)
        console.print(f"submitted {len(jobs)} cell(s) as job array {str(jobs[0].job_id).split('_')[0]} "
                      f"(logs under {sweep_dir / 'slurm'})")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def cancel_job(sweep_dir: Path, job_id: str) -> None:
    """scancel one job (array task) of the sweep, through submitit's job handle."""
    from submitit.slurm.slurm import SlurmJob

    try:
        SlurmJob(folder=sweep_dir / "slurm" / "%j", job_id=str(job_id)).cancel(check=False)
    except FileNotFoundError:
        raise UserError("scancel is not on this machine's PATH: cancel from a SLURM login node") from None
