"""`harness quickstart`: the README's main job, end to end on the shipped sample."""

from __future__ import annotations

import json
import zipfile

import pytest

from harness.package import validate_zip
from harness.prompts import read_prompt_file


def _check(workdir, code, err):
    assert code == 0, err
    zpath = workdir / "submissions" / "quickstart_clef2024_medvqa.zip"
    prompts = read_prompt_file(workdir / "prompts.txt").prompts
    assert len(prompts) == 16
    assert validate_zip(zpath, prompts).ok
    assert len([n for n in zipfile.ZipFile(zpath).namelist() if n.endswith(".png")]) == 16
    # offline: metrics are recorded as not computed, never as numbers from untrained networks
    metrics = json.loads(next((workdir / "runs").glob("*/metrics.json")).read_text())["metrics"]
    assert all(m.get("status") == "not computed" for m in metrics.values() if isinstance(m, dict))


def test_quickstart_plumbing(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("HARNESS_RUNS_DIR")  # the quickstart keeps its runs inside its workdir
    code, out, err = run_cli("quickstart", "--model", "test-pattern", "--workdir", tmp_path / "qs")
    _check(tmp_path / "qs", code, err)
    import os

    assert "HARNESS_RUNS_DIR" not in os.environ  # scoped to the quickstart call


@pytest.mark.slow
def test_quickstart_trains_tiny_msdm(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("HARNESS_RUNS_DIR")
    code, out, err = run_cli("quickstart", "--workdir", tmp_path / "qs")
    _check(tmp_path / "qs", code, err)
    unet_runs = list((tmp_path / "qs" / "runs").glob("msdm-unet-*"))
    stats = json.loads((unet_runs[0] / "train_stats.json").read_text())
    assert stats["steps"] == 600 and stats["final_loss"] < 0.5
