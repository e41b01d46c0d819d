"""Trackers (`--report-to`): a tiny training logs loss, its terms, lr, grad norm, throughput, validation loss and the
sample grid to TensorBoard event files under RUN/tracking (read back with TensorBoard's own reader); the run folder
is unchanged; a missing package is one line before any training; W&B offline; every train and sweep command has
the option; a sweep logs its cell table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.io import read_json, write_json


@pytest.fixture(scope="module")
def split8(tmp_path_factory):
    from harness.sample import sample_dir
    from harness.split import make_split

    root = tmp_path_factory.mktemp("tracking")
    split = make_split(sample_dir(), val_images=4, seed=0)
    split["train"] = split["train"][:8]
    write_json(root / "split8.json", split)
    return sample_dir(), root / "split8.json"


def _vae_args(split8, *extra):
    data, split = split8
    return ("train", "msdm-vae", "--split", split, "--data", data, "--preset", "tiny", "--max-steps", "2",
            "--batch-size", "4", "--resolution", "32", "--jitter", "0", "--perceptual-weight", "0",
            "--log-every", "1", "--val-every", "2", "--sample-every", "2",
            "--checkpoint-every", "0", "--num-workers", "0", *extra)


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_tensorboard_logs_the_run_and_the_run_folder_stays_the_record(split8, run_cli):
    code, out, err = run_cli(*_vae_args(split8, "--report-to", "tensorboard", "--select-best", "val_loss",
                                        "--run-id", "tb"))
    assert code == 0, err
    runs = Path(__import__("os").environ["HARNESS_RUNS_DIR"])
    run = runs / "tb"
    assert read_json(run / "config.json")["loop"]["report_to"] == "tensorboard"
    ea = _events(run / "tracking" / "tensorboard")
    scalars = set(ea.Tags()["scalars"])
    # loss, lr, grad norm, throughput, validation loss and the VAE's loss terms (mse, ssim, kl, ...)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "val/loss",
            "val/best_val_loss"} <= scalars
    log = [json.loads(ln) for ln in (run / "train_log.jsonl").read_text().splitlines()]
    terms = {k for r in log if "loss" in r for k in r} - {"step", "loss", "lr", "grad_norm", "samples_per_s",
                                                           "epoch", "micro_batches"}
    assert terms and {f"train/{t}" for t in terms} <= scalars
    # the values are the run folder's: same steps, same numbers as train_log.jsonl
    loss = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in log if "loss" in r}, rel=1e-6)
    lr = {e.step: e.value for e in ea.Scalars("train/lr")}
    assert lr == pytest.approx({r["step"]: r["lr"] for r in log if "lr" in r}, rel=1e-6)
    assert [e.step for e in ea.Scalars("val/loss")] == [2]
    assert "samples" in ea.Tags()["images"] and (run / "samples" / "step-0000002.png").is_file()
    assert ea.Images("samples")[0].step == 2


def test_default_none_writes_no_tracker_files(split8, run_cli):
    code, out, err = run_cli(*_vae_args(split8, "--run-id", "plain"))
    assert code == 0, err
    run = Path(__import__("os").environ["HARNESS_RUNS_DIR"]) / "plain"
    assert read_json(run / "config.json")["loop"]["report_to"] == "none"
    assert not (run / "tracking").exists()


def test_missing_package_is_one_line_before_training(split8, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ModuleNotFoundError
    code, out, err = run_cli(*_vae_args(split8, "--report-to", "tensorboard,wandb", "--run-id", "nope"))
    assert code == 2
    assert 'pip install -e ".[tracking]"' in err and "tensorboard" in err and "Traceback" not in err
    assert not (Path(__import__("os").environ["HARNESS_RUNS_DIR"]) / "nope").exists()


def test_report_to_values():
    from harness.tracking import normalize_report_to, parse_report_to
    from harness.trainer import LoopConfig

    assert parse_report_to("none") == () and parse_report_to(None) == ()
    assert parse_report_to(" TensorBoard, wandb,tensorboard") == ("tensorboard", "wandb")
    assert normalize_report_to("wandb, tensorboard") == "wandb,tensorboard"
    assert LoopConfig(report_to="TensorBoard").report_to == "tensorboard"
    for bad in ("mlflow", "none,wandb", "tensorboard,comet"):
        with pytest.raises(UserError, match="--report-to"):
            LoopConfig(report_to=bad)


def test_every_train_and_sweep_command_has_report_to():
    from harness.cli import cli
    from harness.families.registry import reference_families

    for group in ("train", "sweep"):
        for name, cmd in cli.commands[group].commands.items():
            if name == "status" or name in reference_families():  # references train nothing (seconds, no loop)
                continue
            opt = [p for p in cmd.params if p.name == "report_to"]
            assert opt, f"harness {group} {name} lacks --report-to"
            assert "default none" in opt[0].help.lower() and "tensorboard" in opt[0].help
            # --push-to-hub: on every train command, on no sweep (`harness push` takes a cell's run)
            assert any(p.name == "push_to_hub" for p in cmd.params) == (group == "train"), (group, name)


def test_wandb_offline_logs_into_the_run_folder(tmp_path, monkeypatch):
    """W&B in offline mode (no network needed): the run's records go to RUN/tracking/wandb/offline-run-*."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    from harness.tracking import Trackers

    folder = tmp_path / "run"
    with Trackers.start("wandb", folder, "run-x", config={"loop": {"lr": 1e-4, "epochs": None}}) as t:
        assert t.names == ("wandb",) and t
        t.log_record({"step": 1, "loss": 0.5, "lr": 1e-4, "grad_norm": None, "mse": 0.25, "micro_batches": 2})
        t.log_table("sweep/cells", ["cell", "fid"], [["4", 12.5]], step=1)
    runs = list((folder / "tracking" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_unreachable_host_falls_back_to_offline(monkeypatch):
    """Online mode with no network: a short TCP probe decides, wandb.init never waits for the host."""
    import harness.tracking as tracking

    monkeypatch.delenv("WANDB_MODE", raising=False)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: connection refused at once
    assert tracking.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"


def test_resume_purges_the_killed_attempts_steps(tmp_path):
    """A resumed run's TensorBoard writer hides the steps after its checkpoint that the killed attempt logged (as
    train_log.jsonl is truncated), so each step shows once."""
    from harness.tracking import Trackers

    with Trackers.start("tensorboard", tmp_path, "r") as t:
        for s in range(1, 6):
            t.log_record({"step": s, "loss": float(s)})
    with Trackers.start("tensorboard", tmp_path, "r", resume_step=3) as t:
        for s in range(4, 7):
            t.log_record({"step": s, "loss": 10.0 + s})
    ea = _events(tmp_path / "tracking" / "tensorboard")
    assert {e.step: e.value for e in ea.Scalars("train/loss")} == {1: 1.0, 2: 2.0, 3: 3.0, 4: 14.0, 5: 15.0,
                                                                   6: 16.0}
    with Trackers.start("tensorboard", tmp_path, "r") as t:  # retrained from step 0 in the same run
        t.log_record({"step": 1, "loss": 7.0})
    ea = _events(tmp_path / "tracking" / "tensorboard")
    assert {e.step: e.value for e in ea.Scalars("train/loss")} == {1: 7.0}


def test_sweep_table_has_each_cells_final_metrics(tmp_path):
    from harness.sweep import SWEEP_TABLE_COLUMNS, log_sweep_table, sweep_table_rows

    iv = {"fid": {"value": 41.5, "low": 38.0, "high": 45.25}, "precision": {"value": 0.5},
          "recall": {"value": 0.25}, "f1": {"value": 0.33}}
    record = {"family": "kandinsky-prior", "prompts": {"n": 2000}, "ranks": {
        "4": {"status": "done", "run": "/r/k-r4", "trainable": 1310720, "val_loss": 0.12, "intervals": iv,
              "vs_best": {"best": True}},
        "8": {"status": "done", "run": "/r/k-r8", "val_loss": 0.11, "intervals": iv,
              "vs_best": {"best": False, "indistinguishable": True}},
        "16": {"status": "failed", "error": "boom"}}}
    rows = sweep_table_rows(record)
    assert rows[0] == ["4", "done", "k-r4", 1310720, None, 0.12, 2000, 41.5, 38.0, 45.25, 0.5, 0.25, 0.33, True]
    assert rows[1][-1] is True and rows[2][:3] == ["16", "failed", None] and rows[2][6] is None
    assert len(SWEEP_TABLE_COLUMNS) == len(rows[0])
    log_sweep_table(record, tmp_path / "sw", "none")
    assert not (tmp_path / "sw").exists()
    log_sweep_table(record, tmp_path / "sw", "tensorboard")
    ea = _events(tmp_path / "sw" / "tracking" / "tensorboard")
    (tag,) = [t for t in ea.Tags()["tensors"] if t.startswith("sweep/cells")]
    event = ea.Tensors(tag)[-1]
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 2 and "| 4 | done | k-r4 | 1310720 |  | 0.12 | 2000 | 41.5 | 38 | 45.25 |" in text


@pytest.mark.slow
def test_sweep_cells_log_and_the_sweep_logs_its_table(tmp_path, monkeypatch, run_cli):
    """`harness sweep msdm-unet --report-to tensorboard`: each cell's run logs under RUN/tracking, the sweep logs its
    cell table under SWEEP_DIR/tracking; the tracker is not part of the sweep's identity (a rerun without it finds
    the same default sweep dir and skips the finished cells)."""
    from harness.data import load_devset
    from harness.families.msdm.config import vae_config
    from harness.families.msdm.train import train
    from harness.sample import sample_dir
    from harness.split import make_split
    from models.tiny_clip import save_tiny_clip_text

    runs = tmp_path / "runs"
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(runs))
    data = sample_dir()
    split = make_split(data, val_images=4, seed=0)
    split["train"] = split["train"][:8]
    write_json(tmp_path / "split.json", split)
    clip = save_tiny_clip_text(tmp_path / "clip", load_devset(data).unique_prompts())
    vae = train(vae_config("tiny", data, tmp_path / "split.json", {
        "data": {"jitter": 0.0, "resolution": 32}, "loss": {"perceptual_weight": 0.0},
        "loop": {"batch_size": 4, "checkpoint_every": 0, "val_every": 0, "sample_every": 0, "max_steps": 1}}))
    args = ["sweep", "msdm-unet", "--split", tmp_path / "split.json", "--data", data, "--vae", vae.dir,
            "--text-encoder", clip, "--jitter", "0", "--max-steps", "1", "--batch-size", "4", "--steps", "2",
            "--grid", "lr=1e-3,2e-3", "--n-prompts", "1", "--images-per-prompt", "1", "--no-score",
            "--device", "cpu", "--num-workers", "0"]
    code, out, err = run_cli(*args, "--report-to", "tensorboard")
    assert code == 0, err
    (sweep_dir,) = list((runs / "sweeps").iterdir())
    rec = read_json(sweep_dir / "sweep.json")
    assert rec["base_config"]["loop"]["report_to"] == "tensorboard"
    for cell in rec["cells"].values():
        assert "train/loss" in _events(Path(cell["run"]) / "tracking" / "tensorboard").Tags()["scalars"]
    ea = _events(sweep_dir / "tracking" / "tensorboard")
    (tag,) = [t for t in ea.Tags()["tensors"] if t.startswith("sweep/cells")]
    text = ea.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    assert "| cell | status | run |" in text and "lr=0.001" not in text  # one-axis grid: labels are the values
    assert "| 0.001 | done |" in text and "| 0.002 | done |" in text
    code, out, err = run_cli(*args)  # no tracker this time: same sweep, nothing retrained
    assert code == 0 and (out + err).count("skipped") == 2, err
    assert list((runs / "sweeps").iterdir()) == [sweep_dir]
    assert read_json(sweep_dir / "sweep.json")["base_config"]["loop"]["report_to"] == "none"
    code, out, err = run_cli(*args, "--grid", "report_to=wandb")  # a view, not a training option
    assert code == 2 and "'report_to' is not a training option" in err


@pytest.mark.slow
def test_two_processes_log_once_from_rank_zero(tmp_path):
    """`accelerate launch` with 2 CPU processes and --report-to tensorboard: one event folder, written by rank 0,
    each step once, the values of the reduced loss train_log.jsonl records; nothing hangs."""
    import os
    import subprocess

    from harness.sample import sample_dir
    from harness.split import make_split

    split = make_split(sample_dir(), val_images=4, seed=0)
    split["train"] = split["train"][:8]
    write_json(tmp_path / "split.json", split)
    runs = tmp_path / "runs"
    env = {**os.environ, "HARNESS_RUNS_DIR": str(runs), "HARNESS_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "harness",
           *map(str, _vae_args((sample_dir(), tmp_path / "split.json"), "--batch-size", "2", "--report-to",
                               "tensorboard", "--run-id", "ddp"))]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    run = runs / "ddp"
    assert "x2" in (run / "log.txt").read_text()
    ea = _events(run / "tracking" / "tensorboard")
    log = [json.loads(ln) for ln in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2]
    assert {e.step: e.value for e in ea.Scalars("train/loss")} == pytest.approx(
        {r["step"]: r["loss"] for r in log if "loss" in r}, rel=1e-6)
    assert len(list((run / "tracking" / "tensorboard").glob("events.out.tfevents.*"))) == 1
