"""The one training loop every family uses (MSDM VAE / UNet, Kandinsky LoRA).

A family describes *what* to train with a `TrainTask` (trainable parameters, modules, datasets, `loss(batch,
generator)`, export); `run_training(task, LoopConfig, run)` does *how*: accelerate (device placement, mixed
precision, multi-process DDP), AdamW + linear warm-up, gradient accumulation, clipping of exactly the trainable
parameters, validation at a fixed seed, sample grids, keep-last-K atomic checkpoints and exact resume.

Why resume is exact (a run stopped at step k and resumed ends bit-for-bit where an uninterrupted run ends):
  * the data order is a pure function of (seed, epoch): each epoch is a seeded permutation, cut into global
    batches of `batch_size * world_size`, rank r takes slice r. The position in the data is therefore just
    "micro-batches consumed" = step * grad_accum, and a resumed run re-derives it; nothing is iterated to skip;
  * all randomness of a step (noise, timesteps, self-conditioning coin, dropout masks) comes from generators that
    are seeded from (seed, step, micro-batch, rank): the `generator` handed to `task.loss` (on the CPU, so the same
    seed gives the same draws on any device) and the global torch RNG, re-seeded before each micro-batch so that
    dropout inside the models is reproducible too;
  * checkpoints hold the trainable tensors, optimizer and scheduler state, the task's extra state (EMA), the RNG
    states and the step.

Multi-process: launch with `accelerate launch` / torchrun; modules holding trainable parameters are wrapped by
`accelerator.prepare` (DDP), every rank draws its own slice of each global batch, and only rank 0 writes files.

Checkpoint layout (`run/checkpoints/step-0000500/`, written to a temp dir and renamed, so a kill never leaves a
half checkpoint under the final name):
    trainable.safetensors   the trainable tensors, by "<module>.<parameter name>"
    optimizer.pt, scheduler.pt, task_state.pt, rng.pt
    trainer_state.json      step, data position, loop config, seed, data hashes (written last)
The final artefact is written by `task.export(dir)` into a temp dir renamed to `run/final/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from harness.config import to_dict
from harness.distributed import cpu_only
from harness.distributed import state as dist_state
from harness.errors import UserError
from harness.io import write_json, write_text
from harness.runs import Run

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")
FINAL_DIR = "final"
BEST_DIR = "best"  # with select_best: the weights that scored best (export + provenance.json with the metric)
TRAIN_LOG = "train_log.jsonl"
STATE_FILE = "trainer_state.json"
# Runs this process finished training (rank 0), in order: how `--push-to-hub` finds the run its command trained.
FINISHED_RUNS: list[Run] = []


@dataclass
class LoopConfig:
    """Options of the training loop; the CLI's shared training options map 1:1 onto these fields.

    Training length: `max_steps` optimizer steps, or `epochs` passes over the task's epoch items (`TrainTask.
    epoch_items()`, by default the training dataset's length). When `epochs` is set it takes precedence: `max_steps`
    is derived from it by `resolve_loop` (and recorded beside it); the CLI refuses `--epochs` with `--max-steps`."""

    seed: int = 0
    max_steps: int = 1000  # optimizer steps (derived from `epochs` when that is set)
    epochs: int | None = None  # passes over the epoch items; None = train `max_steps`
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0  # AdamW
    warmup_steps: int = 0  # linear warm-up from 0, then constant
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpoint_every: int = 500  # 0 = only the final checkpoint
    keep_last: int = 3
    val_every: int = 500  # 0 = only at the end
    val_batches: int = 4
    sample_every: int = 0  # 0 = off
    log_every: int = 10  # log (and check the loss is finite) every N steps: the only host syncs of the loop
    num_workers: int | None = None  # DataLoader worker processes per rank; None = default_num_workers()
    tf32: bool = True  # CUDA: TF32 matmuls and cuDNN convolutions (diffusers' and PyTorch's recommendation)
    channels_last: bool = False  # CUDA: trained modules and 4-D inputs in channels_last memory format
    select_best: Literal["none", "val_loss", "fid"] = "none"  # keep the best weights by this metric in run/best
    # Trackers that view the run (harness/tracking.py): "none", "tensorboard", "wandb" or a comma list. Default none,
    # not diffusers' tensorboard: the run folder is the record and trackers are an optional extra.
    report_to: str = "none"

    def validate(self) -> None:
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "keep_last": self.keep_last, "log_every": self.log_every, "val_batches": self.val_batches}
        if self.epochs is not None:
            positive["epochs"] = self.epochs
        for k, v in positive.items():
            if v < 1:
                raise UserError(f"LoopConfig.{k} must be >= 1, got {v}")
        non_negative = {"checkpoint_every": self.checkpoint_every, "val_every": self.val_every,
                        "sample_every": self.sample_every, "warmup_steps": self.warmup_steps,
                        "max_grad_norm": self.max_grad_norm, "weight_decay": self.weight_decay}
        if self.num_workers is not None:
            non_negative["num_workers"] = self.num_workers
        for k, v in non_negative.items():
            if v < 0:
                raise UserError(f"LoopConfig.{k} must be >= 0, got {v}")
        if not self.lr > 0:
            raise UserError(f"LoopConfig.lr must be > 0, got {self.lr}")
        # What the CLI's ranges check, also for values from --config files and sweep grids (nan passes any
        # comparison, so finiteness is its own check; seeds feed numpy's RNG, which takes 0 .. 2**32 - 1).
        for k in ("lr", "max_grad_norm", "weight_decay"):
            if not math.isfinite(getattr(self, k)):
                raise UserError(f"LoopConfig.{k} must be a finite number, got {getattr(self, k)}")
        if not 0 <= self.seed <= 2**32 - 1:
            raise UserError(f"LoopConfig.seed must be in [0, 2**32 - 1], got {self.seed}")
        if self.select_best not in ("none", "val_loss", "fid"):
            raise UserError(f"LoopConfig.select_best must be none, val_loss or fid, got {self.select_best!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UserError(f"LoopConfig.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        from harness.tracking import normalize_report_to

        self.report_to = normalize_report_to(self.report_to)  # names checked; their packages when training starts

    def __post_init__(self) -> None:
        self.validate()


def default_num_workers() -> int:
    """DataLoader workers per process when `--num-workers` is not given: the CPU cores this process may use
    (`os.sched_getaffinity`, i.e. what a container/cgroup/taskset allows) shared among the processes of this node
    (`LOCAL_WORLD_SIZE` under torchrun / accelerate launch), minus one for the process itself, at most 8 (beyond
    that, decoding 256 px images is rarely the bottleneck and each worker holds a copy of the dataset)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cores // local - 1))


def world_size() -> int:
    """Processes of this launch (WORLD_SIZE of torchrun / accelerate launch; 1 for a plain run)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


@dataclass
class LoopPlan:
    """What a LoopConfig means for a given data set and launch: the derived numbers a run records."""

    max_steps: int  # optimizer steps to train
    epochs: int | None  # as given (None: the length was given in steps)
    epoch_items: int  # items of one epoch
    global_batch: int  # batch_size * grad_accum * world_size: items per optimizer step
    micro_batches_per_epoch: int  # per rank; the incomplete last global batch of an epoch is dropped
    steps_per_epoch: float  # optimizer steps per epoch (fractional when grad_accum does not divide it)
    world_size: int
    num_workers: int  # resolved

    @property
    def epochs_trained(self) -> float:
        """How many epochs `max_steps` amounts to."""
        return self.max_steps / self.steps_per_epoch


def resolve_loop(cfg: LoopConfig, epoch_items: int, world: int | None = None) -> tuple[LoopConfig, LoopPlan]:
    """(cfg with `max_steps` derived from `epochs` when that is set, its plan). One epoch is `epoch_items` items,
    i.e. max(1, epoch_items // (batch_size * world)) micro-batches per rank (the data order drops the incomplete
    last global batch, as `ShardedBatches` does); `epochs` of them make ceil(epochs * micro / grad_accum) optimizer
    steps (the last step of a run may run into the next epoch's first micro-batches when grad_accum does not divide
    the epoch). Pure: the same inputs give the same numbers on every rank, in --print-config and in the run."""
    import dataclasses

    cfg.validate()
    if epoch_items < 1:
        raise UserError("the training set is empty")
    world = world or world_size()
    micro = max(1, epoch_items // (cfg.batch_size * world))
    if cfg.epochs is not None:
        cfg = dataclasses.replace(cfg, max_steps=math.ceil(cfg.epochs * micro / cfg.grad_accum))
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    plan = LoopPlan(max_steps=cfg.max_steps, epochs=cfg.epochs, epoch_items=epoch_items,
                    global_batch=cfg.batch_size * cfg.grad_accum * world, micro_batches_per_epoch=micro,
                    steps_per_epoch=micro / cfg.grad_accum, world_size=world, num_workers=workers)
    return cfg, plan


def loop_description(cfg: LoopConfig, plan: LoopPlan) -> dict[str, Any]:
    """The resolved loop for `--print-config` and the run's records: the config plus the derived numbers."""
    from dataclasses import asdict

    derived = asdict(plan)
    derived["epochs_trained"] = round(plan.epochs_trained, 4)
    return {**to_dict(cfg), "derived": derived}


class TrainTask(ABC):
    """What to train. The loop owns the optimizer, devices, precision, data order, checkpoints and logging.

    `modules()` returns every module `loss` uses, keyed by the task attribute that holds it: after
    `accelerator.prepare` the loop hands the (possibly DDP-wrapped) modules back through `use_modules`, which by
    default sets those attributes. `loss` must call each trainable module through its `__call__` (forward), so DDP
    synchronises its gradients. While training, those attributes may hold DDP wrappers: use `unwrap(self.x)` to reach
    the model itself (state_dict, EMA, save_pretrained).
    """

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]: ...

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]: ...

    @abstractmethod
    def train_dataset(self) -> torch.utils.data.Dataset: ...

    def val_dataset(self) -> torch.utils.data.Dataset | None:
        return None

    def epoch_items(self) -> int:
        """How many items one epoch (`LoopConfig.epochs`) is: by default the training dataset's length. A family
        whose dataset items are not what its papers count as an epoch says so here."""
        return len(self.train_dataset())

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    @abstractmethod
    def loss(self, batch: Any, generator: torch.Generator) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Scalar loss of one micro-batch; draw every random number from `generator` (a CPU generator). May return
        (loss, terms): named scalar tensors (the loss's parts), averaged and logged beside the loss."""

    def selection_metric(self, name: str) -> float | None:
        """Value of a model-selection metric other than the validation loss (lower is better), computed on the
        current weights (rank 0 only; modules are unwrapped and in eval mode). None = not available."""
        return None

    def make_optimizer(self, params: list[nn.Parameter], cfg: "LoopConfig") -> torch.optim.Optimizer:
        """The optimizer over exactly `params` (AdamW by default); a family may return another one or several
        parameter groups (e.g. a separate text-encoder learning rate), as long as it covers the same parameters."""
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def use_modules(self, modules: dict[str, nn.Module]) -> None:
        for name, m in modules.items():
            setattr(self, name, m)

    def state_dict(self) -> dict[str, Any]:
        """Extra state saved in checkpoints (e.g. EMA weights). Called on rank 0 only (no collectives here): the
        other ranks would only copy tensors to the CPU to throw them away."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_step_end(self, step: int) -> None:
        """Called after each optimizer step (gradients of that step are still present), e.g. EMA update."""

    def sample_grid(self, step: int, path: Path) -> bool:
        """Write a sample PNG to `path` (rank 0 only); return False if the task has none."""
        return False

    @abstractmethod
    def export(self, out_dir: Path) -> None:
        """Write the final artefact (weights / adapter) into `out_dir` (an empty temp dir renamed to run/final)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP (or torch.compile) wrapper; the module itself otherwise."""
    while isinstance(module, nn.parallel.DistributedDataParallel) or hasattr(module, "_orig_mod"):
        module = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module._orig_mod
    return module


# ---------------------------------------------------------------------------------------------------------------
# Seeds and data order: pure functions, so resume needs no iterator state.


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings (sha256, stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cpu_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


class ShardedBatches:
    """Micro-batch `k` (global count) -> the dataset indices of this rank. Epoch e is a permutation seeded by
    (seed, e); with fewer items than one global batch the permutation is tiled (tiny data sets still train)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n_items < 1:
            raise UserError("the training set is empty")
        self.n, self.bs, self.seed, self.rank, self.world = n_items, batch_size, seed, rank, world
        self.global_bs = batch_size * world
        self.per_epoch = max(1, n_items // self.global_bs)
        self._cache: tuple[int, list[int]] | None = None

    def epoch_of(self, k: int) -> int:
        return k // self.per_epoch

    def _order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            perm = torch.randperm(self.n, generator=cpu_generator(derive_seed("data", self.seed, epoch))).tolist()
            reps = math.ceil(self.global_bs / self.n)
            self._cache = (epoch, perm * reps)
        return self._cache[1]

    def indices(self, k: int) -> list[int]:
        epoch, b = divmod(k, self.per_epoch)
        order = self._order(epoch)
        start = b * self.global_bs + self.rank * self.bs
        return order[start : start + self.bs]


class _Batches(torch.utils.data.Sampler):
    """This rank's micro-batches start, start+1, ... (without end, across epochs) as lists of (epoch, index) keys:
    the epoch travels with each index, so one DataLoader (and its worker processes) serves the whole run."""

    def __init__(self, plan: ShardedBatches, start: int):
        self.plan, self.start = plan, start

    def __iter__(self):
        k = self.start
        while True:
            epoch = self.plan.epoch_of(k)
            yield [(epoch, i) for i in self.plan.indices(k)]
            k += 1


class _EpochItems(torch.utils.data.Dataset):
    """`dataset[(epoch, i)]` = item i of that epoch: calls the dataset's `set_epoch` when the epoch changes, in
    whichever process (main or worker) fetches the item, so persistent workers never serve a stale epoch."""

    def __init__(self, dataset):
        self.dataset, self.epoch = dataset, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[i]


def _micro_batch_loader(task: TrainTask, dataset, plan: ShardedBatches, start_k: int, workers: int, pin: bool):
    """The run's one DataLoader: micro-batches start_k, start_k+1, ... of this rank. Items are decoded in `workers`
    processes (0 = in the main process), `prefetch_factor` batches ahead per worker."""
    extra = {"persistent_workers": True, "prefetch_factor": 2} if workers > 0 else {}
    return torch.utils.data.DataLoader(_EpochItems(dataset), batch_sampler=_Batches(plan, start_k),
                                       collate_fn=task.collate, num_workers=workers, pin_memory=pin, **extra)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_dirs(run: Run) -> list[Path]:
    """Complete checkpoints (trainer_state.json present), oldest first."""
    root = run.checkpoints_dir
    if not root.is_dir():
        return []
    out = [d for d in root.iterdir() if d.is_dir() and CHECKPOINT_RE.match(d.name) and (d / STATE_FILE).is_file()]
    return sorted(out, key=lambda d: d.name)


def latest_checkpoint(run: Run) -> Path | None:
    dirs = checkpoint_dirs(run)
    return dirs[-1] if dirs else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _named_trainables(task: TrainTask) -> list[tuple[str, nn.Parameter]]:
    """Name every trainable parameter by the module that owns it (names are the checkpoint keys)."""
    params = task.trainable_parameters()
    if not params:
        raise ValueError("TrainTask.trainable_parameters() is empty")
    wanted = {id(p) for p in params}
    names: dict[int, str] = {}
    for mname, module in task.modules().items():
        for pname, p in module.named_parameters():
            if id(p) in wanted and id(p) not in names:
                names[id(p)] = f"{mname}.{pname}"
    missing = [p for p in params if id(p) not in names]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameter(s) belong to no module in TrainTask.modules()")
    if any(not p.requires_grad for p in params):
        raise ValueError("a parameter in trainable_parameters() has requires_grad=False")
    return [(names[id(p)], p) for p in params]


# ---------------------------------------------------------------------------------------------------------------
# The loop.


def _make_accelerator(cfg: LoopConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps its state in process-wide singletons that refuse a second, different mixed precision;
        # one process may legitimately train several times (VAE then UNet in the quickstart, sweeps, tests).
        AcceleratorState._reset_state()
        GradientState._reset_state()
    # cpu=True on a machine with no GPU: otherwise a torchrun launch silently runs N independent trainings.
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu_only())


def create_run_on_main(create: Callable[[], Run]) -> Run:
    """Call `create` on rank 0 only and give every rank the same Run (for `accelerate launch` of a trainer)."""
    from accelerate.utils import broadcast_object_list

    state = dist_state()
    if state.num_processes == 1:
        return create()
    holder = [str(create().dir) if state.is_main_process else None]
    broadcast_object_list(holder)
    return Run(Path(holder[0]))


def start_run(create: Callable[[], Run], logs: list[str] | tuple[str, ...] = (),
              on_run: Callable[[Run], None] | None = None) -> Run:
    """A family's new run: made on the main process (`create_run_on_main(create)`), then on rank 0 the lines its
    task logged before the run existed are written into it and `on_run(run)` is called (a sweep records the run
    dir there, before the first step)."""
    run = create_run_on_main(create)
    if dist_state().is_main_process:
        for line in logs:
            run.log(line)
        if on_run is not None:
            on_run(run)
    return run


def extend_run(run: Run, cfg: LoopConfig, max_steps: int | None) -> None:
    """`--resume RUN --max-steps N`: train `run` (whose loop config is `cfg`) to N steps instead, recorded in its
    config.json (an epoch count would take precedence over the new step count, so it is cleared)."""
    if max_steps is None or max_steps == cfg.max_steps:
        return
    cfg.max_steps, cfg.epochs = max_steps, None
    full = run.config()
    full["loop"]["max_steps"], full["loop"]["epochs"] = max_steps, None
    if isinstance(full.get("summary"), dict) and "steps" in full["summary"]:
        full["summary"]["steps"] = max_steps
    write_json(run.config_path, full)


def resume_run(run: Run, config_from_run: Callable[[Run], Any], build_task: Callable[..., tuple],
               max_steps: int | None = None, train: Callable[[TrainTask, Any, Run, bool], Any] | None = None) -> Run:
    """`--resume RUN [--max-steps N]` of a family: its typed config read back from the run (`config_from_run(run)`,
    with the LoopConfig as `.loop`), the task rebuilt (`build_task(cfg, log=run.log) -> (task, ...)`), and training
    continued exactly from the last checkpoint by `train(task, cfg, run, resume)` (default: `run_training`)."""
    cfg = config_from_run(run)
    extend_run(run, cfg.loop, max_steps)
    task = build_task(cfg, log=run.log)[0]
    (train or _train_loop)(task, cfg, run, True)
    return run


def continue_in_place(run: Run, config_from_run: Callable[[Run], Any], build_task: Callable[..., tuple],
                      train: Callable[[TrainTask, Any, Run, bool], Any] | None = None) -> Run:
    """Finish the training of `run` in its own directory (what a sweep rerun does after a kill): from its last
    checkpoint, or from step 0 when it was stopped before its first one. Arguments as for `resume_run`."""
    if latest_checkpoint(run) is not None:
        return resume_run(run, config_from_run, build_task, train=train)
    cfg = config_from_run(run)
    task = build_task(cfg, log=run.log)[0]
    (run.dir / TRAIN_LOG).unlink(missing_ok=True)  # lines of the killed attempt; this one logs the same steps again
    run.log("no checkpoint yet: training again from step 0 in the same run")
    (train or _train_loop)(task, cfg, run, False)
    return run


def _train_loop(task: TrainTask, cfg: Any, run: Run, resume: bool) -> None:
    run_training(task, cfg.loop, run, resume=resume)


def run_training(task: TrainTask, cfg: LoopConfig, run: Run, resume: bool = False) -> dict[str, Any]:
    """Train `task` for `cfg.max_steps` optimizer steps (or `cfg.epochs` epochs) into `run`; with `resume`, continue
    from the last checkpoint.

    A fresh run that fails before its first checkpoint (bad arguments, unreadable data, a crash in the first steps)
    is removed, so a failed start leaves no run directory behind; a resumed run is never removed.
    Returns the final stats (also written to run/train_stats.json): steps, last train loss, last val loss, time.
    """
    main = dist_state().is_main_process
    if main:
        _remove_stale_temp_dirs(run)
    had_checkpoint = latest_checkpoint(run) is not None
    try:
        return _run_training(task, cfg, run, resume)
    except BaseException:
        if main and not resume and not had_checkpoint and latest_checkpoint(run) is None and run.dir.is_dir():
            shutil.rmtree(run.dir, ignore_errors=True)
        raise


def check_resumable(run: Run) -> Path:
    """The checkpoint a resume of `run` would start from, after the checks that need no model: one exists and was
    written by as many processes as this launch has. Families call it before their expensive set-up (data, latents);
    `run_training(resume=True)` repeats the checks."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UserError("no complete checkpoint to resume from", run.checkpoints_dir)
    saved = int(json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")).get("world_size", 1))
    world = dist_state().num_processes
    if saved != world:
        raise UserError(f"cannot resume exactly: the checkpoint was trained on {saved} process(es), "
                        f"this launch has {world} (the data order depends on it)", ckpt)
    return ckpt


def _remove_stale_temp_dirs(run: Run) -> None:
    """Temp dirs of checkpoints / final artefacts that a killed run left behind (never complete, never read)."""
    for parent, pattern in ((run.checkpoints_dir, ".step-*.tmp-*"), (run.dir, f".{FINAL_DIR}.tmp-*"),
                            (run.dir, f".{BEST_DIR}.tmp-*")):
        if parent.is_dir():
            for d in parent.glob(pattern):
                shutil.rmtree(d, ignore_errors=True)


def _run_training(task: TrainTask, cfg: LoopConfig, run: Run, resume: bool) -> dict[str, Any]:
    from harness.progress import progress
    from rich.progress import TextColumn

    from harness.tracking import Trackers, check_available

    check_available(cfg.report_to)  # a missing tracker package: one line on every rank, before any work
    acc = _make_accelerator(cfg)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    cfg, loop_plan = resolve_loop(cfg, task.epoch_items(), world)
    if cfg.select_best not in ("none", "val_loss") and type(task).selection_metric is TrainTask.selection_metric:
        raise UserError(f"--select-best {cfg.select_best}: this model family cannot compute it (use val_loss)")
    if cfg.select_best == "val_loss" and task.val_dataset() is None:
        raise UserError("--select-best val_loss needs validation images (the split has none)")
    cuda = acc.device.type == "cuda"
    if cuda:  # TF32: ~8x the fp32 matmul/conv throughput of Ampere+ tensor cores at 10-bit mantissa precision
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    memory_format = torch.channels_last if (cfg.channels_last and cuda) else None
    torch.manual_seed(derive_seed("init", cfg.seed, rank))

    named = _named_trainables(task)
    trainable = [p for _, p in named]
    modules = task.modules()
    trainable_ids = {id(p) for p in trainable}
    has_trainable = {k: any(id(p) in trainable_ids for p in m.parameters()) for k, m in modules.items()}
    # Frozen modules are only moved; wrapping a module with no trainable parameter in DDP is an error.
    prepared: dict[str, nn.Module] = {}
    for k, m in modules.items():
        if memory_format is not None and has_trainable[k]:
            m = m.to(memory_format=memory_format)
        prepared[k] = acc.prepare_model(m) if has_trainable[k] else m.to(acc.device)
    for k, m in prepared.items():
        m.train(has_trainable[k])
    task.use_modules(prepared)

    optimizer = task.make_optimizer(trainable, cfg)
    optimizer = acc.prepare_optimizer(optimizer)
    warm = cfg.warmup_steps
    # Not prepared: accelerate's scheduler wrapper steps once per process, which would shorten the warm-up under DDP.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                                  lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)

    train_ds = task.train_dataset()
    plan = ShardedBatches(len(train_ds), cfg.batch_size, cfg.seed, rank, world)
    data_hashes = run.data_hashes()

    start_step, start_k = 0, 0
    resumed_best = None
    if resume:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise UserError("no complete checkpoint to resume from", run.checkpoints_dir)
        start_step, start_k = _load_checkpoint(ckpt, task, named, optimizer, scheduler, cfg, acc)
        resumed_best = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")).get("best")
        if main:
            _truncate_log(run.dir / TRAIN_LOG, start_step)
            run.log(f"resumed from {ckpt.name}")
    elif latest_checkpoint(run) is not None:
        raise UserError("run already has checkpoints; pass --resume to continue it", run.checkpoints_dir)

    if main:
        _record_loop(run, cfg)
        run.log(f"training steps {start_step}->{cfg.max_steps} on {acc.device} x{world} "
                f"(mixed precision {cfg.mixed_precision}, batch {cfg.batch_size}x{cfg.grad_accum}x{world}, "
                f"{loop_plan.steps_per_epoch:g} steps/epoch, {loop_plan.num_workers} loader workers)")
    A = cfg.grad_accum
    loader = _micro_batch_loader(task, train_ds, plan, start_k, loop_plan.num_workers, acc.device.type == "cuda")
    micro = iter(loader)
    ddp_modules = [prepared[k] for k in prepared if has_trainable[k]]
    last: dict[str, Any] = {"loss": None, "val_loss": None, "grad_norm": None}
    # Device-side accumulators: the loop reads them on the host only every `log_every` steps (and before a
    # checkpoint, a validation, a sample grid), so a step never waits for the GPU to finish.
    dev = acc.device
    window_sum, window_n = torch.zeros((), device=dev), 0
    term_sums: dict[str, torch.Tensor] = {}  # the loss's named parts, summed over the window's steps
    best: dict[str, Any] = dict(resumed_best or {"value": None, "step": None})  # the best so far survives resume
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # first step with a non-finite loss, -1 = none
    grad_norm: torch.Tensor | None = None
    t0 = time.perf_counter()
    samples_done, skipped, consecutive_skips = 0, 0, 0
    step, k = start_step, start_k

    def check_finite() -> None:
        bad = [int(b) for b in acc.gather(first_bad.view(1)).tolist() if b >= 0]
        if bad:
            kept = latest_checkpoint(run)
            where = f"the last good checkpoint is {kept.name}" if kept else "no checkpoint was written yet"
            raise UserError(f"non-finite training loss at step {min(bad) + 1}; stopped ({where}). Lower --lr, "
                            "raise --warmup-steps or use bf16 instead of fp16, then resume or start again", run.dir)

    # Trackers (--report-to) view what the loop writes into the run folder; rank 0 only.
    recorded = run.config(resolve=False) if run.config_path.is_file() else {}
    trackers = Trackers.start(cfg.report_to, run.dir, run.id, config={**recorded, "data": data_hashes},
                              group=recorded.get("family"), resume_step=start_step) if main else Trackers()

    def log(record: dict[str, Any]) -> None:
        _append_log(run, record)
        trackers.log_record(record)

    bar = progress(TextColumn("loss {task.fields[loss]}"))
    with bar if main else contextlib.nullcontext(), trackers:
        bar_task = bar.add_task("train", total=cfg.max_steps, completed=start_step, loss="-") if main else None
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=dev)
            for a in range(A):
                batch = _to_device(next(micro), dev, memory_format)
                # All randomness of micro-batch k: keyed by k (not the step), so a step retried after an fp16
                # overflow draws fresh noise for its fresh data, and resume re-derives it from k alone.
                torch.manual_seed(derive_seed("step-rng", cfg.seed, k, rank))  # dropout masks
                gen = cpu_generator(derive_seed("step", cfg.seed, k, rank))
                k += 1
                with contextlib.ExitStack() as stack:
                    if a < A - 1:  # accumulate locally, all-reduce on the last micro-batch only
                        for m in ddp_modules:
                            stack.enter_context(acc.no_sync(m))
                    with acc.autocast():
                        loss, terms = _split_loss(task.loss(batch, gen))
                    acc.backward(loss / A)
                step_loss += loss.detach().float() / A
                for name, v in terms.items():
                    term_sums[name] = term_sums.get(name, 0.0) + v.detach().float() / A
            if cfg.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            if cfg.mixed_precision == "fp16" and optimizer.step_was_skipped:
                # GradScaler found inf/nan gradients and skipped the update (and lowered its scale): nothing was
                # trained, so the step counter, the scheduler and the EMA stay where they are; the micro-batches
                # consumed are counted by k. (Reading the flag syncs, as the scaler's update already did.)
                skipped += 1
                consecutive_skips += 1
                if consecutive_skips >= 100:  # the scale has shrunk by 2**100: the forward itself overflows
                    raise UserError(f"fp16: 100 consecutive steps overflowed at step {step + 1} (the loss scale "
                                    "cannot fix this); train in bf16 or fp32", run.dir)
                continue
            consecutive_skips = 0
            scheduler.step()
            step += 1
            samples_done += cfg.batch_size * A * world
            task.on_step_end(step)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss),
                                    torch.full_like(first_bad, step - 1), first_bad)
            window_sum += step_loss
            window_n += 1
            if main:
                bar.update(bar_task, completed=step)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                check_finite()
                loss_value = float(acc.reduce(window_sum, reduction="mean")) / window_n
                gn = None if grad_norm is None else float(grad_norm)
                last["loss"], last["grad_norm"] = loss_value, gn
                if main:
                    bar.update(bar_task, loss=f"{loss_value:.4f}")
                    record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": gn,
                              "epoch": round(step / loop_plan.steps_per_epoch, 4), "micro_batches": k,
                              "samples_per_s": samples_done / max(time.perf_counter() - t0, 1e-9)}
                    if skipped:
                        record["skipped_steps"] = skipped
                else:
                    record = {}
                for name, v in term_sums.items():
                    value = float(acc.reduce(v, reduction="mean")) / window_n
                    record[name] = value
                if main:
                    log(record)
                window_sum, window_n, term_sums = torch.zeros((), device=dev), 0, {}
            if (cfg.val_every and step % cfg.val_every == 0) or step == cfg.max_steps:
                check_finite()
                val = _validate(task, cfg, acc, prepared, has_trainable)
                if val is not None:
                    last["val_loss"] = val
                    if main:
                        log({"step": step, "val_loss": val})
                if cfg.select_best != "none":
                    _keep_best(run, task, cfg, acc, prepared, has_trainable, step, val, best, loop_plan, data_hashes,
                               log=log)
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps) and main:
                path = run.dir / "samples" / f"step-{step:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                for m in prepared.values():
                    m.eval()
                with torch.no_grad(), _unwrapped(task, prepared):
                    if task.sample_grid(step, path):
                        trackers.log_image("samples", path, step)
                for k2, m in prepared.items():
                    m.train(has_trainable[k2])
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                check_finite()  # never checkpoint weights a non-finite loss has touched
                _save_checkpoint(run, step, k, task, named, optimizer, scheduler, cfg, loop_plan, data_hashes, acc,
                                 best)

    acc.wait_for_everyone()
    seconds = time.perf_counter() - t0
    task.use_modules({k: acc.unwrap_model(m, keep_fp32_wrapper=False) if has_trainable[k] else m
                      for k, m in prepared.items()})
    for m in task.modules().values():
        m.eval()
    stats = {"steps": step, "start_step": start_step, "final_loss": last["loss"], "val_loss": last["val_loss"],
             "select_best": None if cfg.select_best == "none" else {"metric": cfg.select_best, **best},
             "grad_norm": last["grad_norm"], "seconds": seconds, "skipped_steps": skipped,
             "samples_per_s": samples_done / max(seconds, 1e-9), "world_size": world, "device": str(acc.device),
             "loop": loop_description(cfg, loop_plan)}
    if main:
        _export_into(run, FINAL_DIR, task, {"step": step, "seed": cfg.seed, "loop": loop_description(cfg, loop_plan),
                                            "data": data_hashes, "run_id": run.id})
        write_json(run.dir / "train_stats.json", stats)
        FINISHED_RUNS.append(run)
        run.log(f"finished at step {step} (loss {last['loss']}, val {last['val_loss']}) in {seconds:.1f}s")
    acc.wait_for_everyone()
    return stats


def _record_loop(run: Run, cfg: LoopConfig) -> None:
    """Write the resolved training length into the run's config.json (loop.max_steps derived from loop.epochs, and
    summary.steps), so the run says what it trains; the other derived numbers go to trainer_state.json and
    train_stats.json (config.json stays loadable as the family's typed config)."""
    from harness.io import read_json

    if not run.config_path.is_file():
        return
    full = read_json(run.config_path)
    loop = full.get("loop")
    if not isinstance(loop, dict):
        return
    new = dict(full)
    new["loop"] = {**loop, "max_steps": cfg.max_steps, "epochs": cfg.epochs}
    if isinstance(full.get("summary"), dict) and "steps" in full["summary"]:
        new["summary"] = {**full["summary"], "steps": cfg.max_steps}
    if new != full:
        write_json(run.config_path, new)


def _to_device(batch: Any, device: torch.device, memory_format: torch.memory_format | None = None) -> Any:
    if isinstance(batch, torch.Tensor):
        if memory_format is not None and batch.dim() == 4:
            return batch.to(device, non_blocking=True, memory_format=memory_format)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, memory_format) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(_to_device(v, device, memory_format) for v in batch)
    return batch


def _split_loss(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(out, tuple):
        loss, terms = out
        return loss, dict(terms)
    return out, {}


def _keep_best(run: Run, task: TrainTask, cfg: LoopConfig, acc, prepared, has_trainable, step: int,
               val: float | None, best: dict, plan: LoopPlan, data_hashes: dict,
               log: Callable[[dict], None] | None = None) -> None:
    """After a validation: compute the selection metric; when it improves, export the weights into run/best/
    (atomically, with provenance.json naming metric, value and step). Lower is better for both metrics."""
    if cfg.select_best == "val_loss":
        value = val
    else:
        value = None
        if acc.is_main_process:
            for m in prepared.values():
                m.eval()
            try:
                with torch.no_grad(), _unwrapped(task, prepared):
                    value = task.selection_metric(cfg.select_best)
            finally:
                for k, m in prepared.items():
                    m.train(has_trainable[k])
        holder = [value]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(holder)
        value = holder[0]
    if value is None:
        return
    if best["value"] is not None and not value < best["value"]:
        return
    best.update(value=float(value), step=step)
    if acc.is_main_process:
        (log or (lambda r: _append_log(run, r)))({"step": step, f"best_{cfg.select_best}": float(value)})
        with _unwrapped(task, prepared):
            _export_into(run, BEST_DIR, task, {"step": step, "seed": cfg.seed, "metric": cfg.select_best,
                                              "value": float(value), "loop": loop_description(cfg, plan),
                                              "data": data_hashes, "run_id": run.id})
    acc.wait_for_everyone()


def _export_into(run: Run, name: str, task: TrainTask, provenance: dict) -> None:
    """task.export into a temp dir, renamed to run/<name> (replacing a previous one)."""
    final = run.dir / name
    tmp = run.dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        task.export(tmp)
        write_json(tmp / "provenance.json", provenance)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _unwrapped(task: TrainTask, prepared: dict[str, nn.Module]):
    """Evaluate through the bare modules: a DDP forward broadcasts buffers (a collective), so a forward that not
    every rank makes - rank 0's sample grid, a validation batch only some ranks have - would wait forever."""
    task.use_modules({k: unwrap(m) for k, m in prepared.items()})
    try:
        yield
    finally:
        task.use_modules(prepared)


def _validate(task: TrainTask, cfg: LoopConfig, acc, prepared, has_trainable) -> float | None:
    """Mean loss over the first `val_batches` batches of the validation set, fixed order and fixed noise seeds, so
    successive values are comparable (differences come from the weights only). Dropout off."""
    ds = task.val_dataset()
    if ds is None or len(ds) == 0:
        return None
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(0)
    n = len(ds)
    total, count = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
    for m in prepared.values():
        m.eval()
    try:
        with torch.no_grad(), _unwrapped(task, prepared):
            for b in range(cfg.val_batches):
                # Batch b of the global validation pass, this rank's share; stop when the set is exhausted.
                start = (b * acc.num_processes + acc.process_index) * cfg.batch_size
                if start >= n:
                    break
                idx = list(range(start, min(start + cfg.batch_size, n)))
                batch = _to_device(task.collate([ds[i] for i in idx]), acc.device)
                gen = cpu_generator(derive_seed("val", cfg.seed, b, acc.process_index))
                with acc.autocast():
                    loss, _ = _split_loss(task.loss(batch, gen))
                total += loss.float() * len(idx)
                count += len(idx)
    finally:
        for k, m in prepared.items():
            m.train(has_trainable[k])
    total, count = acc.reduce(total, reduction="sum"), acc.reduce(count, reduction="sum")
    return float(total / count) if float(count) > 0 else None


def _append_log(run: Run, record: dict[str, Any]) -> None:
    with open(run.dir / TRAIN_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run logged them, the resumed run
    will log them again)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()
            and json.loads(ln).get("step", 0) <= step]
    write_text(path, "".join(ln + "\n" for ln in keep))


def _save_checkpoint(run: Run, step: int, k: int, task: TrainTask, named, optimizer, scheduler, cfg: LoopConfig,
                     plan: LoopPlan, data_hashes: dict, acc, best: dict) -> None:
    from safetensors.torch import save_file

    acc.wait_for_everyone()
    if acc.is_main_process:
        task_state = task.state_dict()
        root = run.checkpoints_dir
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:07d}"
        tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in named}
            save_file(tensors, str(tmp / "trainable.safetensors"), metadata={"step": str(step), "run_id": run.id})
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(task_state, tmp / "task_state.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            if acc.scaler is not None:  # fp16: the loss scale and its growth tracker, for an exact resume
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
            state = {"step": step, "micro_batches": k, "world_size": acc.num_processes, "epochs": cfg.epochs,
                     "max_steps": cfg.max_steps, "seed": cfg.seed, "loop": loop_description(cfg, plan),
                     "data": data_hashes, "run_id": run.id, "best": dict(best)}
            write_json(tmp / STATE_FILE, state)
            if final.exists():  # a re-run of the same step after resume: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in checkpoint_dirs(run)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _load_checkpoint(ckpt: Path, task: TrainTask, named, optimizer, scheduler, cfg: LoopConfig, acc) -> tuple[int, int]:
    """Restore a checkpoint; returns (step, micro-batches consumed)."""
    from safetensors.torch import load_file

    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    old = state.get("loop", {})
    for key in ("seed", "batch_size", "grad_accum"):
        if key in old and old[key] != getattr(cfg, key):
            raise UserError(f"cannot resume exactly: checkpoint has {key}={old[key]}, now {getattr(cfg, key)}", ckpt)
    if int(state.get("world_size", 1)) != acc.num_processes:
        raise UserError(f"cannot resume exactly: the checkpoint was trained on {state['world_size']} process(es), "
                        f"this launch has {acc.num_processes} (the data order depends on it)", ckpt)
    step = int(state["step"])
    if step >= cfg.max_steps:
        raise UserError(f"checkpoint is at step {step}, max_steps is {cfg.max_steps}: nothing to do "
                        "(raise --max-steps or --epochs to train further)", ckpt)
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    missing = [n for n, _ in named if n not in tensors]
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} trainable tensor(s), e.g. {missing[0]}", ckpt)
    with torch.no_grad():
        for name, p in named:
            if tensors[name].shape != p.shape:
                raise UserError(f"{name}: checkpoint shape {tuple(tensors[name].shape)} != {tuple(p.shape)}", ckpt)
            p.copy_(tensors[name].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=False))
    task.load_state_dict(torch.load(ckpt / "task_state.pt", map_location="cpu", weights_only=False))
    if acc.scaler is not None and (ckpt / "scaler.pt").is_file():
        acc.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", map_location="cpu", weights_only=False))
    if acc.process_index == 0:
        _set_rng_state(torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=False))
    return step, int(state.get("micro_batches", step * cfg.grad_accum))
