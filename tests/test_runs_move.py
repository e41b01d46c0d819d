"""Runs you can move: recorded paths resolve after a move or copy, from any working directory; a copied run keeps
its images (the generation identity holds content hashes, not folder names)."""

from __future__ import annotations

import json
import shutil

import pytest

import harness.generate as G
from harness.errors import UserError
from harness.generate import TestPatternGenerator, check_images_dir, image_name
from harness.runs import PATHS_JSON, create_run, open_run

PROMPTS = ["Generate an image with no polyps.", "Generate an image containing text.",
           "Generate an image with 2 findings."]


def _project(root):
    """A project folder: data file, split, a folder input, and a run under runs/ that names them by absolute path."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "prompt-gt.csv").write_text("Filename;Prompt\n", encoding="utf-8")
    (root / "split.json").write_text('{"train": [], "val": []}\n', encoding="utf-8")
    (root / "clip" / "text_encoder").mkdir(parents=True)
    cfg = {"data_dir": str(root / "data"), "split_path": str(root / "split.json"), "text_encoder": str(root / "clip"),
           "hub": "openai/clip-vit-large-patch14", "nested": {"paths": [str(root / "split.json")]}}
    return create_run("test-pattern", cfg, {"split": str(root / "split.json")}, root=root / "runs", run_id="a")


def test_paths_are_recorded_relative_to_the_run_and_hashed(tmp_path):
    run = _project(tmp_path / "proj")
    rec = json.loads((run.dir / PATHS_JSON).read_text())["paths"]
    split = str(tmp_path / "proj" / "split.json")
    assert rec[split]["relative"] == "../../split.json" and len(rec[split]["sha256"]) == 64
    assert rec[str(tmp_path / "proj" / "clip")]["relative"] == "../../clip" and "sha256" not in rec[
        str(tmp_path / "proj" / "clip")]
    assert "openai/clip-vit-large-patch14" not in rec  # a hub id is not a path


def test_moved_project_resolves_from_another_directory(tmp_path, monkeypatch):
    _project(tmp_path / "proj")
    shutil.move(tmp_path / "proj", tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = open_run(tmp_path / "moved" / "runs" / "a")
    cfg = run.config()  # readers get the paths where they are now
    assert cfg["data_dir"] == str(tmp_path / "moved" / "data")
    assert cfg["nested"]["paths"][0].endswith("split.json") and run.config(resolve=False)["data_dir"].startswith(
        str(tmp_path / "proj"))
    assert run.resolve_recorded(run.config(resolve=False)["text_encoder"], "text encoder").samefile(
        tmp_path / "moved" / "clip")
    assert run.resolve_recorded("openai/clip-vit-large-patch14", "text encoder", hub_ok=True) == \
        "openai/clip-vit-large-patch14"


def test_missing_recorded_path_says_where_it_looked(tmp_path):
    run = _project(tmp_path / "proj")
    old = run.config(resolve=False)["text_encoder"]
    shutil.rmtree(tmp_path / "proj" / "clip")
    with pytest.raises(UserError) as e:
        run.resolve_recorded(old, "text encoder", hub_ok=True)
    msg = str(e.value)
    assert "text encoder" in msg and "tried:" in msg and f"{old} (missing)" in msg
    assert f"{tmp_path / 'proj' / 'clip'} (missing)" in msg  # the absolute and the run-relative place
    assert run.config()["text_encoder"] == old  # left as recorded for the reader to report


def test_a_file_with_other_content_is_not_taken_for_the_recorded_one(tmp_path):
    run = _project(tmp_path / "proj")
    split = run.config(resolve=False)["split_path"]
    shutil.move(tmp_path / "proj", tmp_path / "moved")
    (tmp_path / "moved" / "split.json").write_text('{"train": ["x"], "val": []}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"split\.json \(other content\)"):
        open_run(tmp_path / "moved" / "runs" / "a").resolve_recorded(split, "split")


class _Located(TestPatternGenerator):
    """Like the real families, `info()` names the run and its files (provenance) besides content hashes."""

    def __init__(self, run):
        super().__init__(size=16)
        self.run = run

    def info(self):
        return {**super().info(), "run_id": self.run.id, "adapter": {"path": str(self.run.dir / "final"),
                                                                      "tensors_sha256": "abc"}}


def test_copied_run_keeps_its_images(tmp_path, run_cli, monkeypatch):
    """`cp -r runs/a runs/b`: generating in b finds every image valid (nothing regenerated), and b packages."""
    monkeypatch.setattr(G, "load_generator", lambda run, overrides: _Located(run))
    a = create_run("test-pattern", {"size": 16}, run_id="a")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    code, out, err = run_cli("generate", a.dir, "--prompts", prompts)
    assert code == 0, err
    rec = json.loads((a.images_dir / "generation.json").read_text())
    assert "run_id" not in rec["model"] and "path" not in rec["model"]["adapter"]
    b_dir = a.dir.parent / "b"
    shutil.copytree(a.dir, b_dir)
    before = [(b_dir / "images" / image_name(i)).read_bytes() for i in (1, 2, 3)]
    code, out, err = run_cli("generate", b_dir, "--prompts", prompts)
    assert code == 0, err
    assert "0 generated, 3 already there" in " ".join((out + err).split())
    assert [(b_dir / "images" / image_name(i)).read_bytes() for i in (1, 2, 3)] == before
    assert check_images_dir(b_dir / "images", PROMPTS) == []
    code, out, err = run_cli("package", b_dir, "--prompts", prompts, "--team", "t", "--out", tmp_path / "subs")
    assert code == 0, err


def test_identity_ignores_locations_but_not_content():
    from pathlib import Path
    from types import SimpleNamespace

    a = _Located(SimpleNamespace(id="a", dir=Path("/x/a")))
    b = _Located(SimpleNamespace(id="b", dir=Path("/y/b")))
    assert a.model_key() == b.model_key() and a.info() != b.info()
    assert TestPatternGenerator(size=32).model_key() != TestPatternGenerator(size=16).model_key()


@pytest.mark.slow  # trains a tiny VAE and UNet through the CLI (about 40 s on 2 busy cores)
def test_msdm_project_moved_and_copied_keeps_text_encoder_and_images(tmp_path, monkeypatch, run_cli, sample_dir):
    """The README's MSDM recipe offline (make-tiny clip-text -> split -> VAE -> UNet -> generate), then the whole
    project folder is moved and the run copied; from another directory the UNet run still finds its text encoder
    (recorded by absolute path, found relative to the run), and the copy's images stay valid."""
    proj = tmp_path / "proj"
    proj.mkdir()
    monkeypatch.chdir(proj)
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(proj / "runs"))
    steps = ["--max-steps", "2", "--batch-size", "4", "--checkpoint-every", "0", "--val-every", "0",
             "--sample-every", "0", "--preset", "tiny"]
    for args in (["models", "make-tiny", "clip-text", "tiny-clip"],
                 ["split", sample_dir, "--val-images", "4", "--out", "split.json"],
                 ["train", "msdm-vae", "--split", "split.json", "--data", sample_dir, "--run-id", "vae",
                  "--perceptual-weight", "0", "--resolution", "32", *steps],
                 ["train", "msdm-unet", "--split", "split.json", "--data", sample_dir, "--run-id", "unet",
                  "--vae", "runs/vae", "--text-encoder", "tiny-clip", *steps]):
        code, out, err = run_cli(*args)
        assert code == 0, (args, out, err)
    (proj / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    code, out, err = run_cli("generate", "runs/unet", "--prompts", "prompts.txt", "--steps", "2")
    assert code == 0, err

    shutil.move(proj, tmp_path / "moved")
    moved = tmp_path / "moved"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(elsewhere / "runs"))
    shutil.copytree(moved / "runs" / "unet", moved / "runs" / "unet-copy")
    for run in ("unet", "unet-copy"):
        code, out, err = run_cli("generate", moved / "runs" / run, "--prompts", moved / "prompts.txt", "--steps", "2")
        assert code == 0, err
        assert "0 generated, 3 already there" in " ".join((out + err).split())

    shutil.rmtree(moved / "tiny-clip")  # gone for good: the error names every place tried
    code, out, err = run_cli("generate", moved / "runs" / "unet", "--prompts", moved / "prompts.txt")
    assert code == 2 and "text encoder" in err and "tried:" in err and str(moved / "tiny-clip") in err


def test_a_moved_run_whose_split_is_gone_names_every_place_tried(tmp_path, run_cli):
    """`generate --prompts split:val` and `score` read the run's split: when it is nowhere, the one-line error lists
    the places tried (as written, recorded absolute path, beside the moved run), not just the old absolute path."""
    from harness.score import recorded_data_paths

    _project(tmp_path / "proj")
    shutil.move(tmp_path / "proj", tmp_path / "moved")
    (tmp_path / "moved" / "split.json").unlink()
    run = open_run(tmp_path / "moved" / "runs" / "a")
    with pytest.raises(UserError, match="split file .* not found; tried: .*moved/split.json"):
        recorded_data_paths(run, run.config())
    code, _, err = run_cli("generate", run.dir, "--prompts", "split:val")
    assert code == 2 and "tried:" in err and str(tmp_path / "moved" / "split.json") in err.replace("\n", "")
