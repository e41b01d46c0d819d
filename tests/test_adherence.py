"""`harness score --metrics adherence --classifier CLF` on the shipped sample: the plumbing (a tiny classifier trained
a few steps cannot separate anything; the acceptance comparison is in test_attributes_slow.py)."""

from __future__ import annotations

import json

import pytest

from attributes_fixtures import pattern_run, real_copy_run, retrieval_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(sample dir, split, a classifier run) shared by the module: trained once, 4 steps at 32 px."""
    from harness.attributes import attribute_config, fit, real_side
    from harness.sample import sample_dir
    from harness.split import write_split

    root = tmp_path_factory.mktemp("adherence")
    split = root / "split.json"
    write_split(sample_dir(), split, val_images=8, seed=0)
    cfg = attribute_config(sample_dir(), split, {"image_size": 32, "min_count": 3, "weights": "none",
                                                 "loop": {"max_steps": 4, "batch_size": 8, "checkpoint_every": 0,
                                                          "val_every": 0}})
    train, hashes = real_side(sample_dir(), split, "train")
    val, _ = real_side(sample_dir(), split, "val")
    run = fit(cfg, train, val, hashes, root=root / "clf-runs", run_id="clf")
    return sample_dir(), split, run.dir


def test_adherence_without_classifier_is_a_one_line_usage_error(tiny, run_cli):
    data, split, _ = tiny
    run = pattern_run(data, split, "val", "tp")
    code, _, err = run_cli("score", run.dir, "--metrics", "adherence")
    assert code == 2 and "--classifier" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("score", run.dir, "--metrics", "adherence", "--classifier", run.dir)
    assert code == 2 and str(run.dir) in err and "not a run of `harness train attributes`" in err


def test_adherence_of_a_run_and_of_a_real_folder_is_stored_with_n_interval_and_leaderboard(tiny, tmp_path, run_cli):
    data, split, clf = tiny
    common = ["--metrics", "adherence", "--classifier", clf, "--bootstrap", "20", "--device", "cpu"]
    run = pattern_run(data, split, "train", "tp")
    code, out, err = run_cli("score", run.dir, *common)
    assert code == 0, err
    m = json.loads((run.dir / "metrics.json").read_text())["metrics"]["adherence"]
    assert m["status"] == "ok" and m["n_gen"] == 40 and m["value"] == m["macro_auroc"]
    assert m["interval"]["low"] <= m["value"] <= m["interval"]["high"] and m["interval"]["n_boot"] == 20
    assert 0 <= m["all_asked"] <= 1 and m["n_images_with_asks"] > 0
    assert m["classifier"]["run_id"] == "clf" and m["classifier"]["weights_sha256"]
    assert m["prediction_spread"] > 0
    assert "adherence" in out and "macro AUROC" in out
    board = (tmp_path / "leaderboard.md").read_text()
    assert "| adherence |" in board.replace("adherence |", "adherence |") and f"{m['value']:.3f}" in board

    # a folder of real images with their prompts (manifest.csv) scores the same way
    copy = real_copy_run(data, split, "train", "copy")
    code, _, err = run_cli("score", copy.images_dir, *common, "--real", "val", "--split", split, "--data", data,
                           "--out", tmp_path / "copy.json")
    assert code == 0, err
    c = json.loads((tmp_path / "copy.json").read_text())["metrics"]["adherence"]
    assert c["status"] == "ok" and c["n_gen"] == 40
    # the same images, in another order with their prompts, give the same value (per-image pairing is kept)
    assert c["labels"].keys() == m["labels"].keys()


def test_adherence_is_kept_beside_other_metrics_when_rescored(tiny, run_cli):
    data, split, clf = tiny
    run = pattern_run(data, split, "val", "tp")
    assert run_cli("score", run.dir, "--metrics", "adherence", "--classifier", clf, "--bootstrap", "0")[0] == 0
    m = json.loads((run.dir / "metrics.json").read_text())["metrics"]["adherence"]
    assert "interval" not in m
    # FTER's entry (written by `harness fter`) survives a re-score
    doc = json.loads((run.dir / "metrics.json").read_text())
    doc["fter"] = {"value": 0.9}
    (run.dir / "metrics.json").write_text(json.dumps(doc))
    assert run_cli("score", run.dir, "--metrics", "adherence", "--classifier", clf, "--bootstrap", "0")[0] == 0
    assert json.loads((run.dir / "metrics.json").read_text())["fter"] == {"value": 0.9}


def test_retrieval_run_scores_adherence_and_memorisation_in_the_classifier_embedding(tiny, run_cli):
    """The retrieval family's images with adherence, and memorisation measured in this classifier's embedding (the
    API harness/memorisation.py calls: load_classifier(...).embed / .image_size)."""
    data, split, clf = tiny
    run = retrieval_run(data, split, "train", "ret", size=32)
    code, out, err = run_cli("score", run.dir, "--metrics", "adherence,memorisation", "--classifier", clf,
                             "--memorisation-space", "classifier", "--bootstrap", "20", "--device", "cpu")
    assert code == 0, err
    m = json.loads((run.dir / "metrics.json").read_text())["metrics"]
    assert m["adherence"]["status"] == "ok" and m["adherence"]["n_gen"] == 40
    assert m["memorisation"]["status"] == "ok" and m["memorisation"]["space"] == "classifier"
