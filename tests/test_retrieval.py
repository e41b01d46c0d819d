"""The retrieval reference family: `harness train retrieval` indexes the training split by caption attributes,
`harness generate` answers each prompt with a training image whose caption asks for the same attributes."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def split_path(tmp_path, sample_dir):
    from harness.split import write_split

    path = tmp_path / "split.json"
    write_split(sample_dir, path, val_images=12, seed=0)
    return path


def _records(images_dir):
    with open(images_dir / "records.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _train(run_cli, sample_dir, split_path, run_id="ret", size=32):
    code, out, err = run_cli("train", "retrieval", "--split", split_path, "--data", sample_dir, "--size", size,
                             "--run-id", run_id)
    assert code == 0, err
    from harness.runs import open_run

    return open_run(run_id)


def test_every_image_is_the_training_image_of_a_caption_with_the_prompts_attributes(run_cli, sample_dir, split_path):
    from harness.dataset import training_view
    from harness.families.retrieval.index import signature
    from harness.generate import read_manifest
    from harness.split import load_split
    from harness.data import load_devset

    run = _train(run_cli, sample_dir, split_path)
    code, out, err = run_cli("generate", run.dir, "--prompts", "split:val", "--images-per-prompt", "2")
    assert code == 0, err
    manifest = read_manifest(run.images_dir / "manifest.csv")
    records = _records(run.images_dir)
    assert len(records) == len(manifest) == 24
    train = set(load_split(split_path).train)
    captions = load_devset(sample_dir).captions_by_image()
    exact = 0
    for row, rec in zip(manifest, records):
        assert rec["filename"] == row["filename"] and rec["training_image"] in train
        sigs = {signature(c) for c in captions[rec["training_image"]]}
        if rec["match"] == "exact":
            exact += 1
            assert signature(row["prompt"]) in sigs  # a caption of the copied image asks for exactly this
        else:  # best overlap: the copied image has a caption sharing at least one asked attribute
            assert rec["match"] == "overlap" and float(rec["overlap"]) > 0
            assert any(set(signature(row["prompt"])) & set(s) for s in sigs)
        # the pixels are the training image as the training transform shows it, at the generation size
        img = np.asarray(Image.open(run.images_dir / row["filename"]))
        want = np.asarray(training_view(sample_dir / "images" / rec["training_image"], 32, "pad"))
        assert img.shape == (32, 32, 3) and np.array_equal(img, want)
    assert exact >= 20  # validation captions come from the same templates as training captions
    assert (run.dir / "index.json").is_file() and run.data_hashes()["split_sha256"]


def test_choice_is_a_function_of_seed_and_index_only(run_cli, sample_dir, split_path, tmp_path):
    run = _train(run_cli, sample_dir, split_path)
    outs = {}
    for label, seed, batch in (("a", 0, 8), ("b", 0, 1), ("c", 1, 8)):
        out = tmp_path / label
        out.mkdir()
        code, _, err = run_cli("generate", run.dir, "--prompts", "split:val", "--images-per-prompt", "3", "--seed",
                               seed, "--batch-size", batch, "--out", out)
        assert code == 0, err
        outs[label] = ([(out / f"{i:05d}.png").read_bytes() for i in range(1, 37)],
                       [r["training_image"] for r in _records(out)])
    assert outs["a"] == outs["b"]  # same seed: same images whatever the batch size
    assert outs["a"][1] != outs["c"][1]  # another seed draws other candidates
    # several images of one prompt (K = 3) are drawn independently among its candidates
    assert len({tuple(outs["a"][1][i:i + 3]) for i in range(0, 36, 3)}) > 1


def test_exact_then_best_overlap_then_any():
    from harness.families.retrieval.generate import RetrievalIndex
    from harness.families.retrieval.index import signature

    caps = {"a.jpg": ["Generate an image with a polyp of size 5-10mm."],
            "b.jpg": ["Generate an image with a polyp of size 5-10mm.", "Generate an image containing a tube."],
            "c.jpg": ["Generate an image containing a tube."]}
    doc = {"images": [{"image": k, "sha256": "x", "captions": [{"caption": c, "signature": list(signature(c))}
                                                                 for c in v]} for k, v in caps.items()]}
    index = RetrievalIndex(doc)
    images, kind, overlap, caption = index.candidates("Generate an image with a polyp of size 5-10mm.")
    assert (images, kind, overlap) == (("a.jpg", "b.jpg"), "exact", 1.0)
    # a paraphrase asking for more than any caption: the captions sharing the most of it
    images, kind, overlap, caption = index.candidates("Show a 5-10mm polyp and a tube in the lower-left.")
    assert kind == "overlap" and 0 < overlap < 1 and set(images) <= {"a.jpg", "b.jpg", "c.jpg"}
    assert index.candidates("zzz")[:3] == (("a.jpg", "b.jpg", "c.jpg"), "none", 0.0)  # asks for nothing known
    picks = {index.choose("Generate an image with a polyp of size 5-10mm.", s)["training_image"] for s in range(40)}
    assert picks == {"a.jpg", "b.jpg"}  # every candidate is reachable, nothing else is
    assert index.choose("Generate an image containing a tube.", 7) == index.choose("Generate an image containing a "
                                                                                  "tube.", 7)


def test_options_without_meaning_are_refused_in_one_line(run_cli, sample_dir, split_path):
    run = _train(run_cli, sample_dir, split_path)
    for args, msg in ((("--steps", "5"), "--steps does not apply to the retrieval family"),
                      (("--guidance", "3"), "--guidance does not apply"),
                      (("--dtype", "bf16"), "--dtype does not apply"),
                      (("--scheduler", "ddim"), "--scheduler is not supported by the retrieval family"),
                      (("--negative-prompt", "x"), "--negative-prompt is not supported by the retrieval family"),
                      (("--height", "16", "--width", "24"), "writes square images")):
        code, out, err = run_cli("generate", run.dir, "--prompts", "split:val", *args)
        assert code == 2 and msg in err and "Traceback" not in err and err.count("\n") == 1, (args, err)
    assert not (run.images_dir / "manifest.csv").exists()
    code, _, err = run_cli("generate", run.dir, "--prompts", "split:val", "--height", "24")
    assert code == 0, err
    assert Image.open(run.images_dir / "00001.png").size == (24, 24)
    code, _, err = run_cli("sweep", "retrieval", "--grid", "size=1,2")
    assert code == 2


def test_bad_inputs_are_one_line(run_cli, sample_dir, split_path, tmp_path):
    code, _, err = run_cli("train", "retrieval", "--split", tmp_path / "nope.json", "--data", sample_dir)
    assert code == 2 and "nope.json" in err and err.count("\n") == 1, err
    code, _, err = run_cli("train", "retrieval", "--split", split_path, "--data", tmp_path)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    run = _train(run_cli, sample_dir, split_path, run_id="tampered")
    (run.dir / "index.json").write_text((run.dir / "index.json").read_text().replace('"train"', '"val"'))
    code, _, err = run_cli("generate", run.dir, "--prompts", "split:val")
    assert code == 2 and "index.json was changed after indexing" in err, err


def test_train_test_pattern_makes_a_reference_run_that_generates_from_split_val(run_cli, sample_dir, split_path):
    code, out, err = run_cli("train", "test-pattern", "--split", split_path, "--data", sample_dir, "--size", "16",
                             "--run-id", "tp")
    assert code == 0, err
    from harness.runs import open_run

    run = open_run("tp")
    assert run.family == "test-pattern" and run.data_hashes()["split_sha256"]
    code, _, err = run_cli("generate", run.dir, "--prompts", "split:val")
    assert code == 0, err
    assert len(list(run.images_dir.glob("*.png"))) == 12 and not (run.images_dir / "records.csv").exists()


@pytest.mark.slow  # starts two processes under `accelerate launch`
def test_two_processes_copy_the_same_training_images_as_one(run_cli, sample_dir, split_path, tmp_path):
    import os
    import subprocess
    import sys

    run = _train(run_cli, sample_dir, split_path)
    single = tmp_path / "single"
    single.mkdir()
    assert run_cli("generate", run.dir, "--prompts", "split:val", "--batch-size", "4", "--out", single)[0] == 0
    res = subprocess.run([sys.executable, "-m", "harness", "generate", str(run.dir), "--prompts", "split:val",
                          "--batch-size", "4", "--num-processes", "2"],
                         env={**os.environ, "HARNESS_NO_PROGRESS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for i in range(1, 13):
        assert (run.images_dir / f"{i:05d}.png").read_bytes() == (single / f"{i:05d}.png").read_bytes()
    assert _records(run.images_dir) == _records(single)
