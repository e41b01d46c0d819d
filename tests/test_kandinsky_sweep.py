"""Rank sweep: train -> generate -> score per rank; a crash is recorded and the sweep goes on; a rerun skips the
finished ranks and retries the failed one."""

from __future__ import annotations

import json
from pathlib import Path

from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_config, tiny_kandinsky  # noqa: F401 (fixtures)


def test_sweep_records_a_crash_continues_and_rerun_skips_done(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    import harness.train_kandinsky as tk
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
    res = run_sweep(cfg, [2, 3, 5], sweep_dir=sweep_dir, n_prompts=2, gen_batch_size=2, device="cpu")
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
    res2 = run_sweep(cfg, [2, 3, 5], sweep_dir=sweep_dir, n_prompts=2, gen_batch_size=2, device="cpu")
    assert trained == [3] and res2.failed() == [3]
    monkeypatch.setattr(tk, "train", real_train)
    res3 = run_sweep(cfg, [2, 3, 5], sweep_dir=sweep_dir, n_prompts=2, gen_batch_size=2, device="cpu")
    assert res3.failed() == [] and res3.record["ranks"]["3"]["status"] == "done"

    # The same dir with another base config is refused instead of mixing two sweeps.
    other = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, loop={"max_steps": 3})
    import pytest

    from harness.errors import UserError

    with pytest.raises(UserError, match="another base config"):
        run_sweep(other, [2], sweep_dir=sweep_dir, n_prompts=2, device="cpu")


def test_sweep_resumes_a_killed_training(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    """A rank whose run has checkpoints but no final adapter (killed) is resumed, not restarted."""
    import harness.train_kandinsky as tk
    from harness.sweep import run_sweep

    cfg = tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path, loop={"max_steps": 2, "checkpoint_every": 1})
    run_sweep(cfg, [2], sweep_dir=tmp_path / "sw", n_prompts=1, device="cpu", score=False)
    rec_path = tmp_path / "sw" / "sweep.json"
    rec = json.loads(rec_path.read_text())
    run_dir = Path(rec["ranks"]["2"]["run"])
    # Simulate the kill: no final adapter, last checkpoint at step 1, rank not done.
    import shutil

    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoints" / "step-0000002")
    rec["ranks"]["2"]["status"] = "interrupted"
    rec_path.write_text(json.dumps(rec))
    resumed: list[str] = []
    real_resume = tk.resume
    monkeypatch.setattr(tk, "resume", lambda run, *a, **k: (resumed.append(run.id), real_resume(run, *a, **k))[1])
    res = run_sweep(cfg, [2], sweep_dir=tmp_path / "sw", n_prompts=1, device="cpu", score=False)
    assert resumed == [run_dir.name] and res.record["ranks"]["2"]["status"] == "done"
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "resumed from step-0000001" in (run_dir / "log.txt").read_text()


def test_sweep_cli_end_to_end(tiny_kandinsky, mini_data, tmp_path, run_cli):
    args = ["sweep", "kandinsky-decoder", "--split", mini_data[1], "--data", mini_data[0], "--prior", tiny_kandinsky[0],
            "--decoder", tiny_kandinsky[1], "--ranks", "2", "--max-steps", "1", "--batch-size", "2", "--resolution",
            "32", "--n-prompts", "1", "--no-score", "--device", "cpu", "--cache-dir", tmp_path / "c", "--sweep-dir",
            tmp_path / "sw"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "done" in out and "411,648" in out  # rank 2 -> 2 x 205,824 trainable on the real decoder
    rec = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert rec["family"] == "kandinsky-decoder" and rec["ranks"]["2"]["status"] == "done"
    code, out, err = run_cli(*args)  # rerun: nothing to do
    assert code == 0 and "skipped" in err + out
