"""Shared fixtures. Tests never touch the network: HF hub is forced offline, runs go to a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HARNESS_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DEV = REPO.parent / "shared" / "data" / "imageclef2024" / "dev-256"
SHARED_FULLRES = REPO.parent / "shared" / "data" / "imageclef2024" / "full-res-sample"


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path, monkeypatch):
    """Every test gets its own runs/ root and torch home, so nothing leaks between tests or into the repo."""
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    yield


@pytest.fixture
def sample_dir() -> Path:
    """The small real sample shipped inside the package (official layout)."""
    from harness.sample import sample_dir as _sample_dir

    return _sample_dir()


@pytest.fixture
def dev_dir() -> Path:
    if not (SHARED_DEV / "prompt-gt.csv").is_file():
        pytest.skip("../shared/data/imageclef2024/dev-256 not present")
    return SHARED_DEV


@pytest.fixture
def fullres_dir() -> Path:
    if not (SHARED_FULLRES / "prompt-gt.csv").is_file():
        pytest.skip("../shared/data/imageclef2024/full-res-sample not present")
    return SHARED_FULLRES


@pytest.fixture
def run_cli():
    """Invoke the real `harness` entry point in-process; returns (exit_code, stdout, stderr)."""
    import contextlib
    import io

    from harness.cli import main

    def _run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code, out.getvalue(), err.getvalue()

    return _run
