"""Fixtures of the SD tests: a tiny SD pipeline (written once per session by `harness models make-tiny sd`'s
function) and a 4-image dev set (2 train / 2 val) from the shipped sample; plus the make-tiny command test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from models.sd.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    from models.sd.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v") / "sd", prediction_type="v_prediction")


@pytest.fixture
def sd_data(sample_dir, tmp_path) -> tuple[Path, Path]:
    from test_kandinsky_fixtures import make_mini_devset

    return make_mini_devset(sample_dir, tmp_path / "mini", n_images=4, n_val=2)


def sd_config(base, data, tmp_path, steps: int = 20, lr: float = 1e-3, **changes):
    """An SDConfig that trains in seconds on the tiny pipeline (32 px images, batch 2)."""
    from harness.dataset import DatasetConfig
    from harness.families.sd.config import SDConfig
    from harness.trainer import LoopConfig

    data_dir, split = data
    loop = LoopConfig(max_steps=steps, batch_size=2, lr=lr, checkpoint_every=0, val_every=0, log_every=1,
                      max_grad_norm=1.0)
    cfg = SDConfig(data_dir=str(data_dir), split_path=str(split), base=str(base), data=DatasetConfig(resolution=32),
                   loop=loop, cache_dir=str(tmp_path / "cache"))
    return dataclasses.replace(cfg, **changes)


def test_make_tiny_sd_loads_in_plain_diffusers(run_cli, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tiny"
    code, _, err = run_cli("models", "make-tiny", "sd", str(out))
    assert code == 0, err
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(["Generate an image containing a polyp."], num_inference_steps=2, height=32, width=32,
               output_type="np").images[0]
    assert img.shape == (32, 32, 3)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    code, _, err = run_cli("models", "make-tiny", "sd", str(out))
    assert code == 2 and "not empty" in err
    code, _, err = run_cli("models", "make-tiny", "sd", str(out), "--overwrite", "--prediction-type", "v_prediction")
    assert code == 0, err
    assert StableDiffusionPipeline.from_pretrained(out).scheduler.config.prediction_type == "v_prediction"
