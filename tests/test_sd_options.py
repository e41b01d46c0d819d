"""SD options: bad combinations are one-line errors, presets reproduce their table rows, optimizers (the optional
ones name the extra when missing), kohya noise and Min-SNR weights."""

from __future__ import annotations

import sys

import pytest
import torch

from test_sd_fixtures import _one_torch_thread, sd_config, sd_data, tiny_sd  # noqa: F401


def _err_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["--method", "lora", "--components", "vae"], "--components vae needs --method full"),
    (["--method", "dora", "--components", "text_encoder"], "adapts the U-Net"),
    (["--method", "bitfit", "--components", "unet,text_encoder"], "trains the U-Net only"),
    (["--method", "bitfit", "--rank", "8"], "--rank/--alpha/--lora-targets apply to --method lora|dora"),
    (["--method", "full", "--components", "unet,unet"], "twice"),
    (["--components", "unet,clip"], "non-empty subset"),
    (["--method", "lora", "--ema"], "--ema applies to --method full"),
    (["--text-encoder-lr", "1e-5"], "--text-encoder-lr needs the text encoder"),
    (["--noise-offset", "0.1", "--multires-noise-iterations", "6"], "exclude each other"),
    (["--method", "full", "--export", "kohya"], "--export kohya writes LoRA adapters"),
    (["--method", "dora", "--export", "kohya"], "no DoRA magnitude"),
    (["--optimizer", "prodigy"], 'pip install -e ".[optim]"'),
    (["--preset", "dasilva-m1"], None),  # AdamW8bit: bitsandbytes missing here, or no CUDA
    (["--resolution", "30"], "multiple of 8"),
])
def test_bad_combinations_are_one_line_errors(run_cli, tmp_path, args, needle):
    code, _, err = run_cli("train", "sd", "--split", tmp_path / "s.json", "--data", tmp_path, *args)
    assert code == 2
    line = _err_line(err)
    if needle is None:
        assert 'pip install -e ".[optim]"' in line or "needs a CUDA GPU" in line
    else:
        assert needle in line


def test_missing_optional_optimizers_name_the_extra(monkeypatch):
    from harness.errors import UserError
    from harness.families.sd.optim import check_available

    for name, module in (("adamw8bit", "bitsandbytes"), ("dadapt-sgd", "dadaptation"), ("prodigy", "prodigyopt")):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(UserError) as e:
            check_available(name)
        assert str(e.value) == f'--optimizer {name} needs the {module} package: pip install -e ".[optim]"'


def test_adamw8bit_says_it_needs_cuda(monkeypatch):
    import types

    from harness.errors import UserError
    from harness.families.sd.optim import check_available

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        check_available("adamw8bit")


def test_installed_optimizers_train(tiny_sd, sd_data, tmp_path):
    """Adafactor (transformers, always installed) for real, with the text encoder on its own learning rate; the
    optional ones for real where their package is installed."""
    import importlib.util

    from harness.families.sd.task import build_task
    from harness.runs import create_run
    from harness.trainer import run_training

    names = ["adafactor"] + [n for n, m in (("dadapt-sgd", "dadaptation"), ("prodigy", "prodigyopt"))
                             if importlib.util.find_spec(m) is not None]
    for name in names:
        cfg = sd_config(tiny_sd, sd_data, tmp_path, steps=3, optimizer=name, components=["unet", "text_encoder"],
                        text_encoder_lr=5e-5)
        task, h = build_task(cfg)
        opt = task.make_optimizer(task.trainable_parameters(), cfg.loop)
        assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-5]
        assert type(opt).__name__.lower().startswith(name.split("-")[0][:5])
        before = [p.detach().clone() for p in task.trainable_parameters()]
        stats = run_training(task, cfg.loop, create_run("sd", {}, h, run_id=f"opt-{name}"))
        assert stats["steps"] == 3
        assert any(not torch.equal(a, p) for a, p in zip(before, task.trainable_parameters()))


def test_presets_are_the_table_rows():
    from harness.families.sd.cli import build_config
    from harness.families.sd.config import PRESETS, preset

    assert [p.name for p in PRESETS] == [f"dasilva-m{i}" for i in range(1, 6)] + [f"pixelup-{i}" for i in range(1, 12)]
    m3 = build_config({"preset": "dasilva-m3", "data_dir": "d", "split_path": "s"})
    assert (m3.method, m3.components, m3.optimizer, m3.loop.lr, m3.text_encoder_lr, m3.clip_skip, m3.loop.epochs,
            m3.loop.batch_size, m3.data.resolution, m3.multires_noise_iterations, m3.multires_noise_discount,
            m3.noise_offset, m3.loop.warmup_steps, m3.preset) == \
        ("lora", ["unet", "text_encoder"], "adafactor", 1e-4, 5e-5, 2, 100, 2, 512, 6, 0.1, 0.0, 0, "dasilva-m3")
    assert preset("dasilva-m4").lr == preset("dasilva-m4").text_encoder_lr == 1e-5
    assert preset("dasilva-m1").multires_noise_iterations is None and preset("dasilva-m1").noise_offset == 0.0
    full = {f"pixelup-{i}": c for i, c in enumerate(
        [["unet"], ["text_encoder"], ["vae"], ["text_encoder", "unet"], ["vae", "unet"], ["vae", "text_encoder"],
         ["unet", "text_encoder", "vae"]], start=1)}
    for name, comps in full.items():
        cfg = build_config({"preset": name, "data_dir": "d", "split_path": "s"})
        assert cfg.method == "full" and cfg.components == comps
    p8 = build_config({"preset": "pixelup-8", "data_dir": "d", "split_path": "s"})
    p9 = build_config({"preset": "pixelup-9", "data_dir": "d", "split_path": "s"})
    assert (p8.method, p8.rank, p8.alpha, p9.method, p9.rank, p9.alpha) == ("lora", 16, 32.0, "dora", 32, 64.0)
    assert build_config({"preset": "pixelup-10", "data_dir": "d", "split_path": "s"}).method == "bitfit"
    assert build_config({"preset": "pixelup-11", "data_dir": "d", "split_path": "s"}).method == "difffit"
    # a preset named in a --config file is applied, not only recorded
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "c.json"
        f.write_text(json.dumps({"preset": "pixelup-9", "snr_gamma": 5.0}))
        fc = build_config({"config_file": f, "data_dir": "d", "split_path": "s"})
    assert (fc.method, fc.rank, fc.alpha, fc.snr_gamma, fc.preset) == ("dora", 32, 64.0, 5.0, "pixelup-9")
    # command-line options override the preset; an explicit --max-steps replaces its epochs
    over = build_config({"preset": "dasilva-m3", "data_dir": "d", "split_path": "s", "rank": 8, "max_steps": 7})
    assert over.rank == 8 and over.loop.epochs is None and over.loop.max_steps == 7


def test_preset_epochs_become_steps(run_cli, sd_data):
    import json

    data, split = sd_data
    code, out, err = run_cli("train", "sd", "--split", split, "--data", data, "--preset", "dasilva-m3",
                             "--print-config")
    assert code == 0, err
    loop = json.loads(out)["loop"]
    assert loop["epochs"] == 100 and loop["derived"]["max_steps"] == 100  # 2 training images, batch 2
    code, out, err = run_cli("train", "sd", "--split", split, "--data", data, "--preset", "dasilva-m3",
                             "--max-steps", "5", "--print-config")
    assert code == 0, err
    assert json.loads(out)["loop"]["derived"]["max_steps"] == 5


def test_help_names_sources(run_cli):
    code, out, _ = run_cli("train", "sd", "--help")
    assert code == 0
    out = "".join(out.split())  # help is wrapped (also inside hyphenated words)
    for s in ("da Silva", "Pixels Under Pressure", "kohya", "diffusers", "DiffFit", "Xie et al.", ".[optim]",
              "needs CUDA", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        assert "".join(s.split()) in out, s


def test_offset_and_pyramid_noise_follow_sd_scripts():
    from models.sd.noise import offset_noise, pyramid_noise

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, 16, 16, generator=g)
    off = offset_noise(base, 0.1, torch.Generator().manual_seed(1))
    shift = off - base
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift))  # constant per (sample, channel)
    assert torch.allclose(shift[..., 0, 0], 0.1 * torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(1))
                          [..., 0, 0])
    p1 = pyramid_noise(base, 6, 0.1, torch.Generator().manual_seed(2))
    p2 = pyramid_noise(base, 6, 0.1, torch.Generator().manual_seed(2))
    assert torch.equal(p1, p2) and abs(float(p1.std()) - 1) < 1e-5
    assert not torch.allclose(p1, base / base.std())
    # one iteration adds full-resolution noise with weight discount**0 = 1
    g3 = torch.Generator().manual_seed(3)
    one = pyramid_noise(base, 1, 0.1, g3)
    g3 = torch.Generator().manual_seed(3)
    torch.rand((), generator=g3)
    expect = base + torch.randn(2, 4, 16, 16, generator=g3)
    assert torch.allclose(one, expect / expect.std(), atol=1e-6)


def test_min_snr_weights():
    from models.sd.noise import min_snr_weights

    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def test_train_sd_cli_end_to_end_and_resume(run_cli, tiny_sd, sd_data, tmp_path):
    import json

    data, split = sd_data
    common = ("train", "sd", "--split", split, "--data", data, "--base", tiny_sd, "--resolution", "32",
              "--batch-size", "2", "--method", "bitfit", "--cache-dir", tmp_path / "cache", "--checkpoint-every", "2",
              "--val-every", "2")
    code, out, err = run_cli(*common, "--max-steps", "2", "--run-id", "cli-bitfit")
    assert code == 0, err
    run = tmp_path / "runs" / "cli-bitfit"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["family"] == "sd" and cfg["summary"]["method"] == "bitfit" and cfg["sources"]["prediction_type"]
    code, out, err = run_cli("train", "sd", "--split", split, "--data", data, "--resume", run, "--max-steps", "3")
    assert code == 0, err
    assert json.loads((run / "train_stats.json").read_text())["steps"] == 3
    assert (run / "final" / "unet" / "config.json").is_file()
