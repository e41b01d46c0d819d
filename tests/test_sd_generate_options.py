"""`harness generate --scheduler/--negative-prompt/--height/--width`: passed to the SD loader, part of the
generation identity (a resume with another scheduler is refused, --overwrite regenerates); a family that does not
honour an option refuses it in one line naming the option and the family."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from test_sd_fixtures import _one_torch_thread, sd_config, sd_data, tiny_sd  # noqa: F401


def test_sd_generate_options_enter_the_identity(tiny_sd, sd_data, tmp_path, run_cli):
    from harness.families.sd.task import train

    run = train(sd_config(tiny_sd, sd_data, tmp_path, steps=2), run_id="sd-gen")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Generate an image containing a polyp.\n")
    common = ["generate", run.dir, "--prompts", prompts, "--steps", "2", "--device", "cpu"]
    code, _, err = run_cli(*common, "--scheduler", "dpm-solver++", "--negative-prompt", "blurry",
                           "--height", "32", "--width", "48")
    assert code == 0, err
    assert np.array(Image.open(run.dir / "images" / "00001.png")).shape[:2] == (32, 48)
    model = json.loads((run.dir / "images" / "generation.json").read_text())["model"]
    assert model["sampling"]["scheduler"] == "dpmpp" and model["sampling"]["negative_prompt"] == "blurry"
    assert (model["sampling"]["height"], model["sampling"]["width"]) == (32, 48)
    # the same options again: a resume keeps the image
    code, out, err = run_cli(*common, "--scheduler", "dpm-solver++", "--negative-prompt", "blurry",
                             "--height", "32", "--width", "48")
    assert code == 0 and "1 already there" in out + err, err
    # another scheduler is another model: refused without --overwrite, regenerated with it
    code, _, err = run_cli(*common, "--scheduler", "euler", "--negative-prompt", "blurry", "--height", "32",
                           "--width", "48")
    assert code == 2 and "different prompt file, seed or model" in err
    code, _, err = run_cli(*common, "--scheduler", "euler", "--overwrite")
    assert code == 0, err
    model = json.loads((run.dir / "images" / "generation.json").read_text())["model"]
    assert model["sampling"]["scheduler"] == "euler" and model["sampling"]["height"] == 32  # the run's resolution


def test_families_without_an_option_refuse_it(tmp_path, run_cli):
    from harness.runs import create_run

    run = create_run("test-pattern", {"size": 16})
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    for opt, value in (("--scheduler", "euler"), ("--negative-prompt", "x"), ("--height", "64")):
        code, _, err = run_cli("generate", run.dir, "--prompts", prompts, opt, value)
        assert code == 2 and f"{opt} is not supported by the test-pattern family" in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (run.dir / "images" / "00001.png").exists()
    code, _, err = run_cli("generate", run.dir, "--prompts", prompts, "--scheduler", "ddim2")
    assert code == 2


def test_msdm_refuses_scheduler_naming_the_family(tmp_path):
    import pytest

    from harness.errors import UserError
    from harness.generate import load_generator
    from harness.runs import create_run

    run = create_run("msdm-unet", {})
    with pytest.raises(UserError, match="--negative-prompt is not supported by the msdm-unet family"):
        load_generator(run, {"negative_prompt": "x"})
