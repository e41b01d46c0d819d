"""SD results leave the harness in the layouts practitioners load: LoRA/DoRA adapters reload in a fresh process
through plain diffusers (`pipe.load_lora_weights(RUN/final)`) and give the images `harness generate` wrote; the
kohya/A1111 export loads back through diffusers' converter to the same weights; full-method runs generate."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from test_sd_fixtures import _one_torch_thread, sd_config, sd_data, tiny_sd  # noqa: F401

PROMPTS = ["Generate an image containing a polyp.", "Generate an image with no polyps."]


def _train(cfg, run_id):
    from harness.families.sd.task import train

    return train(cfg, run_id=run_id)


def _generate(run_cli, run, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code, _, err = run_cli("generate", run.dir, "--prompts", prompts, "--steps", "3", "--batch-size", "1", *extra)
    assert code == 0, err
    return [np.array(Image.open(run.dir / "images" / f"{i:05d}.png").convert("RGB")) for i in (1, 2)]


PLAIN_DIFFUSERS = textwrap.dedent("""
    import sys, numpy as np, torch
    from diffusers import StableDiffusionPipeline
    from harness.generate import image_seed
    base, adapter, out = sys.argv[1:4]
    for weight in sys.argv[4:]:  # one fresh pipeline per adapter file
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
        pipe.load_lora_weights(adapter, weight_name=weight)
        pipe.set_progress_bar_config(disable=True)
        ims = []
        for i, p in enumerate({prompts!r}, start=1):
            g = torch.Generator().manual_seed(image_seed(0, i))
            im = pipe(p, generator=g, num_inference_steps=3, height=32, width=32, output_type="np").images[0]
            ims.append(np.clip(np.round(im * 255), 0, 255).astype(np.uint8))
        np.save(f"{{out}}-{{weight}}.npy", np.stack(ims))
""").format(prompts=PROMPTS)


def _plain_diffusers_images(base, adapter, weights, tmp_path):
    """{weight file: images} from a fresh Python process that knows nothing of the harness but `image_seed`."""
    out = tmp_path / "plain"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(base), str(adapter), str(out), *weights], check=True,
                   env=env, capture_output=True)
    return {w: list(np.load(f"{out}-{w}.npy")) for w in weights}


@pytest.mark.parametrize("method,components,rank,alpha", [("lora", ["unet", "text_encoder"], 4, 8.0),
                                                          ("dora", ["unet"], 2, 4.0)])
def test_adapter_reloads_in_plain_diffusers_and_kohya(tiny_sd, sd_data, tmp_path, run_cli, method, components, rank,
                                                      alpha):
    from models.sd.adapters import KOHYA_NAME, WEIGHT_NAME

    cfg = sd_config(tiny_sd, sd_data, tmp_path, steps=6, lr=1e-2, method=method, components=components, rank=rank,
                    alpha=alpha, export_kohya=method == "lora")
    run = _train(cfg, f"adapter-{method}")
    ours = _generate(run_cli, run, tmp_path)
    weights = [WEIGHT_NAME, KOHYA_NAME] if method == "lora" else [WEIGHT_NAME]
    plain = _plain_diffusers_images(tiny_sd, run.dir / "final", weights, tmp_path)
    for a, b in zip(ours, plain[WEIGHT_NAME]):
        assert np.array_equal(a, b)
    # the adapter changes the images (it trained, and it was applied)
    from harness.families.sd.generate import build_pipeline

    from harness.generate import image_seed

    pipe, _ = build_pipeline(str(tiny_sd), None, None, "lora", [], "fp32", "cpu")
    g = torch.Generator().manual_seed(image_seed(0, 1))
    base_image = pipe(PROMPTS[0], generator=g, num_inference_steps=3, height=32, width=32, output_type="np").images[0]
    assert not np.array_equal(np.clip(np.round(base_image * 255), 0, 255).astype(np.uint8), ours[0])
    if method == "lora":
        from diffusers import StableDiffusionPipeline
        from safetensors.torch import load_file

        kohya = load_file(str(run.dir / "final" / KOHYA_NAME))
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
        assert any(k.startswith("lora_te_") for k in kohya)
        assert all(float(v) == alpha for k, v in kohya.items() if k.endswith(".alpha"))
        ref = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
        ref.load_lora_weights(str(run.dir / "final"), weight_name=WEIGHT_NAME)
        back = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
        back.load_lora_weights(str(run.dir / "final"), weight_name=KOHYA_NAME)  # diffusers' kohya converter
        for name in ("unet", "text_encoder"):
            a = {k: v for k, v in getattr(ref, name).state_dict().items() if "lora" in k}
            b = {k: v for k, v in getattr(back, name).state_dict().items() if "lora" in k}
            assert a.keys() == b.keys() and a
            assert all(torch.equal(a[k], b[k]) for k in a)
        for x, y in zip(ours, plain[KOHYA_NAME]):
            assert np.array_equal(x, y)


def test_full_and_difffit_runs_generate_with_every_scheduler(tiny_sd, sd_data, tmp_path, run_cli):
    import json

    cfg = sd_config(tiny_sd, sd_data, tmp_path, steps=3, method="difffit", components=["unet"],
                    clip_skip=2)
    cfg.generation.negative_prompt = "blurry"
    run = _train(cfg, "difffit")
    first = _generate(run_cli, run, tmp_path)
    assert first[0].shape == (32, 32, 3)
    assert json.loads((run.dir / "final" / "sd_meta.json").read_text())["method"] == "difffit"
    from harness.families.sd.generate import load_generator
    from harness.runs import open_run

    seen = []
    for sched in ("ddim", "euler", "dpmpp"):
        gen = load_generator(open_run(run.dir), {"scheduler": sched, "steps": 3})
        imgs = gen.generate(PROMPTS, [11, 12])
        again = gen.generate(PROMPTS[:1], [11])  # image k depends on (prompt k, seed k) only
        assert np.abs(imgs[0].astype(int) - again[0]).max() <= 1
        assert gen.info()["sampling"]["scheduler"] == sched and gen.info()["result_sha256"]
        seen.append(imgs[0])
    assert not np.array_equal(seen[0], seen[2])
    gen = load_generator(open_run(run.dir), {"height": 48, "width": 64, "steps": 2})
    assert gen.generate(PROMPTS[:1], [1])[0].shape == (48, 64, 3)
