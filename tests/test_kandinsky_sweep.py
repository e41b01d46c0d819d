"""Rank sweep: train -> generate -> score per rank; a crash is recorded and the sweep goes on; a rerun skips the
finished ranks and retries the failed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_config, tiny_kandinsky  # noqa: F401 (fixtures)


def test_sweep_records_a_crash_continues_and_rerun_skips_done(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    import harness.families.kandinsky22.train as tk
    from harness.sweep import run_sweep

    cfg = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, loop={"max_steps": 2})
    real_train = tk.train
    trained: list[int] = []

    def flaky_train(c, *a, **k):
        trained.append(c.lora.rank)
        if c.lora.rank == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_train(c, *a, **k)

    monkeypatch.setattr(tk, "train", flaky_train)
    scored: list[str] = []

    class FakeResult:  # harness.score needs Inception/VGG weights, which tests cannot download
        def __init__(self, run):
            self.path = run.dir / "metrics.json"

        def summary_line(self):
            return "FID 1.000 (N_gen=2 N_real=2)"

    import harness.score as score_mod

    monkeypatch.setattr(score_mod, "score_run", lambda run, cfg=None, **k: (scored.append(run.id), FakeResult(run))[1])
    sweep_dir = tmp_path / "sweep"
    res = run_sweep(cfg, [2, 3, 5], sweep_dir=sweep_dir, n_prompts=2, gen_batch_size=2, device="cpu",
                    images_per_prompt=1)
    rec = json.loads((sweep_dir / "sweep.json").read_text())
    assert [rec["ranks"][r]["status"] for r in ("2", "3", "5")] == ["done", "failed", "done"]
    assert "CUDA out of memory (simulated)" in rec["ranks"]["3"]["error"]
    assert res.failed() == [3] and trained == [2, 3, 5] and len(scored) == 2
    for r in ("2", "5"):
        e = rec["ranks"][r]
        run_dir = Path(e["run"])
        assert json.loads((run_dir / "config.json").read_text())["summary"]["rank"] == int(r)
        assert len(list((run_dir / "images").glob("*.png"))) == 2 and e["n_images"] == 2
        assert e["metrics_summary"].startswith("FID") and e["trainable"] == 327_680 * int(r)
    assert (sweep_dir / "val-prompts.txt").read_text().count("\n") == 2
    assert (sweep_dir / "leaderboard.md").is_file() and rec["ranks"]["2"]["leaderboard"].endswith("leaderboard.md")

    # Rerun: the failed rank is retried, finished ones are skipped.
    trained.clear()
    res2 = run_sweep(cfg, [2, 3, 5], sweep_dir=sweep_dir, n_prompts=2, gen_batch_size=2, device="cpu",
                    images_per_prompt=1)
    assert trained == [3] and res2.failed() == [3]
    monkeypatch.setattr(tk, "train", real_train)
    res3 = run_sweep(cfg, [2, 3, 5], sweep_dir=sweep_dir, n_prompts=2, gen_batch_size=2, device="cpu",
                    images_per_prompt=1)
    assert res3.failed() == [] and res3.record["ranks"]["3"]["status"] == "done"

    # The same dir with another base config is refused instead of mixing two sweeps.
    other = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, loop={"max_steps": 3})
    import pytest

    from harness.errors import UserError

    with pytest.raises(UserError, match="another base config"):
        run_sweep(other, [2], sweep_dir=sweep_dir, n_prompts=2, device="cpu", images_per_prompt=1)


def _sweep_args(tiny_kandinsky, mini_data, tmp_path, *extra) -> list[str]:
    return ["sweep", "kandinsky-prior", "--split", str(mini_data[1]), "--data", str(mini_data[0]),
            "--prior", str(tiny_kandinsky[0]), "--decoder", str(tiny_kandinsky[1]), "--ranks", "2",
            "--batch-size", "2", "--resolution", "32", "--n-prompts", "1", "--images-per-prompt", "1", "--no-score",
            "--device", "cpu", "--cache-dir", str(tmp_path / "c"), "--sweep-dir", str(tmp_path / "sw"), *extra]


def test_sweep_continues_a_sigkilled_training_in_the_same_run(tiny_kandinsky, mini_data, tmp_path, run_cli):
    """A real `harness sweep` process is SIGKILLed while its rank trains; the rerun finishes the run directory that
    sweep.json recorded before training began, from its last checkpoint (the step counter continues)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    args = _sweep_args(tiny_kandinsky, mini_data, tmp_path, "--max-steps", "30", "--checkpoint-every", "1",
                       "--keep-last", "2")
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HARNESS_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rec_path = tmp_path / "sw" / "sweep.json"
    run_dir = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if rec_path.is_file():
                run_ref = json.loads(rec_path.read_text()).get("ranks", {}).get("2", {}).get("run")
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
    assert 1 <= killed_at < 30

    code, out, err = run_cli(*args)
    assert code == 0, err
    rec = json.loads(rec_path.read_text())
    assert rec["ranks"]["2"]["status"] == "done" and Path(rec["ranks"]["2"]["run"]) == run_dir
    stats = json.loads((run_dir / "train_stats.json").read_text())
    assert stats["start_step"] >= killed_at and stats["steps"] == 30  # continued, not restarted
    assert f"resumed from step-{stats['start_step']:07d}" in (run_dir / "log.txt").read_text()
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    runs = [d for d in (tmp_path / "runs").iterdir() if d.is_dir() and d.name.startswith("kandinsky-prior")]
    assert runs == [run_dir]  # no second run was started


def test_sweep_refuses_a_rerun_with_another_protocol(tiny_kandinsky, mini_data, tmp_path, run_cli):
    """Every option that changes a rank's results is part of the sweep's identity."""
    args = _sweep_args(tiny_kandinsky, mini_data, tmp_path, "--max-steps", "1", "--dry-run")
    base = [a for a in args if a != "--dry-run"]
    code, out, err = run_cli(*base)
    assert code == 0, err
    changes = [("--n-prompts", "2", "n_prompts"), ("--gen-seed", "7", "gen_seed"),
               ("--images-per-prompt", "2", "images_per_prompt"), ("--max-steps", "2", "max_steps"),
               ("--decoder-steps", "7", "decoder_steps"), ("--decoder-guidance", "2.5", "decoder_guidance")]
    for opt, value, key in changes:
        changed = list(base)
        if opt in changed:
            changed[changed.index(opt) + 1] = value
        else:
            changed += [opt, value]
        code, out, err = run_cli(*changed)
        assert code == 2 and key in err and "another base config or protocol" in err, (opt, err)


def test_sweep_reports_a_bad_base_model_once(tiny_kandinsky, mini_data, tmp_path, run_cli):
    args = _sweep_args(tiny_kandinsky, mini_data, tmp_path, "--max-steps", "1")
    args[args.index("--prior") + 1] = str(tmp_path / "no-such-prior")
    args[args.index("--ranks") + 1] = "2,4,8"
    code, out, err = run_cli(*args)
    assert code == 2 and err.count("no-such-prior") == 1 and "Traceback" not in err
    assert not (tmp_path / "sw").exists()  # nothing recorded for a sweep that cannot start


def test_sweep_cli_end_to_end(tiny_kandinsky, mini_data, tmp_path, run_cli):
    args = ["sweep", "kandinsky-decoder", "--split", mini_data[1], "--data", mini_data[0], "--prior", tiny_kandinsky[0],
            "--decoder", tiny_kandinsky[1], "--ranks", "2", "--max-steps", "1", "--batch-size", "2", "--resolution",
            "32", "--n-prompts", "1", "--images-per-prompt", "1", "--no-score", "--device", "cpu", "--cache-dir", tmp_path / "c", "--sweep-dir",
            tmp_path / "sw"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "done" in out and "411,648" in out  # rank 2 -> 2 x 205,824 trainable on the real decoder
    rec = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert rec["family"] == "kandinsky-decoder" and rec["ranks"]["2"]["status"] == "done"
    code, out, err = run_cli(*args)  # rerun: nothing to do
    assert code == 0 and "skipped" in err + out


def test_sweep_intervals_marks_and_plot(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    """Each scored rank gets bootstrap intervals (harness.stats) and a paired comparison with the best rank; the
    table says which ranks are indistinguishable from the best; the plot has the intervals. The score stack needs
    Inception/VGG weights, so the run's features are synthetic here: rank 2 = the real distribution, rank 3 = a
    shift far below the noise of 300 images, rank 5 = a shift far above it."""
    import numpy as np

    import harness.score as score_mod
    import harness.sweep as sweep
    from harness.runs import open_run

    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    shift = {2: 0.0, 3: 0.02, 5: 1.0}
    gen = {r: rng.normal(size=(300, 8)) for r in shift}

    def features(run):
        r = open_run(run.dir).config()["summary"]["rank"]
        g = gen[r] + shift[r]
        return {"fid": (g, real), "prc": (g, real)}

    class FakeResult:
        def __init__(self, run):
            self.path = run.dir / "metrics.json"

        def summary_line(self):
            return "scored"

    monkeypatch.setattr(score_mod, "score_run", lambda run, cfg=None, **k: FakeResult(run))
    monkeypatch.setattr(sweep, "rank_features", features)
    monkeypatch.setattr(sweep, "N_BOOT", 50)
    cfg = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, loop={"max_steps": 1})
    res = sweep.run_sweep(cfg, [2, 3, 5], sweep_dir=tmp_path / "sw", n_prompts=1, gen_batch_size=2, device="cpu",
                          images_per_prompt=1)
    rec = res.record
    assert rec["best_rank"] in (2, 3)
    for r in ("2", "3", "5"):
        iv = rec["ranks"][r]["intervals"]
        assert set(iv) == {"fid", "precision", "recall", "f1"}
        assert iv["fid"]["low"] <= iv["fid"]["value"] <= iv["fid"]["high"] and iv["fid"]["n_boot"] == 50
    other = "3" if rec["best_rank"] == 2 else "2"
    assert rec["ranks"][other]["vs_best"]["indistinguishable"] is True
    assert rec["ranks"]["5"]["vs_best"]["indistinguishable"] is False and rec["ranks"]["5"]["vs_best"]["low"] > 0
    assert (tmp_path / "sw" / "sweep.png").is_file()
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(res.table())
    text = console.export_text()
    assert "best rank" in text and "≈" in text and "worse" in text


@pytest.mark.slow  # builds and runs a random Inception (~10 s on CPU)
def test_rank_features_reads_what_harness_score_cached(tmp_path, sample_dir, monkeypatch):
    """The sweep's intervals are computed from the very features `harness score` extracted (feature cache keys in
    metrics.json), so the interval's centre is the reported FID. Random Inception weights: wiring, not values."""
    import numpy as np

    from harness.features import write_random_weights
    from harness.generate import TestPatternGenerator, generate_images
    from harness.runs import create_run
    from harness.score import INCEPTION, ScoreConfig, score_run
    from harness.sweep import _intervals, rank_features

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    run = create_run("test", {}, {})
    generate_images(TestPatternGenerator(size=64), [f"prompt {i}" for i in range(6)], run.images_dir)
    real = tmp_path / "real"
    real.mkdir()
    for p in sorted((sample_dir / "images").iterdir())[:6]:
        (real / p.name).write_bytes(p.read_bytes())
    w = write_random_weights(INCEPTION, tmp_path / "inception.pth")
    result = score_run(run, ScoreConfig(real=str(real), metrics=["fid"], inception_weights=w, device="cpu",
                                        allow_unverified_weights=True))
    feats = rank_features(run)
    assert set(feats) == {"fid"} and feats["fid"][0].shape == (6, 2048) and feats["fid"][1].shape == (6, 2048)
    iv = _intervals(feats)
    assert np.isclose(iv["fid"]["value"], result.metrics["fid"]["value"], rtol=1e-5)
