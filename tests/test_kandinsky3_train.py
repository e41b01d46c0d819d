"""Kandinsky 3.0 LoRA family on the tiny offline pipeline (`harness models make-tiny kandinsky3`): training on the
shared loop with the T5 text cache (encoder never resident), base weights bit-identical, loss falls, the cache is
hit again and invalidated by a caption edit, generation matches diffusers' Kandinsky3Pipeline, adapters reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_kandinsky_fixtures import _one_torch_thread, make_mini_devset  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def tiny_k3(tmp_path_factory) -> Path:
    from harness.cli import main

    out = tmp_path_factory.mktemp("tiny-k3") / "k3"
    with pytest.raises(SystemExit) as e:
        main(["models", "make-tiny", "kandinsky3", str(out)])
    assert e.value.code == 0
    return out


@pytest.fixture
def mini(sample_dir, tmp_path):
    return make_mini_devset(sample_dir, tmp_path / "mini")


def k3_config(tiny_k3, mini, tmp_path, **changes):
    from harness.config import to_dict
    from harness.families.kandinsky3.train import Kandinsky3Config, config_from_dict

    d = to_dict(Kandinsky3Config())
    d.update(data_dir=str(mini[0]), split_path=str(mini[1]), base=str(tiny_k3), cache_dir=str(tmp_path / "cache"))
    d["data"]["resolution"] = 32
    d["loop"].update(max_steps=4, batch_size=2, checkpoint_every=0, val_every=0, val_batches=1, log_every=1, lr=1e-3)
    d["generation"].update(steps=3)
    for k, v in changes.items():
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    return config_from_dict(d)


def _eval(task, batch, n=8):
    from harness.trainer import cpu_generator

    with torch.no_grad():
        return sum(float(task.loss(batch, cpu_generator(s))) for s in range(n)) / n


def test_overfits_only_lora_changes_and_encoder_not_resident(tiny_k3, mini, tmp_path):
    import gc

    from transformers import T5EncoderModel

    from harness.families.kandinsky3.train import build_task
    from harness.runs import create_run
    from harness.trainer import run_training
    from models.kandinsky.lora import base_parameters, lora_parameters

    cfg = k3_config(tiny_k3, mini, tmp_path, lora={"rank": 8}, snr_gamma=5.0,
                    loop={"max_steps": 40, "batch_size": 4, "lr": 1e-2}, data={"caption_dropout": 0.0})
    task, hashes = build_task(cfg)
    assert hashes["encoder_cache"]["text"]["misses"] == hashes["encoder_cache"]["n_captions"] > 1
    ds = task.train_dataset()
    batch = task.collate([ds[i] for i in range(len(ds))])
    assert batch["text_embeds"].dtype == torch.float16  # stored fp16
    before = _eval(task, batch)
    base_before = {n: p.detach().clone() for n, p in base_parameters(task.unet).items()}
    seen: list[int] = []
    orig = task.loss

    def spy(b, g):  # during the first training steps: no T5 encoder object alive anywhere (a full scan is slow)
        if len(seen) < 2:
            gc.collect()
            seen.append(sum(isinstance(o, T5EncoderModel) for o in gc.get_objects()))
        return orig(b, g)

    task.loss = spy
    run_training(task, cfg.loop, create_run("kandinsky3", {}, hashes))
    task.loss = orig
    assert seen and max(seen) == 0
    assert set(task.modules()) == {"unet"}  # latents cached: no MoVQ either
    after = _eval(task, batch)
    assert after < 0.9 * before, (before, after)  # measured 1.01 -> 0.81 (tiny U-Net: few attention weights)
    base_after = base_parameters(task.unet)
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)
    assert {id(p) for p in task.trainable_parameters()} == {id(p) for p in lora_parameters(task.unet)}


def test_cache_hit_then_invalidated_by_caption_edit(tiny_k3, mini, tmp_path):
    from harness.families.kandinsky3.train import build_task

    cfg = k3_config(tiny_k3, mini, tmp_path)
    _, h1 = build_task(cfg)
    _, h2 = build_task(cfg)
    assert h2["encoder_cache"]["text"] == {"hits": h1["encoder_cache"]["n_captions"], "misses": 0}
    assert h2["encoder_cache"]["latents"]["misses"] == 0
    csv = Path(mini[0]) / "prompt-gt.csv"
    lines = csv.read_text().splitlines()
    prompt, name = lines[1].split(";")
    lines[1] = f"{prompt} edited;{name}"
    csv.write_text("\r\n".join(lines) + "\r\n")
    cfg = k3_config(tiny_k3, mini, tmp_path)
    from harness.io import sha256_file, write_json

    split = json.loads(Path(mini[1]).read_text())
    split["csv_sha256"] = sha256_file(csv)
    write_json(mini[1], split)
    _, h3 = build_task(cfg)
    assert h3["encoder_cache"]["text"]["misses"] == 1


def test_train_generate_matches_diffusers_and_reload(tiny_k3, mini, tmp_path, run_cli):
    from diffusers import Kandinsky3Pipeline

    from harness.generate import load_generator
    from harness.runs import open_run
    from models.kandinsky3.lora import load_adapter

    code, out, err = run_cli("train", "kandinsky3", "--base", str(tiny_k3), "--data", str(mini[0]), "--split",
                             str(mini[1]), "--rank", "4", "--max-steps", "3", "--batch-size", "2", "--resolution",
                             "32", "--cache-dir", str(tmp_path / "cache"), "--lr", "1e-2")
    assert code == 0, err
    run_dir = Path(out.split("trained ")[1].split(":")[0].strip()) if "trained " in out else None
    from harness.runs import list_runs

    run = open_run(str(run_dir)) if run_dir else list_runs()[-1]
    gen = load_generator(run, {"steps": 3})
    prompts = ["Generate an image containing a polyp", "an image with text"]
    imgs = gen.generate(prompts, [11, 12])
    again = gen.generate(prompts[::-1], [12, 11])  # per-index seeds: batch order does not matter
    assert np.abs(imgs[0].astype(int) - again[1].astype(int)).max() <= 1

    pipe = Kandinsky3Pipeline.from_pretrained(str(tiny_k3))
    load_adapter(pipe.unet, run.dir / "final")  # the plain diffusers + peft recipe
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompts[0], negative_prompt="", num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
               generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    ref = np.clip(np.round(ref * 255), 0, 255).astype(np.uint8)
    # the generator reads fp16-cached embeddings; diffusers encodes in fp32: a grey level or two at most
    assert np.abs(ref.astype(int) - imgs[0].astype(int)).max() <= 3
    assert (imgs[0] != imgs[1]).any()


def test_resume_is_exact_and_fresh_process_reload_gives_same_images(tiny_k3, mini, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from harness.families.kandinsky3.train import resume, train
    from harness.generate import load_generator

    full = train(k3_config(tiny_k3, mini, tmp_path, loop={"max_steps": 4, "checkpoint_every": 2}), run_id="full")
    part = train(k3_config(tiny_k3, mini, tmp_path, loop={"max_steps": 2, "checkpoint_every": 2}), run_id="part")
    resume(part, max_steps=4)
    a = load_file(str(full.dir / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part.dir / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    img = load_generator(full, {"steps": 2}).generate(["one polyp"], [5])[0]
    code = ("import sys, numpy as np; from harness.runs import open_run; from harness.generate import load_generator;"
            "im = load_generator(open_run(sys.argv[1]), {'steps': 2}).generate(['one polyp'], [5])[0];"
            "np.save(sys.argv[2], im)")
    out = tmp_path / "fresh.npy"
    subprocess.run([sys.executable, "-c", code, str(full.dir), str(out)], check=True, capture_output=True)
    assert np.array_equal(np.load(out), img)


def test_no_cache_and_gradient_checkpointing_give_the_same_loss_and_grads(tiny_k3, mini, tmp_path):
    """--no-cache encodes the MoVQ latents every step (MoVQ resident, texts still cached): same loss as the latent
    cache. Gradient checkpointing recomputes activations: same LoRA gradients."""
    from harness.families.kandinsky3.train import build_task
    from harness.trainer import cpu_generator

    cached, _ = build_task(k3_config(tiny_k3, mini, tmp_path, data={"caption_dropout": 0.0}))
    fresh, _ = build_task(k3_config(tiny_k3, mini, tmp_path, cache=False, gradient_checkpointing=True,
                                    data={"caption_dropout": 0.0}))
    assert set(fresh.modules()) == {"unet", "movq"}
    b1 = cached.collate([cached.train_dataset()[i] for i in range(2)])
    b2 = fresh.collate([fresh.train_dataset()[i] for i in range(2)])
    assert "pixels" in b2 and "latents" not in b2
    l1, l2 = cached.loss(b1, cpu_generator(0)), fresh.loss(b2, cpu_generator(0))
    assert torch.allclose(l1, l2, atol=1e-5)
    l1.backward()
    l2.backward()
    g1 = [p.grad for p in cached.trainable_parameters()]
    g2 = [p.grad for p in fresh.trainable_parameters()]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
