"""`harness sweep sd`: the any-axis sweep over SD's options (two methods x two ranks) runs end to end on the tiny
pipeline and resumes after a SIGKILL of the real process mid-training; `--dry-run` counts every cell on the real
SD 1.5 architecture (meta device, shipped configs) without data or weights."""

from __future__ import annotations

import json
from pathlib import Path

from test_sd_fixtures import _one_torch_thread, sd_data, tiny_sd  # noqa: F401 (fixtures)


def test_dry_run_counts_cells_on_the_real_sd15_architecture(run_cli):
    code, out, err = run_cli("sweep", "sd", "--grid", "method=lora,bitfit", "--dry-run")
    assert code == 0, err
    assert "797,184" in out  # LoRA r=4 on to_q,to_k,to_v,to_out.0 of the SD 1.5 U-Net
    assert "343,684" in out  # BitFit: the SD 1.5 U-Net's bias parameters
    code, _, err = run_cli("sweep", "sd", "--grid", "nope=1,2", "--dry-run")
    assert code == 2 and "nope" in err and "rank" in err


def test_sweep_needs_split_and_data_unless_dry_run(run_cli):
    code, _, err = run_cli("sweep", "sd", "--grid", "rank=4,8")
    assert code == 2 and "--split is required" in err


def test_two_methods_by_two_ranks_run_end_to_end_and_resume_a_sigkilled_cell(tiny_sd, sd_data, tmp_path, run_cli):
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps({"generation": {"steps": 2}}))
    args = ["sweep", "sd", "--split", str(sd_data[1]), "--data", str(sd_data[0]), "--base", str(tiny_sd),
            "--config", str(gen), "--grid", "method=lora,dora", "--grid", "rank=2,3", "--resolution", "32",
            "--batch-size", "2", "--max-steps", "6", "--checkpoint-every", "1", "--keep-last", "2",
            "--val-every", "0", "--n-prompts", "1", "--images-per-prompt", "1", "--no-score", "--device", "cpu",
            "--cache-dir", str(tmp_path / "c"), "--sweep-dir", str(tmp_path / "sw")]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HARNESS_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rec_path = tmp_path / "sw" / "sweep.json"
    first = "method=lora,rank=2"
    run_dir = None
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if rec_path.is_file():
                run_ref = json.loads(rec_path.read_text()).get("cells", {}).get(first, {}).get("run")
                if run_ref and list(Path(run_ref).glob("checkpoints/step-*/trainer_state.json")):
                    run_dir = Path(run_ref)
                    break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert run_dir is not None, err.decode()[-2000:]
    assert not (run_dir / "final").exists()  # killed mid-training
    killed_at = max(int(p.name[5:]) for p in run_dir.glob("checkpoints/step-*") if (p / "trainer_state.json").is_file())

    code, out, err = run_cli(*args)
    assert code == 0, err
    rec = json.loads(rec_path.read_text())
    labels = ["method=lora,rank=2", "method=lora,rank=3", "method=dora,rank=2", "method=dora,rank=3"]
    assert sorted(rec["cells"]) == sorted(labels) and rec["axes"] == ["method", "rank"] and rec["family"] == "sd"
    assert rec["base_config"]["method"] is None and rec["base_config"]["rank"] is None
    counts = {}
    for label, cell in rec["cells"].items():
        assert cell["status"] == "done" and cell["n_images"] == 1, (label, cell)
        cfg = json.loads((Path(cell["run"]) / "config.json").read_text())
        assert (cfg["method"], cfg["rank"]) == (cell["params"]["method"], cell["params"]["rank"])
        assert (Path(cell["run"]) / "final" / "sd_meta.json").is_file()
        counts[label] = cell["trainable"]  # counted on the tiny base's own configs (a local folder)
    assert counts["method=lora,rank=2"] * 3 == counts["method=lora,rank=3"] * 2
    assert counts["method=dora,rank=2"] > counts["method=lora,rank=2"]  # + the magnitude vectors
    # the killed cell was continued in the run dir recorded before training, not restarted
    assert Path(rec["cells"][first]["run"]) == run_dir
    stats = json.loads((run_dir / "train_stats.json").read_text())
    assert stats["start_step"] >= killed_at and stats["steps"] == 6
    runs = sorted(d for d in (tmp_path / "runs").iterdir() if d.name.startswith("sd"))
    assert len(runs) == 4  # one run per cell, none started twice
    import csv

    rows = {tuple((r["prompt"], r["seed"]) for r in csv.DictReader(
        (Path(c["run"]) / "images" / "manifest.csv").open(encoding="utf-8"))) for c in rec["cells"].values()}
    assert len(rows) == 1  # every cell generated the same prompt with the same seed

    code, out, err = run_cli(*args)  # rerun: every cell done, nothing trains
    assert code == 0 and (out + err).count("skipped") == 4
    assert len([d for d in (tmp_path / "runs").iterdir() if d.name.startswith("sd")]) == 4
