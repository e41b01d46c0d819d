"""--preset paper, --epochs, --print-config and the best-epoch export of the Kandinsky trainers and sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_config, tiny_kandinsky  # noqa: F401 (fixtures)


def _json(out: str) -> dict:
    return json.loads(out)


def test_sweep_prior_paper_print_config_without_data_or_weights(run_cli, monkeypatch):
    """The issue's acceptance line: 100 epochs, lr 1e-4, 150 decoder steps, exit 0, no weights loaded."""
    import models.kandinsky.loading as loading

    def no_loading(*a, **k):
        raise AssertionError("--print-config loaded weights")

    monkeypatch.setattr(loading, "load_prior", no_loading)
    monkeypatch.setattr(loading, "load_decoder", no_loading)
    code, out, err = run_cli("sweep", "kandinsky-prior", "--preset", "paper", "--print-config")
    assert code == 0, err
    d = _json(out)
    assert d["loop"]["epochs"] == 100 and d["loop"]["lr"] == 1e-4 and d["loop"]["batch_size"] == 64
    assert d["generation"]["decoder_steps"] == 150 and d["generation"]["prior_steps"] == 25
    assert d["data"]["resolution"] == 256 and d["data"]["fit"] == "pad" and d["preset"] == "paper"
    assert d["sweep"]["ranks"][0] == 4 and d["lora"]["rank"] is None


@pytest.mark.parametrize("command,component,epochs,rank", [
    ("train", "prior", 100, 4), ("train", "decoder", 40, 32), ("sweep", "decoder", 100, None)])
def test_paper_preset_per_stage_with_derived_steps(command, component, epochs, rank, mini_data, run_cli):
    code, out, err = run_cli(command, f"kandinsky-{component}", "--preset", "paper", "--print-config",
                             "--split", mini_data[1], "--data", mini_data[0])
    assert code == 0, err
    d = _json(out)
    loop = d["loop"]
    assert loop["epochs"] == epochs and d["lora"]["rank"] == rank
    # the paper's epoch: one pass over the caption rows of the training images (4 images here)
    from harness.data import load_devset
    from harness.split import load_split

    train_ids = set(load_split(mini_data[1]).train)
    rows = sum(1 for r in load_devset(mini_data[0]).rows if r.filename in train_ids)
    assert loop["derived"]["epoch_items"] == rows
    assert loop["max_steps"] == loop["derived"]["max_steps"] == epochs * max(1, rows // 64)


def test_cli_options_override_the_preset_and_max_steps_clears_epochs(mini_data, run_cli):
    base = ["train", "kandinsky-prior", "--preset", "paper", "--print-config", "--split", mini_data[1], "--data",
            mini_data[0]]
    d = _json(run_cli(*base, "--lr", "3e-4", "--max-steps", "7", "--batch-size", "2", "--decoder-steps", "60",
                      "--gen-dtype", "bf16")[1])
    assert d["loop"]["lr"] == 3e-4 and d["loop"]["epochs"] is None and d["loop"]["max_steps"] == 7
    assert d["generation"]["decoder_steps"] == 60 and d["generation"]["dtype"] == "bf16"
    d = _json(run_cli(*base, "--epochs", "3", "--batch-size", "2", "--eval-every-epochs", "1")[1])
    per_epoch = d["loop"]["derived"]["steps_per_epoch"]
    assert d["loop"]["epochs"] == 3 and d["loop"]["val_every"] == round(per_epoch)
    assert d["loop"]["select_best"] == "val_loss"
    code, out, err = run_cli(*base, "--epochs", "3", "--max-steps", "5")
    assert code == 2 and "not both" in err


def test_eval_every_epochs_exports_the_best_adapter_with_its_epoch(tiny_kandinsky, mini_data, tmp_path,
                                                                   monkeypatch):
    """Validation every epoch; the loop keeps the best by validation loss; final/ holds it (with the epoch it came
    from), last/ the last weights. A validation loss that is best at epoch 2 of 4 is forced here so the test
    does not depend on how a tiny model happens to train."""
    import harness.trainer as trainer
    from harness.families.kandinsky22.train import train
    from models.kandinsky.lora import adapter_content_hash

    losses = iter([3.0, 1.0, 2.0, 2.5])
    monkeypatch.setattr(trainer, "_validate", lambda *a, **k: next(losses))
    cfg = tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path, eval_every_epochs=1.0,
                      loop={"epochs": 4, "batch_size": 2, "checkpoint_every": 0})
    run = train(cfg)
    stats = json.loads((run.dir / "train_stats.json").read_text())
    per_epoch = stats["loop"]["derived"]["steps_per_epoch"]
    sel = json.loads((run.dir / "final" / "selection.json").read_text())
    assert sel["metric"] == "val_loss" and sel["value"] == 1.0
    assert sel["epoch"] == 2.0 and sel["step"] == round(2 * per_epoch) and sel["last_epoch"] == 4.0
    meta = json.loads((run.dir / "final" / "adapter_meta.json").read_text())
    assert meta["selected"] == sel
    assert adapter_content_hash(run.dir / "final") == adapter_content_hash(run.dir / "best")
    assert adapter_content_hash(run.dir / "last") != adapter_content_hash(run.dir / "final")
    assert stats["exported"]["epoch"] == 2.0


def test_eval_every_epochs_selects_by_fid_when_inception_weights_exist(tiny_kandinsky, mini_data, tmp_path,
                                                                       monkeypatch):
    """With the scoring Inception on the machine the best epoch is chosen by FID of generations for the validation
    captions (randomly initialised Inception here: the value is meaningless, the wiring is what is tested)."""
    import math

    import harness.families.kandinsky22.train as tk
    from harness.features import resolve_weights, write_random_weights
    from harness.score import INCEPTION

    path = write_random_weights(INCEPTION, tmp_path / "inception.pth")
    monkeypatch.setattr(tk, "_fid_weights", lambda: resolve_weights(INCEPTION, path, allow_unverified=True))
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path, eval_every_epochs=1.0,
                      loop={"epochs": 2, "batch_size": 2, "checkpoint_every": 0})
    run = tk.train(cfg)
    sel = json.loads((run.dir / "final" / "selection.json").read_text())
    assert sel["metric"] == "fid" and math.isfinite(sel["value"]) and sel["epoch"] in (1.0, 2.0)
    log = [json.loads(line) for line in (run.dir / "train_log.jsonl").read_text().splitlines()]
    assert sum("best_fid" in rec for rec in log) >= 1
    assert json.loads((run.dir / "config.json").read_text())["loop"]["select_best"] == "fid"
