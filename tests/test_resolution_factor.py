"""--resolution must be a multiple of the autoencoder's downsampling factor (2 ** (len(block_out_channels) - 1) of
the loaded config: Kandinsky's MoVQ, SD's VAE): one line naming the factor, before any run folder exists (a
Kandinsky decoder used to train at --resolution 33)."""

from __future__ import annotations

import pytest

from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_kandinsky  # noqa: F401 (fixtures)
from test_sd_fixtures import tiny_sd  # noqa: F401


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _no_runs(tmp_path) -> bool:
    return not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_kandinsky_decoder_resolution_must_fit_the_movq(tiny_kandinsky, mini_data, tmp_path, run_cli):
    args = ["train", "kandinsky-decoder", "--split", str(mini_data[1]), "--data", str(mini_data[0]),
            "--prior", str(tiny_kandinsky[0]), "--decoder", str(tiny_kandinsky[1]), "--prior-adapter", "none",
            "--max-steps", "1", "--batch-size", "2", "--cache-dir", str(tmp_path / "c")]
    code, _, err = run_cli(*args, "--resolution", "34")  # the tiny MoVQ has 3 blocks (x4), its UNet 2 (x2)
    assert code == 2
    assert "--resolution 34 must be a multiple of 8, the decoder's MoVQ x UNet downsampling (4 x 2)" in _one_line(err)
    assert _no_runs(tmp_path)


@pytest.mark.parametrize("resolution,factor", [(33, 2)])
def test_sd_resolution_must_fit_the_loaded_vae(tiny_sd, mini_data, tmp_path, run_cli, resolution, factor):
    code, _, err = run_cli("train", "sd", "--split", str(mini_data[1]), "--data", str(mini_data[0]),
                           "--base", str(tiny_sd), "--resolution", str(resolution), "--max-steps", "1",
                           "--cache-dir", str(tmp_path / "c"))
    assert code == 2  # the tiny VAE has 2 blocks: factor 2
    assert f"--resolution {resolution} must be a multiple of {factor}, the VAE's" in _one_line(err)
    assert _no_runs(tmp_path)


def test_sd15_vae_factor_is_8_from_its_shipped_config(mini_data, run_cli):
    data = ["--split", str(mini_data[1]), "--data", str(mini_data[0])]
    code, _, err = run_cli("train", "sd", *data, "--resolution", "500", "--print-config")
    assert code == 2 and "--resolution 500 must be a multiple of 8, the VAE's" in _one_line(err)
    code, out, err = run_cli("train", "sd", *data, "--resolution", "504", "--print-config")
    assert code == 0 and '"resolution": 504' in out, err
