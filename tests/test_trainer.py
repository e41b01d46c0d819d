"""The shared training loop on a toy task: exact resume, clipping of the trainable parameters, checkpoints, logs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from harness.errors import UserError
from harness.runs import create_run
from harness.trainer import (FINAL_DIR, LoopConfig, ShardedBatches, TrainTask, checkpoint_dirs, latest_checkpoint,
                             run_training, unwrap)


class ToyTask(TrainTask):
    """Noisy regression with dropout, so resume equality covers data order, loss noise and dropout masks.

    `frozen` takes part in the loss but is not trained; `head` is trained (clipping must touch only `head`)."""

    def __init__(self, n: int = 24, scale: float = 1.0):
        torch.manual_seed(123)
        self.frozen = nn.Linear(4, 16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x.sum(1, keepdim=True) * scale)
        self.ema = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        self.grad_norms: list[float] = []
        self.exported = False

    def trainable_parameters(self):
        return list(self.head.parameters())

    def modules(self):
        return {"frozen": self.frozen, "head": self.head}

    def train_dataset(self):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def val_dataset(self):
        return torch.utils.data.TensorDataset(self.x[:8], self.y[:8])

    def loss(self, batch, generator):
        x, y = batch
        noise = torch.randn(x.shape, generator=generator).to(x.device) * 0.1
        return ((self.head(self.frozen(x + noise)) - y) ** 2).mean()

    def on_step_end(self, step):
        self.grad_norms.append(float(torch.norm(torch.stack([p.grad.norm() for p in self.head.parameters()]))))
        with torch.no_grad():
            for k, v in unwrap(self.head).state_dict().items():
                self.ema[k].mul_(0.9).add_(v, alpha=0.1)

    def state_dict(self):
        return {"ema": {k: v.clone() for k, v in self.ema.items()}}

    def load_state_dict(self, state):
        self.ema = {k: v.clone() for k, v in state["ema"].items()}

    def export(self, out_dir):
        torch.save(unwrap(self.head).state_dict(), out_dir / "head.pt")
        self.exported = True


def _cfg(**kw):
    base = dict(seed=3, max_steps=8, batch_size=5, grad_accum=2, lr=3e-2, warmup_steps=3, max_grad_norm=1.0,
                checkpoint_every=2, keep_last=2, val_every=4, val_batches=2, log_every=1)
    base.update(kw)
    return LoopConfig(**base)


def _params(task):
    return torch.cat([p.detach().flatten() for p in task.head.parameters()])


def test_resume_is_exact(tmp_path):
    straight = ToyTask()
    run_a = create_run("toy", {}, {"csv_sha256": "x"}, run_id="a")
    stats = run_training(straight, _cfg(), run_a)
    assert stats["steps"] == 8 and straight.exported

    first = ToyTask()
    run_b = create_run("toy", {}, {"csv_sha256": "x"}, run_id="b")
    run_training(first, _cfg(max_steps=4), run_b)
    resumed = ToyTask()  # a fresh process: new objects, weights from the checkpoint only
    run_training(resumed, _cfg(), run_b, resume=True)

    diff = (_params(straight) - _params(resumed)).abs().max().item()
    assert diff <= 1e-6, diff
    assert (_params(straight) - _params(ToyTask())).abs().max() > 1e-2  # it did train
    for k in straight.ema:  # extra task state (EMA) went through the checkpoint too
        assert torch.allclose(straight.ema[k], resumed.ema[k], atol=1e-6)
    # the log of the resumed run equals the straight run's (lines after the checkpoint are not duplicated)
    log_a = [json.loads(ln) for ln in (run_a.dir / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(ln) for ln in (run_b.dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-6)


def test_checkpoints_keep_last_atomic_and_provenance(tmp_path):
    task = ToyTask()
    run = create_run("toy", {}, {"csv_sha256": "abc"}, run_id="c")
    run_training(task, _cfg(), run)
    names = [d.name for d in checkpoint_dirs(run)]
    assert names == ["step-0000006", "step-0000008"]  # keep_last=2
    assert not [p for p in run.checkpoints_dir.iterdir() if p.name.startswith(".")]  # no temp dirs left
    ckpt = latest_checkpoint(run)
    for f in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "task_state.pt", "rng.pt", "trainer_state.json"):
        assert (ckpt / f).is_file(), f
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["micro_batches"] == 16 and state["seed"] == 3
    assert state["data"] == {"csv_sha256": "abc"} and state["loop"]["batch_size"] == 5
    from safetensors.torch import load_file

    keys = set(load_file(str(ckpt / "trainable.safetensors")))
    assert keys == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}  # trainable only, named
    prov = json.loads((run.dir / FINAL_DIR / "provenance.json").read_text())
    assert prov["seed"] == 3 and prov["data"] == {"csv_sha256": "abc"} and prov["step"] == 8
    assert (run.dir / FINAL_DIR / "head.pt").is_file()
    log = [json.loads(ln) for ln in (run.dir / "train_log.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(vals) == 2 and all(v > 0 for v in vals)  # steps 4 and 8
    assert json.loads((run.dir / "train_stats.json").read_text())["steps"] == 8


def test_clipping_applies_to_the_trainable_parameters(tmp_path):
    task = ToyTask(scale=1000.0)  # huge targets -> huge gradients
    frozen_before = task.frozen.weight.detach().clone()
    run = create_run("toy", {}, {}, run_id="clip")
    run_training(task, _cfg(max_steps=3, max_grad_norm=0.05, checkpoint_every=0), run)
    log = [r for r in map(json.loads, (run.dir / "train_log.jsonl").read_text().splitlines()) if "val_loss" not in r]
    assert len(log) == 3 and all(r["grad_norm"] > 10.0 for r in log)  # the norm before clipping, as logged
    # what the optimizer saw: the trainable parameters' gradients, clipped to the limit
    assert task.grad_norms == pytest.approx([0.05] * 3, rel=1e-4)
    assert torch.equal(task.frozen.weight, frozen_before)

    unclipped = ToyTask(scale=1000.0)
    run_training(unclipped, _cfg(max_steps=3, max_grad_norm=0.0, checkpoint_every=0),
                 create_run("toy", {}, {}, run_id="noclip"))
    assert min(unclipped.grad_norms) > 10.0


def test_resume_guards(tmp_path):
    run = create_run("toy", {}, {}, run_id="g")
    with pytest.raises(UserError, match="no complete checkpoint"):
        run_training(ToyTask(), _cfg(max_steps=2), run, resume=True)
    run_training(ToyTask(), _cfg(max_steps=2), run)
    with pytest.raises(UserError, match="--resume"):
        run_training(ToyTask(), _cfg(max_steps=4), run)
    with pytest.raises(UserError, match="batch_size"):
        run_training(ToyTask(), _cfg(max_steps=4, batch_size=3), run, resume=True)
    with pytest.raises(UserError, match="nothing to do"):
        run_training(ToyTask(), _cfg(max_steps=2), run, resume=True)


def test_bf16_mixed_precision_trains(tmp_path):
    task = ToyTask()
    before = _params(task).clone()
    stats = run_training(task, _cfg(max_steps=2, mixed_precision="bf16", checkpoint_every=0),
                         create_run("toy", {}, {}, run_id="bf16"))
    assert stats["final_loss"] is not None and not torch.equal(before, _params(task))


def test_sharded_batches_partition_each_epoch():
    world = 3
    plans = [ShardedBatches(20, 2, seed=5, rank=r, world=world) for r in range(world)]
    assert plans[0].per_epoch == 3  # 20 // (2*3): the incomplete last global batch is dropped
    for k in range(plans[0].per_epoch * 2):
        shards = [p.indices(k) for p in plans]
        flat = [i for s in shards for i in s]
        assert len(flat) == len(set(flat)) == 6
    epoch0 = [i for k in range(3) for p in plans for i in p.indices(k)]
    assert len(set(epoch0)) == 18
    assert plans[0].indices(0) != plans[0].indices(3)  # a new permutation next epoch
    assert ShardedBatches(2, 4, seed=0).indices(0) != []  # fewer items than a batch: tiled, still full
    assert len(ShardedBatches(2, 4, seed=0).indices(0)) == 4


def test_loop_config_rejects_bad_values():
    with pytest.raises(UserError, match="batch_size"):
        LoopConfig(batch_size=0)
    with pytest.raises(UserError, match="mixed_precision"):
        LoopConfig(mixed_precision="fp8")
    # What the CLI's ranges refuse must also be refused from a --config file or a sweep grid (loop.seed=-1 and
    # max_grad_norm=nan used to train).
    for bad in (dict(seed=-1), dict(seed=2**32), dict(lr=float("inf")), dict(lr=float("nan")),
                dict(max_grad_norm=float("nan")), dict(weight_decay=float("inf"))):
        with pytest.raises(UserError, match=next(iter(bad))):
            LoopConfig(**bad)


class EpochData(torch.utils.data.Dataset):
    """Items that depend on the epoch (like augmentation drawn from (seed, epoch, index)): a worker serving a stale
    epoch would change the training."""

    def __init__(self, x, y):
        self.x, self.y, self.epoch = x, y, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * self.epoch, self.y[i]


class EpochToyTask(ToyTask):
    def train_dataset(self):
        if not hasattr(self, "_ds"):
            self._ds = EpochData(self.x, self.y)
        return self._ds


def test_workers_give_the_same_training_as_the_main_process(tmp_path):
    # 24 items, batch 5 x accum 2: 4 micro-batches per epoch, so 8 steps cross 4 epochs
    a, b = EpochToyTask(), EpochToyTask()
    run_training(a, _cfg(num_workers=0, checkpoint_every=0), create_run("toy", {}, {}, run_id="w0"))
    run_training(b, _cfg(num_workers=2, checkpoint_every=0), create_run("toy", {}, {}, run_id="w2"))
    assert torch.equal(_params(a), _params(b))


def test_epochs_resolve_to_steps_and_are_recorded(tmp_path):
    from harness.trainer import resolve_loop

    cfg, plan = resolve_loop(LoopConfig(epochs=3, batch_size=5, grad_accum=2, max_steps=999), 24, world=1)
    # 24 // 5 = 4 micro-batches per epoch (last partial batch dropped), 3 epochs = 12 micro = 6 optimizer steps
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, cfg.max_steps) == (4, 2.0, 6)
    assert plan.global_batch == 10 and cfg.epochs == 3
    _, plan2 = resolve_loop(LoopConfig(epochs=3, batch_size=5, grad_accum=3), 24, world=2)
    assert plan2.micro_batches_per_epoch == 2 and plan2.max_steps == 2  # ceil(3 * 2 / 3)
    assert resolve_loop(LoopConfig(max_steps=7), 24)[1].max_steps == 7  # no epochs: steps as given

    run = create_run("toy", {"loop": {"max_steps": 1000, "epochs": 2}, "summary": {"steps": 1000}}, {}, run_id="ep")
    stats = run_training(ToyTask(), _cfg(epochs=2, max_steps=1000, checkpoint_every=0), run)
    assert stats["steps"] == 4
    conf = json.loads(run.config_path.read_text())
    assert conf["loop"]["max_steps"] == 4 and conf["loop"]["epochs"] == 2 and conf["summary"]["steps"] == 4
    assert json.loads((run.dir / "train_stats.json").read_text())["loop"]["derived"]["steps_per_epoch"] == 2.0
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["epochs"] == 2 and state["max_steps"] == 4
    assert state["loop"]["derived"]["micro_batches_per_epoch"] == 4


def test_logs_only_every_log_every_steps(tmp_path):
    run = create_run("toy", {}, {}, run_id="le")
    run_training(ToyTask(), _cfg(max_steps=7, log_every=3, val_every=0, checkpoint_every=0), run)
    log = [json.loads(ln) for ln in (run.dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [3, 6, 7]  # and the last step


class NaNTask(ToyTask):
    """The loss turns NaN from step `bad` on (1-based), as a diverging run would."""

    def __init__(self, bad: int):
        super().__init__()
        self.bad, self.calls = bad, 0

    def loss(self, batch, generator):
        self.calls += 1
        out = super().loss(batch, generator)
        step = (self.calls - 1) // 2 + 1  # grad_accum 2
        return out * float("nan") if step >= self.bad else out


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = create_run("toy", {}, {}, run_id="nan")
    with pytest.raises(UserError, match=r"non-finite training loss at step 5.*step-0000004"):
        run_training(NaNTask(bad=5), _cfg(log_every=3, val_every=0), run)
    assert [d.name for d in checkpoint_dirs(run)] == ["step-0000002", "step-0000004"]  # step 6 was never saved
    from safetensors.torch import load_file

    t = load_file(str(latest_checkpoint(run) / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in t.values())


def test_failed_fresh_run_leaves_no_run_directory(tmp_path):
    run = create_run("toy", {}, {}, run_id="fail")

    class Broken(ToyTask):
        def train_dataset(self):
            raise UserError("bad data")

    with pytest.raises(UserError, match="bad data"):
        run_training(Broken(), _cfg(), run)
    assert not run.dir.exists()
    # a NaN before the first checkpoint: nothing to resume from, so nothing left either
    run2 = create_run("toy", {}, {}, run_id="fail2")
    with pytest.raises(UserError, match="no checkpoint was written yet"):
        run_training(NaNTask(bad=1), _cfg(log_every=1), run2)
    assert not run2.dir.exists()
    # a resumed run that fails keeps its directory and checkpoints
    run3 = create_run("toy", {}, {}, run_id="keep")
    run_training(ToyTask(), _cfg(max_steps=2), run3)
    with pytest.raises(UserError):
        run_training(Broken(), _cfg(max_steps=4), run3, resume=True)
    assert latest_checkpoint(run3) is not None


def test_resume_refuses_another_world_size_and_removes_stale_temp_dirs(tmp_path):
    run = create_run("toy", {}, {}, run_id="ws")
    run_training(ToyTask(), _cfg(max_steps=2), run)
    stale = run.checkpoints_dir / ".step-0000003.tmp-4242"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"partial")
    ckpt = latest_checkpoint(run)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(UserError, match="trained on 2 process"):
        run_training(ToyTask(), _cfg(max_steps=4), run, resume=True)
    assert not stale.exists()


def test_cli_loop_options():
    import click

    from harness.cli.common import pop_loop_overrides

    with pytest.raises(UserError, match="not both"):
        pop_loop_overrides({"epochs": 3, "max_steps": 10})
    # --max-steps clears an epoch count coming from a preset or config file; unset options are absent
    assert pop_loop_overrides({"max_steps": 10, "lr": None, "other": 1}) == {"max_steps": 10, "epochs": None}
    assert pop_loop_overrides({"epochs": 2}) == {"epochs": 2}

    from harness.cli.common import print_config, training_options

    @click.command()
    @training_options
    def cmd(**kw):
        print_config({"loop": pop_loop_overrides(kw), "print": kw["print_config"]})

    from click.testing import CliRunner

    r = CliRunner().invoke(cmd, ["--split", "s", "--data", "d", "--epochs", "3", "--print-config"])
    assert r.exit_code == 0 and json.loads(r.output) == {"loop": {"epochs": 3}, "print": True}
    for bad in (["--batch-size", "0"], ["--lr", "0"], ["--log-every", "0"], ["--num-workers", "-1"],
                ["--seed", "-1"], ["--epochs", "0"], ["--checkpoint-every", "-1"]):
        r = CliRunner().invoke(cmd, ["--split", "s", "--data", "d", *bad])
        assert r.exit_code == 2, bad


class TermsTask(ToyTask):
    def loss(self, batch, generator):
        out = super().loss(batch, generator)
        return out, {"half": out.detach() / 2}


def test_loss_terms_are_logged_beside_the_loss(tmp_path):
    run = create_run("toy", {}, {}, run_id="terms")
    run_training(TermsTask(), _cfg(max_steps=4, log_every=2, checkpoint_every=0, val_every=0), run)
    rows = [r for r in map(json.loads, (run.dir / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["half"] == pytest.approx(r["loss"] / 2, rel=1e-6) for r in rows)


def test_select_best_needs_a_metric_the_family_has(tmp_path):
    with pytest.raises(UserError, match="cannot compute it"):
        run_training(ToyTask(), _cfg(select_best="fid"), create_run("toy", {}, {}, run_id="fid"))
    run = create_run("toy", {}, {}, run_id="bestval")
    run_training(ToyTask(), _cfg(select_best="val_loss", val_every=2, checkpoint_every=0), run)
    prov = json.loads((run.dir / "best" / "provenance.json").read_text())
    vals = {r["step"]: r["val_loss"] for r in map(json.loads, (run.dir / "train_log.jsonl").read_text().splitlines())
            if "val_loss" in r}
    assert prov["step"] == min(vals, key=vals.get) and (run.dir / "best" / "head.pt").is_file()


def test_an_overflow_skipped_step_advances_nothing_but_the_data(monkeypatch, tmp_path):
    """fp16: when the GradScaler skips an update (inf/nan gradients), step, scheduler and EMA (on_step_end) stay;
    only the micro-batches consumed move on. (The GradScaler itself needs CUDA; the skip flag is simulated.)"""
    from accelerate.optimizer import AcceleratedOptimizer

    calls = {"n": 0}

    def skipped(self):
        calls["n"] += 1
        return calls["n"] == 2  # the second optimizer step overflows

    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(skipped))
    task = ToyTask()
    steps_seen = []
    task.on_step_end = lambda step: steps_seen.append(step)
    run = create_run("toy", {}, {}, run_id="skip")
    stats = run_training(task, _cfg(max_steps=3, mixed_precision="fp16", checkpoint_every=0, val_every=0), run)
    assert steps_seen == [1, 2, 3] and stats["steps"] == 3 and stats["skipped_steps"] == 1
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["micro_batches"] == 8  # 4 optimizer attempts x grad_accum 2
    sched = torch.load(latest_checkpoint(run) / "scheduler.pt", weights_only=False)
    assert sched["last_epoch"] == 3  # the scheduler stepped once per applied update
