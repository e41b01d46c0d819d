"""Slow acceptance on dev-256 (2,000 images, the 1,800 / 200 split): the classifier trained from scratch at 128 px
on CPU separates the frequent labels, and prompt adherence puts the retrieval baseline (training images whose
captions ask for the prompt's attributes) clearly above the test pattern. Budget: 150 steps of 32 (2.7 epochs at
128 px); measured 6 min for the file on this 2-core machine (classifier 4.4 min incl. decoding, 1 thread, load ~4):
macro AUROC 0.887, frequent labels 0.928; adherence retrieval 0.760 [0.713, 0.799] vs test pattern 0.508
[0.421, 0.583]."""

from __future__ import annotations

import json
import time

import pytest

from attributes_fixtures import pattern_run, retrieval_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dev_classifier(tmp_path_factory):
    from conftest import SHARED_DEV

    from harness.attributes import attribute_config, fit, real_side
    from harness.split import write_split

    if not (SHARED_DEV / "prompt-gt.csv").is_file():
        pytest.skip("../shared/data/imageclef2024/dev-256 not present")
    root = tmp_path_factory.mktemp("dev-clf")
    split = root / "split.json"
    write_split(SHARED_DEV, split)
    cfg = attribute_config(SHARED_DEV, split, {"weights": "none", "image_size": 128,
                                               "loop": {"max_steps": 150, "batch_size": 32, "val_every": 50,
                                                        "checkpoint_every": 0}})
    t0 = time.perf_counter()
    train, hashes = real_side(SHARED_DEV, split, "train")
    val, _ = real_side(SHARED_DEV, split, "val")
    run = fit(cfg, train, val, hashes, root=root / "runs", run_id="clf")
    seconds = time.perf_counter() - t0
    return SHARED_DEV, split, run.dir, seconds


def test_from_scratch_classifier_separates_the_frequent_labels(dev_classifier):
    _, _, run_dir, seconds = dev_classifier
    m = json.loads((run_dir / "classifier_metrics.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["resolved_weights"].startswith("none (from scratch")
    print(f"trained in {seconds:.0f}s; macro AUROC {m['macro_auroc']:.3f}, frequent ({len(m['frequent_labels'])} "
          f"labels) {m['frequent_macro_auroc']:.3f}, F1 {m['frequent_macro_f1']:.3f}")
    for lab in m["frequent_labels"]:
        print(f"  {lab}: AUROC {m['labels'][lab]['auroc']:.3f}")
    assert len(m["frequent_labels"]) >= 10
    assert m["frequent_macro_auroc"] > 0.65
    assert m["prediction_spread"] > 0.01


def test_adherence_of_the_retrieval_baseline_is_clearly_above_the_test_pattern(dev_classifier, tmp_path, run_cli):
    data, split, clf, _ = dev_classifier
    copy = retrieval_run(data, split, "train", "copy", size=128)
    tp = pattern_run(data, split, "train", "tp", size=128)
    values = {}
    for run in (copy, tp):
        code, out, err = run_cli("score", run.dir, "--metrics", "adherence", "--classifier", clf, "--device", "cpu",
                                 "--no-leaderboard")
        assert code == 0, err
        values[run.id] = json.loads((run.dir / "metrics.json").read_text())["metrics"]["adherence"]
    c, t = values["copy"], values["tp"]
    print(f"adherence: copy {c['value']:.3f} {c['interval']}, all asked {c['all_asked']:.3f}; test pattern "
          f"{t['value']:.3f} {t['interval']}, all asked {t['all_asked']:.3f}")
    assert c["value"] > t["value"] + 0.1
    assert c["interval"]["low"] > t["interval"]["high"]
    assert c["all_asked"] > t["all_asked"]
