"""Generation: our sampler equals the diffusers pipelines, images do not depend on batch composition, adapters load
in a fresh process with the plain diffusers API and give identical images, and `harness generate` drives a run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_config, tiny_kandinsky  # noqa: F401 (fixtures)

PROMPTS = ["Generate an image containing a polyp", "Generate an image with no polyps",
           "Generate an image from a gastroscopy procedure"]


def test_sampler_equals_the_diffusers_pipelines(tiny_kandinsky):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from models.kandinsky import encoders as E
    from models.kandinsky.loading import load_decoder, load_prior
    from models.kandinsky.sampling import decode_images, sample_image_embeds

    p, d = load_prior(tiny_kandinsky[0]), load_decoder(tiny_kandinsky[1])
    text = E.encode_text(p.tokenizer, p.text_encoder, PROMPTS[1:2])
    neg = E.encode_text(p.tokenizer, p.text_encoder, [""])
    g = torch.Generator().manual_seed(7)
    emb = sample_image_embeds(p.prior, p.scheduler, text, neg, [g], steps=4, guidance=4.0)
    ours = decode_images(d.unet, d.movq, d.scheduler, emb, E.zero_image_embed(p.image_encoder), [g], steps=3,
                         height=32, width=32)[0]

    pp = KandinskyV22PriorPipeline.from_pretrained(tiny_kandinsky[0])
    dp = KandinskyV22Pipeline.from_pretrained(tiny_kandinsky[1])
    pp.set_progress_bar_config(disable=True)
    dp.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(7)
    out = pp(PROMPTS[1], generator=g, num_inference_steps=4, guidance_scale=4.0)
    assert torch.allclose(out.image_embeds, emb, atol=1e-5)
    ref = dp(image_embeds=out.image_embeds, negative_image_embeds=out.negative_image_embeds, generator=g,
             num_inference_steps=3, height=32, width=32, output_type="np").images[0]
    assert np.abs((ref * 255).round().astype(np.int16) - ours).max() <= 1


def _train(component, tiny_kandinsky, mini_data, tmp_path, **changes):
    from harness.families.kandinsky22.train import train

    cfg = tiny_config(component, tiny_kandinsky, mini_data, tmp_path, lora={"rank": 4},
                      loop={"max_steps": 3, "lr": 5e-2}, **changes)
    return train(cfg)


def test_adapters_pair_and_reload_in_a_fresh_process(tiny_kandinsky, mini_data, tmp_path):
    from harness.families.kandinsky22.train import load_generator

    decoder_run = _train("decoder", tiny_kandinsky, mini_data, tmp_path)
    prior_run = _train("prior", tiny_kandinsky, mini_data, tmp_path, decoder_adapter=str(decoder_run.dir))
    gen = load_generator(prior_run, {"device": "cpu"})
    info = gen.info()
    assert info["prior_adapter"]["path"] == str((prior_run.dir / "final").resolve())
    assert info["decoder_adapter"]["path"] == str((decoder_run.dir / "final").resolve())
    seeds = [11, 12, 13]
    ours = gen.generate(PROMPTS, seeds)
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in ours)

    # Batch composition does not matter: prompt 2 alone with its seed gives the same image.
    alone = gen.generate(PROMPTS[1:2], seeds[1:2])[0]
    assert np.abs(alone.astype(np.int16) - ours[1]).max() <= 1

    # The base models (no adapters) give other images: the adapters really are applied.
    base = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path)
    from harness.families.kandinsky22.train import KandinskyGenerator
    from models.kandinsky.loading import load_decoder, load_prior

    plain = KandinskyGenerator(load_prior(tiny_kandinsky[0]), load_decoder(tiny_kandinsky[1]), base.generation, 32, 32,
                               "cpu", {}).generate(PROMPTS, seeds)
    assert any(np.abs(a.astype(np.int16) - b).max() > 2 for a, b in zip(plain, ours))

    # A fresh process with nothing but diffusers: the documented snippet.
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, torch
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
        prior = KandinskyV22PriorPipeline.from_pretrained({str(tiny_kandinsky[0])!r})
        prior.prior.load_lora_adapter({str(prior_run.dir / 'final')!r}, prefix=None,
                                      weight_name="pytorch_lora_weights.safetensors")
        decoder = KandinskyV22Pipeline.from_pretrained({str(tiny_kandinsky[1])!r})
        decoder.unet.load_lora_adapter({str(decoder_run.dir / 'final')!r}, prefix=None,
                                       weight_name="pytorch_lora_weights.safetensors")
        out = []
        for prompt, seed in zip({PROMPTS!r}, {seeds!r}):
            g = torch.Generator().manual_seed(seed)
            emb, neg = prior(prompt, generator=g, num_inference_steps=3, guidance_scale=4.0).to_tuple()
            im = decoder(image_embeds=emb, negative_image_embeds=neg, generator=g, num_inference_steps=3,
                         guidance_scale=4.0, height=32, width=32, output_type="np").images[0]
            out.append((im * 255).round().astype(np.uint8).tolist())
        json.dump(out, sys.stdout)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = [np.array(x, dtype=np.uint8) for x in json.loads(res.stdout.strip().splitlines()[-1])]
    for a, b in zip(ours, theirs):
        assert np.abs(a.astype(np.int16) - b).max() <= 1


def test_generate_cli_on_a_decoder_run(tiny_kandinsky, mini_data, tmp_path, run_cli):
    from harness.generate import check_images_dir

    run = _train("decoder", tiny_kandinsky, mini_data, tmp_path)
    prompts = tmp_path / "prompts.txt"
    lines = [PROMPTS[i % 3] for i in range(5)]
    prompts.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli("generate", run.dir, "--prompts", prompts, "--batch-size", "2", "--steps", "2",
                             "--device", "cpu")
    assert code == 0, err
    assert check_images_dir(run.images_dir, lines) == []
    manifest_model = (run.images_dir / "manifest.csv").read_text().splitlines()[1].split(",")[-1]
    assert len(manifest_model) == 12
    gen_info = json.loads((run.images_dir / "generation.json").read_text())["model"]
    assert gen_info["family"] == "kandinsky-decoder" and gen_info["sampling"]["decoder_steps"] == 2
    assert gen_info["prior_adapter"] is None and gen_info["decoder_adapter"]["rank"] == 4
    assert len(gen_info["decoder_adapter"]["tensors_sha256"]) == 64


def test_generate_refuses_unfinished_run(tiny_kandinsky, mini_data, tmp_path):
    from harness.errors import UserError
    from harness.runs import create_run
    from harness.config import to_dict
    from harness.families.kandinsky22.train import load_generator

    cfg = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path)
    run = create_run("kandinsky-prior", to_dict(cfg))
    with pytest.raises(UserError, match="no finished adapter"):
        load_generator(run, {})
