"""Challenge profiles: the 2025 task-2 round trip (JSON prompts -> 10 images per prompt -> package -> validate),
a custom TOML profile, and `harness challenges list|show|check` with one-line errors."""

from __future__ import annotations

import json
import zipfile

import pytest

from harness.challenges import load_profile
from harness.errors import UserError
from harness.prompts import read_json_pair_prompts
from harness.runs import create_run

PAIRS_2025 = {
    "polyp": {"q1": ["An image with one polyp.", "A colonoscopy frame showing a single polyp."]},
    "instrument": {"q2": ["An image with a biopsy forceps.", "Forceps visible in the lower left."],
                   "q3": ["No instruments.", "A clean view without any instrument."]},
}


def _prompts_2025(tmp_path):
    path = tmp_path / "prompts-2025.json"
    path.write_text(json.dumps(PAIRS_2025), encoding="utf-8")
    return path


def test_json_prompts_are_flattened_like_the_organisers_script(tmp_path):
    pf = read_json_pair_prompts(_prompts_2025(tmp_path))
    assert pf.prompts == [c for qa in PAIRS_2025.values() for pair in qa.values() for c in pair]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"g": {"q": ["only one"]}}), encoding="utf-8")
    with pytest.raises(UserError, match="pair 'q'.*two non-empty"):
        read_json_pair_prompts(bad)


def test_2025_generate_package_validate_round_trip(tmp_path, run_cli):
    prompts = _prompts_2025(tmp_path)
    run = create_run("test-pattern", {"size": 16})
    code, out, err = run_cli("generate", run.dir, "--prompts", prompts, "--challenge", "imageclef2025-task2",
                             "--batch-size", "7")
    assert code == 0, err
    pngs = sorted(p.name for p in run.images_dir.glob("*.png"))
    assert pngs == [f"prompt{p:04d}_img{i:04d}.png" for p in range(1, 7) for i in range(1, 11)]
    assert len(pngs) == 60
    # The 10 images of a prompt are 10 seeds of the same prompt: all different.
    assert len({(run.images_dir / n).read_bytes() for n in pngs[:10]}) == 10

    # Resume keeps everything (same names, same seeds).
    code, out, err = run_cli("generate", run.dir, "--prompts", prompts, "--challenge", "imageclef2025-task2",
                             "--batch-size", "7")
    assert code == 0 and "0 generated, 60 already there" in out + err, out + err

    code, out, err = run_cli("validate", run.images_dir, "--prompts", prompts, "--challenge", "imageclef2025-task2")
    assert code == 0, out + err
    subs = tmp_path / "subs"
    code, out, err = run_cli("package", run.dir, "--prompts", prompts, "--team", "t", "--out", subs,
                             "--challenge", "imageclef2025-task2")
    assert code == 0, err
    zpath = subs / "t_medvqa2025_task2_images.zip"
    assert sorted(zipfile.ZipFile(zpath).namelist()) == pngs  # flat, and no manifest: the count is exactly 60
    code, out, err = run_cli("validate", zpath, "--prompts", prompts, "--challenge", "imageclef2025-task2")
    assert code == 0, out + err
    # The 2024 profile refuses the 2025 zip (its prompt file is not lines of text here, but the JSON lines).
    code, out, err = run_cli("validate", zpath, "--prompts", prompts)
    assert code == 2 and "Traceback" not in err

    # A missing image fails naming it, in one line, exit 2.
    (run.images_dir / "prompt0003_img0007.png").unlink()
    code, out, err = run_cli("validate", run.images_dir, "--prompts", prompts, "--challenge", "imageclef2025-task2")
    assert code == 2 and "missing prompt0003_img0007.png" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli("package", run.dir, "--prompts", prompts, "--team", "t", "--out", tmp_path / "s2",
                             "--challenge", "imageclef2025-task2")
    assert code == 2 and "prompt0003_img0007.png" in err and not (tmp_path / "s2").exists() or \
        not any((tmp_path / "s2").iterdir())


def test_2025_renamed_image_is_named(tmp_path, run_cli):
    prompts = _prompts_2025(tmp_path)
    run = create_run("test-pattern", {"size": 16})
    assert run_cli("generate", run.dir, "--prompts", prompts, "--challenge", "imageclef2025-task2")[0] == 0
    (run.images_dir / "prompt0002_img0010.png").rename(run.images_dir / "prompt0002_img0011.png")
    code, out, err = run_cli("validate", run.images_dir, "--prompts", prompts, "--challenge", "imageclef2025-task2")
    assert code == 2 and "prompt0002_img0011.png" in err and len(err.strip().splitlines()) == 1, err
    assert "missing prompt0002_img0010.png; unexpected prompt0002_img0011.png" in out
    # Also in a zip: the renamed entry is named.
    zpath = tmp_path / "x.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(run.images_dir.glob("*.png")):
            zf.write(p, p.name)
    code, out, err = run_cli("validate", zpath, "--prompts", prompts, "--challenge", "imageclef2025-task2")
    assert code == 2 and "prompt0002_img0011.png" in err and "missing prompt0002_img0010.png" in out


CUSTOM = """
name = "my-challenge"
title = "A custom challenge"
metrics = ["fid"]

[prompts]
format = "lines"
images_per_prompt = 3

[images]
file_template = "{prompt:03d}-{image}.jpg"
format = "jpeg"

[archive]
name = "{team}-custom.zip"
folder = ""
"""


def test_custom_toml_profile_round_trips(tmp_path, run_cli):
    profile = tmp_path / "custom.toml"
    profile.write_text(CUSTOM, encoding="utf-8")
    code, out, err = run_cli("challenges", "check", profile)
    assert code == 0 and "001-1.jpg" in out, err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a polyp\nan instrument\n", encoding="utf-8")
    run = create_run("test-pattern", {"size": 16})
    code, out, err = run_cli("generate", run.dir, "--prompts", prompts, "--challenge", profile)
    assert code == 0, err
    names = sorted(p.name for p in run.images_dir.glob("*.jpg"))
    assert names == [f"{p:03d}-{i}.jpg" for p in (1, 2) for i in (1, 2, 3)]
    code, out, err = run_cli("generate", run.dir, "--prompts", prompts, "--challenge", profile)
    assert code == 0 and "0 generated, 6 already there" in out + err, out + err  # JPEG keeps its metadata for resume
    subs = tmp_path / "subs"
    code, out, err = run_cli("package", run.dir, "--prompts", prompts, "--team", "me", "--out", subs,
                             "--challenge", profile)
    assert code == 0, err
    zpath = subs / "me-custom.zip"
    assert sorted(zipfile.ZipFile(zpath).namelist()) == names
    assert run_cli("validate", zpath, "--prompts", prompts, "--challenge", profile)[0] == 0
    (run.images_dir / "002-3.jpg").unlink()
    code, out, err = run_cli("validate", run.images_dir, "--prompts", prompts, "--challenge", profile)
    assert code == 2 and "missing 002-3.jpg" in err


def test_default_profile_is_the_2024_behaviour():
    p = load_profile()
    assert p.name == "imageclef2024-task1" and p.k == 1
    assert p.expected_names(2) == ["00001.png", "00002.png"] and p.zip_name("a") == "a_clef2024_medvqa.zip"
    assert p.entry("00001.png") == "task1/00001.png" and p.archive.manifest


@pytest.mark.parametrize("text, expected", [
    ('name = "x"\n[images]\nfile_tmpl = "a.png"\n', ":3: profile.images: unknown key(s) file_tmpl"),
    ('name = "x"\n[images\n', "not valid TOML"),
    ('name = "x"\n[images]\nfile_template = "{n}.png"\n', ":3: images.file_template"),
    ('name = "x"\n[images]\nfile_template = "{prompt}.png"\n', "must contain {index}, or both"),
    ('name = "x"\n[images]\nfile_template = "{index}.jpg"\n', "does not fit images.format 'png'"),
    ('name = "x"\n[prompts]\nimages_per_prompt = 0\n', "images_per_prompt: must be >= 1"),
    ('name = "x"\nmetrics = ["accuracy"]\n', ":2: metrics: unknown metric(s) accuracy"),
    ('name = "x"\n[archive]\nname = "{team}.tar"\n', "archive.name"),
])
def test_challenges_check_reports_one_line_errors(tmp_path, run_cli, text, expected):
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    code, out, err = run_cli("challenges", "check", path)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert str(path) in err


def test_challenges_list_and_show(run_cli):
    code, out, err = run_cli("challenges", "list")
    assert code == 0 and "imageclef2024-task1" in out and "imageclef2025-task2" in out
    code, out, err = run_cli("challenges", "show", "imageclef2025-task2")
    assert code == 0 and "prompt0001_img0001.png" in out and "images_per_prompt: 10" in out
    code, out, err = run_cli("challenges", "show", "nope")
    assert code == 2 and "no such challenge" in err


def test_hub_folder_for_2025_runs_its_script(tmp_path, run_cli):
    import subprocess
    import sys

    prompts = _prompts_2025(tmp_path)
    run = create_run("test-pattern", {"size": 16})
    assert run_cli("generate", run.dir, "--prompts", prompts, "--challenge", "imageclef2025-task2",
                   "--seed", "3")[0] == 0
    out = tmp_path / "hub"
    code, stdout, err = run_cli("package", run.dir, "--prompts", prompts, "--team", "t", "--out", out,
                                "--challenge", "imageclef2025-task2", "--hub-repo", "me/medvqa-t2")
    assert code == 0, err
    folder = out / "medvqa-t2"
    for f in ("submission_task2.py", "requirements.txt", "README.md", "predictions_2.json", "prompts.json",
              "harness/generate.py", f"runs/{run.id}/config.json"):
        assert (folder / f).is_file(), f
    assert not (folder / "runs" / run.id / "images").exists()
    preds = json.loads((folder / "predictions_2.json").read_text())
    assert set(preds) == {"submission_info", "public_scores", "total_time", "time_per_item", "memory_used_mb",
                          "model_memory_mb", "gpu_name", "predictions", "debug"}
    assert preds["submission_info"]["Team_Name"] == "t"
    assert "torch" in (folder / "requirements.txt").read_text()
    # The organisers' way: run the script in a fresh working directory; it regenerates the same images.
    work = tmp_path / "organisers"
    work.mkdir()
    res = subprocess.run([sys.executable, str(folder / "submission_task2.py")], cwd=work, capture_output=True,
                         text=True, env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr
    made = sorted(p.name for p in (work / "generated_images").glob("*.png"))
    assert len(made) == 60
    assert (work / "generated_images" / made[5]).read_bytes() == (run.images_dir / made[5]).read_bytes()
    done = json.loads((work / "predictions_2.json").read_text())
    assert done["total_time"] > 0 and done["gpu_name"] == "cpu"
    assert "prompts_fallback" in done["debug"] and "features_not_computed" in done["debug"]  # offline here
    assert run_cli("validate", work / "generated_images", "--prompts", prompts, "--challenge",
                   "imageclef2025-task2")[0] == 0
    assert run_cli("validate", folder, "--prompts", prompts, "--challenge", "imageclef2025-task2")[0] == 0
    (folder / "requirements.txt").unlink()
    code, stdout, err = run_cli("validate", folder, "--prompts", prompts, "--challenge", "imageclef2025-task2")
    assert code == 2 and "requirements.txt: missing" in err
    # --push offline: one line saying what would have been uploaded.
    code, stdout, err = run_cli("package", run.dir, "--prompts", prompts, "--team", "t", "--out", tmp_path / "h2",
                                "--challenge", "imageclef2025-task2", "--hub-repo", "me/medvqa-t2", "--push")
    line = err[err.index("error:"):].strip()
    assert code == 2 and "would have uploaded" in line and "me/medvqa-t2" in line and "\n" not in line


def test_profile_naming_keeps_sharding_and_resume_guarantees(tmp_path):
    from harness.generate import TestPatternGenerator, generate_images

    profile = load_profile("imageclef2025-task2")
    per_image = profile.image_prompts(["p one", "p two", "p three"])
    ref = tmp_path / "ref"
    generate_images(TestPatternGenerator(16), per_image, ref, batch_size=4, name=profile.file_name)
    shard = tmp_path / "shard"
    for rank in (0, 1, 2):  # three processes, fixed index blocks
        generate_images(TestPatternGenerator(16), per_image, shard, batch_size=4, shard=(rank, 3),
                        name=profile.file_name)
    names = profile.expected_names(3)
    assert sorted(p.name for p in shard.glob("*.png")) == sorted(names)
    assert all((shard / n).read_bytes() == (ref / n).read_bytes() for n in names)
    # A killed run (two images lost, one truncated) resumes to the same bytes, regenerating only what is missing.
    (shard / names[5]).unlink()
    (shard / names[17]).unlink()
    data = (shard / names[22]).read_bytes()
    (shard / names[22]).write_bytes(data[: len(data) // 2])
    rep = generate_images(TestPatternGenerator(16), per_image, shard, batch_size=4, name=profile.file_name)
    assert rep.generated == 3 and rep.skipped == 27
    assert all((shard / n).read_bytes() == (ref / n).read_bytes() for n in names)


def test_score_challenge_2024_is_the_ordinary_score(tmp_path, run_cli):
    code, out, err = run_cli("score", tmp_path, "--challenge", "imageclef2024-task1", "--organiser-quirks")
    assert code == 2 and "--organiser-quirks is for the 2025" in err


def test_json_prompts_under_the_2024_profile_say_which_challenge(tmp_path, run_cli):
    prompts = _prompts_2025(tmp_path)
    run = create_run("test-pattern", {"size": 16})
    code, out, err = run_cli("generate", run.dir, "--prompts", prompts)
    assert code == 2 and "--challenge imageclef2025-task2" in err and not run.images_dir.exists()


def test_images_per_prompt_keeps_its_2024_meaning_and_is_checked_against_a_profile(tmp_path, run_cli):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a polyp\nan instrument\n", encoding="utf-8")
    run = create_run("test-pattern", {"size": 16})
    code, out, err = run_cli("generate", run.dir, "--prompts", prompts, "--images-per-prompt", "3")
    assert code == 0, err
    assert sorted(p.name for p in run.images_dir.glob("*.png")) == [f"{i:05d}.png" for i in range(1, 7)]
    code, out, err = run_cli("generate", run.dir, "--prompts", _prompts_2025(tmp_path), "--challenge",
                             "imageclef2025-task2", "--images-per-prompt", "3", "--out", tmp_path / "x")
    assert code == 2 and "asks for 10 image(s) per prompt" in err
