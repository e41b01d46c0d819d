"""Kandinsky training options at real scale: image-embedding dropout (on in training, off in validation), gradient
checkpointing (same gradients, fewer saved activations), refused LoRA inits, the --rslora warning, and the sample
grid built from the task's own modules."""

from __future__ import annotations

import pytest
import torch
from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_config, tiny_kandinsky  # noqa: F401 (fixtures)


def _batch(task, n=4):
    ds = task.train_dataset()
    return task.collate([ds[i] for i in range(min(n, len(ds)))])


def test_decoder_defaults_to_image_embed_dropout_and_validation_turns_it_off(tiny_kandinsky, mini_data, tmp_path):
    from harness.families.kandinsky22.train import build_task, default_config
    from harness.trainer import cpu_generator

    assert default_config("decoder").image_embed_dropout == 0.1 and default_config("prior").image_embed_dropout == 0
    always = tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path, image_embed_dropout=1.0)
    never = tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path, image_embed_dropout=0.0)
    t_always, _ = build_task(always)
    t_never, _ = build_task(never)
    batch = _batch(t_always)
    with torch.no_grad():
        for t in (t_always, t_never):
            t.unet.train()
        train_always, train_never = (float(t.loss(batch, cpu_generator(1))) for t in (t_always, t_never))
        for t in (t_always, t_never):
            t.unet.eval()  # what the trainer's validation does
        val_always, val_never = (float(t.loss(batch, cpu_generator(1))) for t in (t_always, t_never))
    assert train_always != train_never  # training sees the zero-image embedding
    assert val_always == val_never == train_never  # validation: the conditional loss only


@pytest.mark.parametrize("component", ["prior", "decoder"])
def test_gradient_checkpointing_same_gradients_fewer_saved_activations(component, tiny_kandinsky, mini_data,
                                                                        tmp_path):
    from harness.families.kandinsky22.train import build_task
    from harness.trainer import cpu_generator

    results = []
    for gc in (False, True):
        cfg = tiny_config(component, tiny_kandinsky, mini_data, tmp_path, gradient_checkpointing=gc,
                          **({"image_embed_dropout": 0.0} if component == "decoder" else {}))
        task, _ = build_task(cfg)
        task.trained.train()
        batch = _batch(task)
        saved = [0]

        def pack(t):
            saved[0] += t.numel()
            return t

        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = task.loss(batch, cpu_generator(3))
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in task.trainable_parameters()], saved[0]))
    (l0, g0, s0), (l1, g1, s1) = results
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g0, g1))
    assert s1 < 0.8 * s0, (s0, s1)  # measured: prior ~50 %, decoder ~60 % of the saved elements


def test_lora_inits_that_rewrite_the_base_are_refused(tiny_kandinsky, mini_data, tmp_path, run_cli):
    from harness.errors import UserError
    from models.kandinsky.lora import LoraSpec

    for init in ("pissa", "olora", "loftq"):
        with pytest.raises(ValueError, match="not supported"):
            LoraSpec(init_lora_weights=init)
    with pytest.raises(UserError, match="rewritten base"):  # a --config file goes through the same check
        tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, lora={"init_lora_weights": "pissa"})
    code, out, err = run_cli("train", "kandinsky-prior", "--split", mini_data[1], "--data", mini_data[0],
                             "--init-lora-weights", "olora")
    assert code == 2 and "olora" in err and "Traceback" not in err


def test_rslora_without_alpha_warns(tiny_kandinsky, mini_data, tmp_path, run_cli):
    from harness.families.kandinsky22.train import default_config

    args = ["train", "kandinsky-prior", "--split", mini_data[1], "--data", mini_data[0], "--prior", tiny_kandinsky[0],
            "--decoder", tiny_kandinsky[1], "--rank", "16", "--rslora", "--max-steps", "1", "--batch-size", "2",
            "--resolution", "32", "--cache-dir", tmp_path / "c", "--print-config"]
    cfg = default_config("prior")
    cfg.lora.rslora, cfg.lora.rank = True, 16
    assert "sqrt(16) = 4.00" in cfg.warnings()[0]
    cfg.lora.alpha = 4.0
    assert cfg.warnings() == []
    code, out, err = run_cli(*args)
    if code == 2 and "no such option" in err.lower():  # --print-config arrives with the shared loop options
        code, out, err = run_cli(*args[:-1])
    assert code == 0, err
    assert "warning:" in err and "--rslora" in err and "sqrt(16)" in err


def test_sample_grid_reuses_the_task_modules(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    """The decoder task's grid uses the prior parts it already holds (no second prior); the prior task loads its
    decoder once, for every grid; modules training does not hold on the device go back where they were."""
    import models.kandinsky.loading as loading
    from harness.families.kandinsky22.train import build_task

    task, _ = build_task(tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path))
    calls: list[str] = []
    real_prior, real_decoder = loading.load_prior, loading.load_decoder
    monkeypatch.setattr(loading, "load_prior", lambda *a, **k: (calls.append("prior"), real_prior(*a, **k))[1])
    monkeypatch.setattr(loading, "load_decoder", lambda *a, **k: (calls.append("decoder"), real_decoder(*a, **k))[1])
    assert task.sample_grid(1, tmp_path / "d1.png") and task.sample_grid(2, tmp_path / "d2.png")
    assert calls == []
    assert task._grid_generator.p.prior is task.prior_parts.prior
    assert task._grid_generator.d.unet is task.unet

    task, _ = build_task(tiny_config("prior", tiny_kandinsky, mini_data, tmp_path))
    calls.clear()  # build_task's own load of the prior
    assert task.sample_grid(1, tmp_path / "p1.png") and task.sample_grid(2, tmp_path / "p2.png")
    assert calls == ["decoder"]
    assert task._grid_generator.p.prior is task.prior
    assert (tmp_path / "p2.png").is_file()


def test_decoder_resolution_off_the_model_stride_is_one_line_and_no_run(tiny_kandinsky, mini_data, tmp_path,
                                                                         run_cli):
    """`--resolution 36` on the tiny decoder (MoVQ x4, UNet x2) used to crash mid-step in the UNet's skip concat
    with a traceback (exit 1); now one line naming a size that works, before a run directory exists."""
    from harness.runs import runs_root

    code, out, err = run_cli("train", "kandinsky-decoder", "--split", mini_data[1], "--data", mini_data[0],
                             "--prior", tiny_kandinsky[0], "--decoder", tiny_kandinsky[1], "--max-steps", "1",
                             "--batch-size", "2", "--resolution", "36", "--cache-dir", tmp_path / "c")
    lines = [line for line in err.strip().splitlines() if line.strip().startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert "must be a multiple of 8" in lines[0] and "e.g. 32" in lines[0]
    assert not runs_root().exists() or not any(runs_root().iterdir())
