"""`harness score --metrics memorisation`: nearest training image of each generated image, calibrated on held-out
validation images. The retrieval baseline (copies) must be flagged, real held-out images and the test pattern not."""

from __future__ import annotations

import csv
import sys
import types

import numpy as np
import pytest
from PIL import Image

from harness.config import from_dict
from harness.score import ScoreConfig, score_folder, score_run


@pytest.fixture
def split_path(tmp_path, sample_dir):
    from harness.split import write_split

    path = tmp_path / "split.json"
    write_split(sample_dir, path, val_images=12, seed=0)
    return path


@pytest.fixture
def retrieval_run(run_cli, sample_dir, split_path):
    from harness.runs import open_run

    code, _, err = run_cli("train", "retrieval", "--split", split_path, "--data", sample_dir, "--size", "32",
                           "--run-id", "ret")
    assert code == 0, err
    code, _, err = run_cli("generate", "ret", "--prompts", "split:val", "--images-per-prompt", "2")
    assert code == 0, err
    return open_run("ret")


def _cfg(**kw) -> ScoreConfig:
    return from_dict(ScoreConfig, {"metrics": ["memorisation"], "memorisation_space": "pixels", "bootstrap": 50,
                                   "use_cache": False, **kw})


def _held_out_folder(tmp_path, sample_dir, split_path):
    """The validation images as the training transform shows them at 32 px: real images the model never saw."""
    from harness.dataset import training_view
    from harness.split import load_split

    folder = tmp_path / "held-out"
    folder.mkdir()
    for name in sorted(load_split(split_path).val):
        training_view(sample_dir / "images" / name, 32, "pad").save(folder / (name.rsplit(".", 1)[0] + ".png"))
    return folder


def test_retrieval_is_flagged_held_out_real_images_and_the_test_pattern_are_not(
        run_cli, retrieval_run, sample_dir, split_path, tmp_path):
    held = _held_out_folder(tmp_path, sample_dir, split_path)
    real = score_folder(held, _cfg(split=split_path, data=sample_dir)).metrics["memorisation"]
    assert real["status"] == "ok" and real["space"] == "pixels"
    # the features vary: validation images sit at different, non-zero distances from the training set
    v = real["val_nn_distance"]
    assert 0 < v["min"] < v["median"] < v["max"]
    assert real["n_gen"] == real["n_real"] == 12 and real["n_train"] == 36
    assert real["value"] <= 0.1 and abs(real["ratio"]["median"] - 1.0) < 1e-6
    assert 0.0 <= real["interval"]["low"] <= real["interval"]["high"] <= 1.0

    copied = score_run(retrieval_run, _cfg()).data
    mem = copied["metrics"]["memorisation"]
    assert mem["value"] >= 0.99 and mem["likely_copies"] == mem["n_gen"] == 24
    assert mem["gen_nn_distance"]["max"] < 1e-4 < mem["threshold"]
    assert mem["interval"]["low"] <= mem["value"] <= mem["interval"]["high"]
    # every flagged pair names the very training image the retrieval baseline copied
    with open(retrieval_run.images_dir / "records.csv", newline="") as f:
        used = {r["filename"]: r["training_image"] for r in csv.DictReader(f)}
    assert all(used[c["generated"]] == c["training_image"] for c in mem["closest"])
    # the grid of closest pairs and the per-image CSV are written and recorded
    grid = Image.open(mem["grid"])
    assert grid.format == "PNG" and grid.size[0] > 400
    with open(mem["nearest_csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 24
    assert retrieval_run.metrics_path.is_file() and mem["grid"].startswith(str(retrieval_run.dir))

    code, _, err = run_cli("train", "test-pattern", "--split", split_path, "--data", sample_dir, "--size", "32",
                           "--run-id", "tp")
    assert code == 0, err
    code, _, err = run_cli("generate", "tp", "--prompts", "split:val")
    assert code == 0, err
    from harness.runs import open_run

    pattern = score_run(open_run("tp"), _cfg()).metrics["memorisation"]
    assert pattern["value"] == 0.0 and pattern["ratio"]["min"] > 0.5


def test_auto_falls_back_to_pixels_without_inception_weights_and_says_so(retrieval_run, tmp_path):
    mem = score_run(retrieval_run, _cfg(memorisation_space="auto", allow_download=False)).metrics["memorisation"]
    assert mem["space"] == "pixels" and "Inception" in mem["space_note"] and mem["value"] >= 0.99
    asked = score_run(retrieval_run, _cfg(memorisation_space="inception", allow_download=False,
                                          out=tmp_path / "fresh.json")).data
    mem = asked["metrics"]["memorisation"]  # asked for Inception by name: not computed, never another space
    assert mem["status"] == "not computed" and "weights-inception" in mem["detail"]


def test_classifier_embedding_is_used_when_given(retrieval_run, monkeypatch, tmp_path):
    """The attribute classifier's contract (harness.attributes.load_classifier(run_dir, device) -> .embed(uint8
    N,3,H,W) -> (N, D), .image_size), stood in for by a fake module: the embedding decides the distances."""
    import torch

    from harness.runs import create_run

    seen = {}

    class Fake:
        image_size = 16

        def embed(self, x):
            assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (3, 16, 16)
            seen["n"] = seen.get("n", 0) + len(x)
            return x.float().flatten(1)

    fake = types.ModuleType("harness.attributes")
    fake.load_classifier = lambda run_dir, device: Fake()
    monkeypatch.setitem(sys.modules, "harness.attributes", fake)
    clf = create_run("attributes", {}, run_id="clf")
    mem = score_run(retrieval_run, _cfg(memorisation_space="auto", classifier=clf.dir)).metrics["memorisation"]
    assert mem["space"] == "classifier" and mem["extractor"] == "classifier:clf" and mem["value"] >= 0.99
    assert seen["n"] == 24 + 36 + 12


def test_bad_inputs_are_one_line(run_cli, retrieval_run, sample_dir, split_path, tmp_path):
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    for args, msg in (
            (("--classifier", not_a_run), "not a run directory"),
            (("--memorisation-space", "classifier"), "needs --classifier CLF_RUN")):
        code, out, err = run_cli("score", retrieval_run.dir, "--metrics", "memorisation", "--no-leaderboard", *args)
        assert code == 2 and msg in err and "Traceback" not in err and err.count("\n") == 1, err
    held = _held_out_folder(tmp_path, sample_dir, split_path)
    code, out, err = run_cli("score", held, "--metrics", "memorisation", "--real", held)
    assert code == 2 and "pass --split SPLIT.json --data DATA_DIR" in err and err.count("\n") == 1, err
    code, out, err = run_cli("score", retrieval_run.dir, "--metrics", "memorisation", "--no-leaderboard",
                             "--classifier", retrieval_run.dir)
    assert code == 2 and "not a run of `harness train attributes`" in err and err.count("\n") == 1, err


def test_weighted_lower_quantile_is_the_quantile_of_the_resampled_sample():
    from harness.memorisation import CopyFraction, lower_quantile

    rng = np.random.default_rng(0)
    for n in (2, 7, 150, 300):
        values = rng.random(n)
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        for q in (0.0, 0.01, 0.5, 0.99):
            assert lower_quantile(values, q, counts) == np.quantile(np.repeat(values, counts.astype(int)), q,
                                                                    method="lower")
        g = rng.random(40)[:, None]
        est = CopyFraction()
        ones = np.ones(n)
        assert est.replicate(est.prepare(g, values[:, None]), np.ones(40), ones) == est.point(g, values[:, None])


@pytest.mark.slow  # a randomly initialised InceptionV3 on CPU: about a minute
def test_inception_space_reuses_fids_cached_features_and_labels_unverified_weights(retrieval_run, tmp_path):
    """Inception pool3 through FID's own cached extraction: scoring FID first leaves nothing to extract for the
    generated and validation images. Randomly initialised (test) weights are labelled unverified."""
    from harness.features import write_random_weights

    weights = write_random_weights("inception-v3-compat", tmp_path / "inception.pth")
    base = {"inception_weights": weights, "allow_unverified_weights": True, "use_cache": True, "bootstrap": 0}
    score_run(retrieval_run, _cfg(metrics=["fid"], **base))
    data = score_run(retrieval_run, _cfg(memorisation_space="inception", **base)).data
    mem = data["metrics"]["memorisation"]
    assert mem["space"] == "inception" and mem["weights_verified"] is False and data["unverified_weights"]
    assert mem["value"] >= 0.99 and mem["val_nn_distance"]["min"] > 0
    cache = mem["feature_cache"]
    assert cache["gen"]["extracted"] == cache["val"]["extracted"] == 0 and cache["train"]["extracted"] == 36
