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
TRAIN_LOG = "train_log.jsonl"
STATE_FILE = "trainer_state.json"


@dataclass
class LoopConfig:
    """Options of the training loop; the CLI's shared training options map 1:1 onto these fields."""

    seed: int = 0
    max_steps: int = 1000  # optimizer steps
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
    log_every: int = 10
    num_workers: int = 0

    def validate(self) -> None:
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "keep_last": self.keep_last, "log_every": self.log_every, "val_batches": self.val_batches}
        for k, v in positive.items():
            if v < 1:
                raise UserError(f"LoopConfig.{k} must be >= 1, got {v}")
        non_negative = {"checkpoint_every": self.checkpoint_every, "val_every": self.val_every,
                        "sample_every": self.sample_every, "warmup_steps": self.warmup_steps,
                        "num_workers": self.num_workers, "max_grad_norm": self.max_grad_norm,
                        "weight_decay": self.weight_decay}
        for k, v in non_negative.items():
            if v < 0:
                raise UserError(f"LoopConfig.{k} must be >= 0, got {v}")
        if not self.lr > 0:
            raise UserError(f"LoopConfig.lr must be > 0, got {self.lr}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UserError(f"LoopConfig.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")

    def __post_init__(self) -> None:
        self.validate()


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

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    @abstractmethod
    def loss(self, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Scalar loss of one micro-batch; draw every random number from `generator` (a CPU generator)."""

    def make_optimizer(self, params: list[nn.Parameter], cfg: "LoopConfig") -> torch.optim.Optimizer:
        """The optimizer over exactly `params` (AdamW by default); a family may return another one or several
        parameter groups (e.g. a separate text-encoder learning rate), as long as it covers the same parameters."""
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def use_modules(self, modules: dict[str, nn.Module]) -> None:
        for name, m in modules.items():
            setattr(self, name, m)

    def state_dict(self) -> dict[str, Any]:
        """Extra state saved in checkpoints (e.g. EMA weights)."""
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
    """Yields this rank's index lists for micro-batches start, start+1, ... of one epoch (for a DataLoader)."""

    def __init__(self, plan: ShardedBatches, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        for k in range(self.start, self.stop):
            yield self.plan.indices(k)

    def __len__(self) -> int:
        return self.stop - self.start


def _iter_micro_batches(task: TrainTask, dataset, plan: ShardedBatches, start_k: int, cfg: LoopConfig):
    """(k, batch) for k = start_k, start_k+1, ...; the dataset's epoch is set before each epoch is loaded."""
    k = start_k
    while True:
        epoch = plan.epoch_of(k)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        stop = (epoch + 1) * plan.per_epoch
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=_Batches(plan, k, stop),
                                             collate_fn=task.collate, num_workers=cfg.num_workers)
        for batch in loader:
            yield k, batch
            k += 1


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


def run_training(task: TrainTask, cfg: LoopConfig, run: Run, resume: bool = False) -> dict[str, Any]:
    """Train `task` for `cfg.max_steps` optimizer steps into `run`; with `resume`, continue from the last checkpoint.

    Returns the final stats (also written to run/train_stats.json): steps, last train loss, last val loss, time.
    """
    from harness.progress import progress
    from rich.progress import TextColumn

    cfg.validate()
    acc = _make_accelerator(cfg)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    torch.manual_seed(derive_seed("init", cfg.seed, rank))

    named = _named_trainables(task)
    trainable = [p for _, p in named]
    modules = task.modules()
    trainable_ids = {id(p) for p in trainable}
    has_trainable = {k: any(id(p) in trainable_ids for p in m.parameters()) for k, m in modules.items()}
    # Frozen modules are only moved; wrapping a module with no trainable parameter in DDP is an error.
    prepared: dict[str, nn.Module] = {}
    for k, m in modules.items():
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

    start_step = 0
    if resume:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise UserError("no complete checkpoint to resume from", run.checkpoints_dir)
        start_step = _load_checkpoint(ckpt, task, named, optimizer, scheduler, cfg, rank)
        if main:
            _truncate_log(run.dir / TRAIN_LOG, start_step)
            run.log(f"resumed from {ckpt.name}")
    elif latest_checkpoint(run) is not None:
        raise UserError("run already has checkpoints; pass --resume to continue it", run.checkpoints_dir)

    if main:
        run.log(f"training steps {start_step}->{cfg.max_steps} on {acc.device} x{world} "
                f"(mixed precision {cfg.mixed_precision}, batch {cfg.batch_size}x{cfg.grad_accum}x{world})")
    A = cfg.grad_accum
    micro = _iter_micro_batches(task, train_ds, plan, start_step * A, cfg)
    ddp_modules = [prepared[k] for k in prepared if has_trainable[k]]
    last: dict[str, Any] = {"loss": None, "val_loss": None, "grad_norm": None}
    window: list[float] = []
    t0 = time.perf_counter()
    samples_done = 0
    step = start_step

    bar = progress(TextColumn("loss {task.fields[loss]}"))
    with bar if main else contextlib.nullcontext():
        bar_task = bar.add_task("train", total=cfg.max_steps, completed=start_step, loss="-") if main else None
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=acc.device)
            for a in range(A):
                k, batch = next(micro)
                batch = _to_device(batch, acc.device)
                torch.manual_seed(derive_seed("step-rng", cfg.seed, step, a, rank))  # dropout masks
                gen = cpu_generator(derive_seed("step", cfg.seed, step, a, rank))
                with contextlib.ExitStack() as stack:
                    if a < A - 1:  # accumulate locally, all-reduce on the last micro-batch only
                        for m in ddp_modules:
                            stack.enter_context(acc.no_sync(m))
                    with acc.autocast():
                        loss = task.loss(batch, gen)
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
                    acc.backward(loss / A)
                step_loss += loss.detach() / A
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            step += 1
            samples_done += cfg.batch_size * A * world
            task.on_step_end(step)

            loss_value = float(acc.reduce(step_loss, reduction="mean"))
            window.append(loss_value)
            last["loss"], last["grad_norm"] = loss_value, grad_norm
            if main:
                bar.update(bar_task, completed=step, loss=f"{loss_value:.4f}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                if main:
                    _append_log(run, {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                                      "grad_norm": grad_norm, "epoch": plan.epoch_of(step * A - 1),
                                      "samples_per_s": samples_done / max(time.perf_counter() - t0, 1e-9)})
                window = []
            if (cfg.val_every and step % cfg.val_every == 0) or step == cfg.max_steps:
                val = _validate(task, cfg, acc, prepared, has_trainable)
                if val is not None:
                    last["val_loss"] = val
                    if main:
                        _append_log(run, {"step": step, "val_loss": val})
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps) and main:
                path = run.dir / "samples" / f"step-{step:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                for m in prepared.values():
                    m.eval()
                with torch.no_grad(), _unwrapped(task, prepared):
                    task.sample_grid(step, path)
                for k2, m in prepared.items():
                    m.train(has_trainable[k2])
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                _save_checkpoint(run, step, task, named, optimizer, scheduler, cfg, data_hashes, acc)

    acc.wait_for_everyone()
    seconds = time.perf_counter() - t0
    task.use_modules({k: acc.unwrap_model(m, keep_fp32_wrapper=False) if has_trainable[k] else m
                      for k, m in prepared.items()})
    for m in task.modules().values():
        m.eval()
    stats = {"steps": step, "start_step": start_step, "final_loss": last["loss"], "val_loss": last["val_loss"],
             "grad_norm": last["grad_norm"], "seconds": seconds,
             "samples_per_s": samples_done / max(seconds, 1e-9), "world_size": world, "device": str(acc.device),
             "loop": to_dict(cfg)}
    if main:
        final = run.dir / FINAL_DIR
        tmp = run.dir / f".{FINAL_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            task.export(tmp)
            write_json(tmp / "provenance.json", {"step": step, "seed": cfg.seed, "loop": to_dict(cfg),
                                                 "data": data_hashes, "run_id": run.id})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_json(run.dir / "train_stats.json", stats)
        run.log(f"finished at step {step} (loss {last['loss']}, val {last['val_loss']}) in {seconds:.1f}s")
    acc.wait_for_everyone()
    return stats


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


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
                    loss = task.loss(batch, gen)
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


def _save_checkpoint(run: Run, step: int, task: TrainTask, named, optimizer, scheduler, cfg: LoopConfig,
                     data_hashes: dict, acc) -> None:
    from safetensors.torch import save_file

    acc.wait_for_everyone()
    task_state = task.state_dict()  # every rank calls it: a task may gather across ranks
    if acc.is_main_process:
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
            state = {"step": step, "micro_batches": step * cfg.grad_accum, "world_size": acc.num_processes,
                     "seed": cfg.seed, "loop": to_dict(cfg), "data": data_hashes, "run_id": run.id}
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


def _load_checkpoint(ckpt: Path, task: TrainTask, named, optimizer, scheduler, cfg: LoopConfig, rank: int) -> int:
    from safetensors.torch import load_file

    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    old = state.get("loop", {})
    for key in ("seed", "batch_size", "grad_accum"):
        if key in old and old[key] != getattr(cfg, key):
            raise UserError(f"cannot resume exactly: checkpoint has {key}={old[key]}, now {getattr(cfg, key)}", ckpt)
    step = int(state["step"])
    if step >= cfg.max_steps:
        raise UserError(f"checkpoint is at step {step}, max_steps is {cfg.max_steps}: nothing to do "
                        "(raise --max-steps to train further)", ckpt)
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
    if rank == 0:
        _set_rng_state(torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=False))
    return step
