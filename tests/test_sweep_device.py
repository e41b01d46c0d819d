"""`harness sweep ... --device D` checks D with harness.distributed.pick_device before any work: on a machine without
CUDA `--device cuda` is one line (exit 2) and nothing is trained or recorded (it used to train a whole cell and then
record "RuntimeError: Found no NVIDIA driver")."""

from __future__ import annotations

import pytest
import torch

from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_kandinsky  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _assert_refused(code, err, tmp_path):
    assert code == 2 and "--device cuda: CUDA is not available on this machine" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sw").exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_kandinsky_sweep_refuses_an_unavailable_device_before_training(tiny_kandinsky, mini_data, tmp_path, run_cli):
    code, _, err = run_cli("sweep", "kandinsky-prior", "--split", str(mini_data[1]), "--data", str(mini_data[0]),
                           "--prior", str(tiny_kandinsky[0]), "--decoder", str(tiny_kandinsky[1]), "--ranks", "2",
                           "--batch-size", "2", "--resolution", "32", "--max-steps", "2", "--n-prompts", "1",
                           "--images-per-prompt", "1", "--no-score", "--device", "cuda",
                           "--cache-dir", str(tmp_path / "c"), "--sweep-dir", str(tmp_path / "sw"))
    _assert_refused(code, err, tmp_path)


@pytest.mark.parametrize("kind,extra", [("sd", ["--base", "no/such-base"]), ("msdm-unet", ["--vae", "no-such-run"])])
def test_generic_sweeps_refuse_an_unavailable_device_first(kind, extra, mini_data, tmp_path, run_cli):
    code, _, err = run_cli("sweep", kind, "--split", str(mini_data[1]), "--data", str(mini_data[0]), *extra,
                           "--grid", "lr=1e-3,2e-3", "--device", "cuda", "--sweep-dir", str(tmp_path / "sw"))
    _assert_refused(code, err, tmp_path)
