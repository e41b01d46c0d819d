"""SD training on the tiny pipeline: each method lowers the loss on an overfit set, trains exactly the parameters
it claims, leaves everything else bit-identical; cache == no cache; v-prediction; options and presets."""

from __future__ import annotations

import json

import pytest
import torch

from test_sd_fixtures import _one_torch_thread, sd_config, sd_data, tiny_sd, tiny_sd_v  # noqa: F401


def _fixed_loss(task, n: int = 6) -> float:
    """Mean loss over the training items with fixed generators: differences come from the weights only."""
    from harness.trainer import cpu_generator

    ds = task.train_dataset()
    ds.set_epoch(0)
    batch = task.collate([ds[i] for i in range(len(ds))])
    for m in task.modules().values():
        m.eval()
    with torch.no_grad():
        return sum(float(task.loss(batch, cpu_generator(1000 + k))) for k in range(n)) / n


def _snapshot(task) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in task.modules().items() for k, v in m.state_dict().items()}


METHOD_CASES = [
    ("lora", ["unet"], {}),
    ("lora", ["unet", "text_encoder"], {"text_encoder_lr": 5e-4, "gradient_checkpointing": True}),
    ("dora", ["unet"], {}),
    ("bitfit", ["unet"], {}),
    ("difffit", ["unet"], {}),
    ("full", ["unet"], {"ema": True, "ema_decay": 0.5, "lr": 1e-4}),
    ("full", ["text_encoder"], {"lr": 3e-3}),
    ("full", ["vae"], {"lr": 1e-3}),
]


@pytest.mark.parametrize("method,components,extra", METHOD_CASES,
                         ids=[f"{m}-{'+'.join(c)}" for m, c, _ in METHOD_CASES])
def test_method_lowers_loss_trains_what_it_claims_and_freezes_the_rest(tiny_sd, sd_data, tmp_path, method,
                                                                        components, extra):
    from harness.families.sd.task import build_task
    from harness.runs import create_run
    from harness.trainer import run_training
    from models.sd.methods import SCALE_NAME

    extra = dict(extra)
    lr = extra.pop("lr", 3e-3)
    cfg = sd_config(tiny_sd, sd_data, tmp_path, steps=25, lr=lr, method=method, components=components, **extra)
    task, hashes = build_task(cfg)
    before = _snapshot(task)
    loss0 = _fixed_loss(task)
    trained_names = {f"{c}.{n}" for c, m in task.modules().items() for n, p in m.named_parameters()
                     if p.requires_grad}
    claimed = {id(p) for p in task.trainable_parameters()}
    assert sum(p.numel() for p in task.trainable_parameters()) == sum(
        p.numel() for m in task.modules().values() for p in m.parameters() if p.requires_grad)
    assert all(p.requires_grad for p in task.trainable_parameters())
    assert len(claimed) == len(trained_names)
    if method == "bitfit":
        assert trained_names == {f"unet.{n}" for n, _ in task.unet.named_parameters() if n.endswith(".bias")}
    if method == "difffit":
        scales = [n for n in trained_names if n.endswith(SCALE_NAME)]
        blocks = [m for m in task.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        assert len(scales) == 3 * len(blocks) > 0
        widths = sum(3 * b.norm1.normalized_shape[0] for b in blocks)
        norm_weights = sum(m.weight.numel() for m in task.unet.modules()
                           if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None)
        biases = sum(p.numel() for n, p in task.unet.named_parameters() if n.endswith(".bias"))
        assert sum(p.numel() for p in task.trainable_parameters()) == biases + norm_weights + widths
        assert all(n.endswith((".bias", ".weight", SCALE_NAME)) for n in trained_names)
        assert all(n.endswith(SCALE_NAME) or "norm" in n or n.endswith(".bias") for n in trained_names)
    if method in ("lora", "dora"):
        assert all("lora_" in n for n in trained_names)
        assert {n.split(".")[0] for n in trained_names} == set(components)

    run = create_run("sd", {"test": True}, hashes, run_id=f"t-{method}-{'-'.join(components)}")
    run_training(task, cfg.loop, run)
    loss1 = _fixed_loss(task)
    assert loss1 < loss0, (loss0, loss1)

    after = _snapshot(task)
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    frozen_changed = {k for k in changed if k not in trained_names}
    assert not frozen_changed, sorted(frozen_changed)[:5]
    if method == "difffit":  # the export folded the scales into a plain diffusers U-Net: same outputs
        from diffusers import UNet2DConditionModel

        exported = UNet2DConditionModel.from_pretrained(run.dir / "final" / "unet")
        assert not any(n.endswith(SCALE_NAME) for n, _ in exported.named_parameters())
        assert any(not torch.equal(p, torch.ones_like(p)) for n, p in task.unet.named_parameters()
                   if n.endswith(SCALE_NAME))  # the scales trained (and are still in the live model)
        g = torch.Generator().manual_seed(0)
        x, emb = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
        with torch.no_grad():
            assert torch.allclose(exported(x, 10, emb).sample, task.unet(x, 10, emb).sample, atol=1e-5)
    meta = json.loads((run.dir / "final" / "sd_meta.json").read_text())
    assert meta["method"] == method and meta["components"] == components
    if method in ("full", "bitfit", "difffit"):
        for c in components:
            assert (run.dir / "final" / c).is_dir()


def test_cache_and_no_cache_give_the_same_losses(tiny_sd, sd_data, tmp_path):
    from harness.families.sd.task import CachedSDItems, build_task
    from harness.trainer import cpu_generator

    losses = []
    for cache in (True, False):
        task, hashes = build_task(sd_config(tiny_sd, sd_data, tmp_path, cache=cache, clip_skip=2))
        ds = task.train_dataset()
        assert isinstance(ds, CachedSDItems) == cache
        if cache:
            assert hashes["encoder_cache"]["text"]["misses"] > 0 and "latents" in hashes["encoder_cache"]
        ds.set_epoch(3)
        batch = task.collate([ds[1], ds[0]])
        with torch.no_grad():
            losses.append([float(task.loss(batch, cpu_generator(7 + k))) for k in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    # the text encoder trains: its embeddings are not cached, the frozen VAE's latents are
    task, hashes = build_task(sd_config(tiny_sd, sd_data, tmp_path, components=["unet", "text_encoder"]))
    assert task.train_dataset().text_keys is None and task.train_dataset().latent_keys is not None
    # augmentation: latents are not cached
    import dataclasses

    cfg = sd_config(tiny_sd, sd_data, tmp_path)
    cfg.data = dataclasses.replace(cfg.data, hflip=True)
    task, _ = build_task(cfg)
    assert task.train_dataset().latent_keys is None


def test_v_prediction_is_read_from_the_scheduler(tiny_sd_v, sd_data, tmp_path):
    from harness.families.sd.task import build_task

    task, _ = build_task(sd_config(tiny_sd_v, sd_data, tmp_path, snr_gamma=5.0, noise_offset=0.05))
    assert task.prediction_type == "v_prediction"
    assert torch.isfinite(torch.tensor(_fixed_loss(task, 2)))


def test_clip_skip_counts_like_kohya(tiny_sd):
    from diffusers import StableDiffusionPipeline

    from models.sd.loading import diffusers_clip_skip, encode_prompts

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    p = ["Generate an image containing a polyp."]
    ref, _ = pipe.encode_prompt(p, "cpu", 1, False)
    assert torch.allclose(encode_prompts(pipe.tokenizer, pipe.text_encoder, p, 1), ref)
    # kohya's 2 = the penultimate layer through the final layer norm (diffusers' clip_skip=1)
    ids = pipe.tokenizer(p, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(encode_prompts(pipe.tokenizer, pipe.text_encoder, p, 2),
                          pipe.text_encoder.final_layer_norm(hidden))
    assert diffusers_clip_skip(1) is None and diffusers_clip_skip(2) == 1
    assert not torch.allclose(encode_prompts(pipe.tokenizer, pipe.text_encoder, p, 1),
                              encode_prompts(pipe.tokenizer, pipe.text_encoder, p, 2))


def test_resume_is_exact_with_ema(tiny_sd, sd_data, tmp_path):
    from harness.families.sd.task import build_task
    from harness.runs import create_run
    from harness.trainer import run_training

    def params(task):
        return [p.detach().clone() for p in task.trainable_parameters()]

    cfg = sd_config(tiny_sd, sd_data, tmp_path, steps=4, lr=1e-4, method="full", ema=True, ema_decay=0.5)
    task, h = build_task(cfg)
    run_training(task, cfg.loop, create_run("sd", {}, h, run_id="straight"))
    straight = params(task)
    cfg2 = sd_config(tiny_sd, sd_data, tmp_path, steps=2, lr=1e-4, method="full", ema=True, ema_decay=0.5)
    cfg2.loop.checkpoint_every = 2
    task, h = build_task(cfg2)
    run = create_run("sd", {}, h, run_id="resumed")
    run_training(task, cfg2.loop, run)
    cfg2.loop.max_steps = 4
    task, _ = build_task(cfg2)
    run_training(task, cfg2.loop, run, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(straight, params(task)))


def test_sample_grid_during_training(tiny_sd, sd_data, tmp_path):
    import numpy as np
    from PIL import Image

    from harness.families.sd.task import build_task
    from harness.runs import create_run
    from harness.trainer import run_training

    cfg = sd_config(tiny_sd, sd_data, tmp_path, steps=2, method="difffit")
    cfg.loop.sample_every = 2
    cfg.generation.steps = 2
    task, h = build_task(cfg)
    run = create_run("sd", {}, h, run_id="grid")
    run_training(task, cfg.loop, run)
    img = np.array(Image.open(run.dir / "samples" / "step-0000002.png"))
    base = task.val_dataset().base
    n = min(4, len({c for pool in base.pools for c in pool}))
    assert img.shape == (32, 32 * n, 3)  # the first (up to) 4 distinct validation captions


def test_paraphrases_are_cached_up_front(tiny_sd, sd_data, tmp_path):
    import dataclasses

    from harness.data import load_devset
    from harness.families.sd.task import build_task

    originals = sorted({r.prompt for r in load_devset(sd_data[0]).rows})
    para = tmp_path / "para.jsonl"
    para.write_text("".join(json.dumps({"original": o, "paraphrases": [f"{o} (rephrased {k})" for k in range(2)]})
                            + "\n" for o in originals))
    cfg = sd_config(tiny_sd, sd_data, tmp_path, paraphrases_path=str(para))
    cfg.data = dataclasses.replace(cfg.data, paraphrase_strategy="replace-all")
    task, hashes = build_task(cfg)
    assert len(hashes["paraphrases_sha256"]) == 64
    ds = task.train_dataset()
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert "(rephrased" in item["caption"] and item["prompt_embeds"].shape == (77, 32)


@pytest.mark.parametrize("method,extra", [("difffit", {}), ("full", {"ema": True, "ema_decay": 0.5})])
def test_best_exports_mid_training_leave_the_live_model_alone(tiny_sd, sd_data, tmp_path, method, extra):
    """--select-best exports into RUN/best at validations while training goes on: the DiffFit fold and the EMA swap
    must not touch the live weights (a training with such exports ends where one without them ends)."""
    import dataclasses

    from harness.families.sd.task import build_task
    from harness.runs import create_run
    from harness.trainer import run_training

    ends = []
    for select in ("none", "val_loss"):
        cfg = sd_config(tiny_sd, sd_data, tmp_path, steps=3, lr=1e-3, method=method, **extra)
        cfg.loop = dataclasses.replace(cfg.loop, val_every=1, select_best=select)
        task, h = build_task(cfg)
        run = create_run("sd", {}, h, run_id=f"best-{method}-{select}")
        run_training(task, cfg.loop, run)
        ends.append([p.detach().clone() for p in task.trainable_parameters()])
        if select != "none":
            assert (run.dir / "best" / "unet" / "config.json").is_file()
    assert all(torch.equal(a, b) for a, b in zip(*ends))
