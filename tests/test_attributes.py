"""The attribute classifier: caption labels, `harness train attributes` on the shipped sample (plumbing), weights
resolution without downloads, `load_classifier` and its errors. The dev-256 training is in test_attributes_slow.py."""

from __future__ import annotations

import json

import pytest
import torch

from harness.attributes import (choose_labels, label_vector, labels_for_caption, labels_for_captions,
                                load_classifier)
from harness.errors import UserError

TINY = ["--image-size", "32", "--min-count", "3", "--max-steps", "4", "--batch-size", "8", "--weights", "none",
        "--checkpoint-every", "0", "--val-every", "0", "--seed", "3"]


@pytest.fixture
def split8(tmp_path, sample_dir):
    from harness.split import write_split

    path = tmp_path / "split.json"
    write_split(sample_dir, path, val_images=8, seed=0)
    return path


def test_labels_for_caption_flatten_the_extracted_attributes():
    labs = labels_for_caption("Generate an image with 2 polyps located in the upper-left and lower-right.")
    assert {"count=2", "finding=polyp", "location=upper-left", "location=lower-right"} <= labs
    assert labels_for_caption("Generate an image from a gastroscopy procedure.") == {"procedure=gastroscopy"}
    # a negation is not a label; an image's labels are the union of its captions'
    assert "finding=polyp" not in labels_for_caption("Generate an image with no polyps.")
    union = labels_for_captions(["Generate an image containing a polyp.", "Generate an image containing text."])
    assert union == {"finding=polyp", "finding=text"}
    assert label_vector("Generate an image containing text.", ["finding=polyp", "finding=text"]).tolist() == [0, 1]


def test_choose_labels_keeps_labels_with_enough_positives_and_negatives():
    sets = [{"a", "b"}] * 5 + [{"a"}] * 5 + [{"a", "c"}]
    labels, freq = choose_labels(sets, 2)
    assert labels == ["b"]  # "a" is on every image (no negatives), "c" on one
    assert freq == {"a": 11, "b": 5, "c": 1}


def test_train_attributes_on_the_sample_records_everything_and_loads_back(tmp_path, sample_dir, split8, run_cli):
    code, out, err = run_cli("train", "attributes", "--split", split8, "--data", sample_dir, *TINY,
                             "--run-id", "clf")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "clf"
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["family"] == "attributes" and cfg["loop"]["seed"] == 3
    assert cfg["resolved_weights"].startswith("none (from scratch")
    assert cfg["labels"] and set(cfg["label_frequencies"]) == set(cfg["labels"])
    assert min(cfg["label_frequencies"].values()) >= 3
    assert json.loads((run_dir / "data.json").read_text())["csv_sha256"]
    metrics = json.loads((run_dir / "classifier_metrics.json").read_text())
    assert metrics["n_images"] == 8 and set(metrics["labels"]) == set(cfg["labels"])
    assert any(r["auroc"] is not None for r in metrics["labels"].values())
    # the label table and the backbone provenance are printed
    assert "AUROC" in out and "finding=text" in out and "from scratch" in out

    clf = load_classifier(run_dir)
    assert clf.labels == cfg["labels"] and clf.image_size == 32
    from harness.attributes import real_side

    val, _ = real_side(sample_dir, split8, "val")
    images = clf.load(val.paths)
    p = clf.predict_proba(images)
    assert p.shape == (8, len(clf.labels)) and 0 <= float(p.min()) and float(p.max()) <= 1
    assert float(p.std(0).max()) > 0  # outputs vary across images (a degenerate model would not)
    assert clf.embed(images).shape == (8, 512)
    # other sizes are resized to the classifier's
    big = torch.nn.functional.interpolate(images.float(), size=(48, 48)).to(torch.uint8)
    assert clf.predict_proba(big).shape == p.shape
    # `harness push` knows this run kind (train attributes has --push-to-hub like every train command)
    code, out, err = run_cli("push", run_dir, "--repo", "me/clf", "--dry-run", "--out", tmp_path / "st")
    assert code == 0, err
    card = (tmp_path / "st" / "README.md").read_text()
    assert "attribute classifier (resnet18; none (from scratch" in card and "AttributeClassifier.from_pretrained" in card
    assert (tmp_path / "st" / "classifier" / "model.safetensors").is_file()


def test_weights_auto_takes_the_hub_cache_file_and_imagenet_without_it_is_an_error(tmp_path, sample_dir, split8,
                                                                                  monkeypatch, run_cli):
    import torchvision

    from harness.attributes import attribute_config, build_model, hub_weights_path

    cfg = attribute_config(sample_dir, split8, {"min_count": 3})
    path = hub_weights_path("resnet18")
    assert not path.exists()  # TORCH_HOME is the test's own
    model, note = build_model(cfg, ["a", "b"])
    assert note.startswith("none (from scratch: no ImageNet weights at")
    code, _, err = run_cli("train", "attributes", "--split", split8, "--data", sample_dir, "--weights", "imagenet")
    assert code == 2 and str(path) in err and len(err.strip().splitlines()) == 1
    path.parent.mkdir(parents=True)
    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(reference, path)
    model, note = build_model(cfg, ["a", "b"])
    assert note == f"imagenet ({path})"
    assert torch.equal(model.encoder.conv1.weight, reference["conv1.weight"])


def test_load_classifier_refuses_what_is_not_a_trained_classifier(tmp_path):
    from harness.attributes import FAMILY
    from harness.runs import create_run

    with pytest.raises(UserError, match="not a folder") as e:
        load_classifier(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        load_classifier(tmp_path / "plain")
    other = create_run("test-pattern", {"size": 8}, run_id="tp")
    with pytest.raises(UserError, match="'test-pattern' run"):
        load_classifier(other.dir)
    unfinished = create_run(FAMILY, {}, run_id="unfinished")
    with pytest.raises(UserError, match="final/classifier missing"):
        load_classifier(unfinished.dir)


def test_print_config_lists_the_label_set_without_training(tmp_path, sample_dir, split8, run_cli):
    code, out, err = run_cli("train", "attributes", "--split", split8, "--data", sample_dir, "--min-count", "3",
                             "--print-config")
    assert code == 0, err
    d = json.loads(out)
    assert d["label_frequencies"]["finding=text"] >= 3 and d["loop"]["max_steps"] == 600
    assert not (tmp_path / "runs").exists()


def test_resume_extends_a_finished_run_to_more_steps(tmp_path, sample_dir, split8, run_cli):
    args = ["train", "attributes", "--split", split8, "--data", sample_dir]
    tiny = [a if a != "4" else "2" for a in TINY]  # 2 steps
    assert run_cli(*args, *tiny, "--run-id", "r")[0] == 0
    run_dir = tmp_path / "runs" / "r"
    code, out, err = run_cli(*args, "--resume", run_dir, "--max-steps", "4")
    assert code == 0, err
    assert json.loads((run_dir / "train_stats.json").read_text())["steps"] == 4
    assert json.loads((run_dir / "config.json").read_text())["loop"]["max_steps"] == 4
    assert load_classifier(run_dir).labels == json.loads((run_dir / "config.json").read_text())["labels"]
