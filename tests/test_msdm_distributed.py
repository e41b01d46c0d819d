"""MSDM UNet under `accelerate launch` with 2 CPU processes: latent preparation on each rank's device under
main_process_first with rank 0's measured scale broadcast, EMA checkpointed by rank 0 only, one run directory, and a
resume with another world size refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # two processes + a VAE: ~1-2 min on 2 cores
def test_msdm_unet_trains_with_two_processes_and_refuses_a_one_process_resume(tmp_path, sample_dir, run_cli):
    import torch

    from harness.data import load_devset
    from harness.split import write_split
    from models.tiny_clip import save_tiny_clip_text

    runs = tmp_path / "runs"
    split = tmp_path / "split.json"
    write_split(sample_dir, split, val_images=8, seed=0)
    clip = save_tiny_clip_text(tmp_path / "clip", load_devset(sample_dir).unique_prompts())
    env = {**os.environ, "HARNESS_RUNS_DIR": str(runs), "HARNESS_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    code, _, err = run_cli("train", "msdm-vae", "--split", split, "--data", sample_dir, "--preset", "tiny",
                           "--max-steps", "2", "--batch-size", "4", "--run-id", "vae")
    assert code == 0, err
    vae = os.path.join(os.environ["HARNESS_RUNS_DIR"], "vae")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "harness", "train", "msdm-unet", "--split", str(split), "--data", str(sample_dir), "--vae", vae,
           "--text-encoder", str(clip), "--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "1",
           "--log-every", "1", "--val-every", "0", "--sample-every", "0", "--num-workers", "0", "--run-id", "ddp"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["ddp", "vae"]  # one new run
    run = runs / "ddp"
    state = json.loads((run / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["micro_batches"] == 2
    ema = torch.load(run / "checkpoints" / "step-0000002" / "task_state.pt", weights_only=False)["ema"]
    assert ema and all(e.device.type == "cpu" for e in ema)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["latent_scale"] > 0 and cfg["cache_latents"]  # tiny preset: cached posteriors, one scale for all
    steps = [r["step"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2]  # logged once, by rank 0

    code, _, err = run_cli("train", "msdm-unet", "--split", split, "--data", sample_dir, "--resume", run,
                           "--max-steps", "4")
    assert code == 2 and "trained on 2 process(es), this launch has 1" in err and len(err.strip().splitlines()) == 1
