"""Scoring protocol (issue 12): real preprocessing, any folder, per-real-set results merged per metric, prompt
source split:val with the prompt-mismatch warning, per-stratum KID, bootstrap intervals, run-vs-run comparison, the
per-image feature cache and the fd-dinov2 / fd-clip extractors.

Extractors are randomly initialised (no weights offline): every test that reads numbers first checks that the
features vary and that different image sets score differently from identical ones.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from harness.features import load_cached, write_random_weights
from harness.generate import TestPatternGenerator, generate_images
from harness.runs import create_run
from harness.score import ScoreConfig, score_run

INC = "inception-v3-compat"


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return write_random_weights(INC, tmp_path_factory.mktemp("w") / "inception.pth", seed=0)


@pytest.fixture
def split8(tmp_path, sample_dir):
    from harness.split import load_split, write_split

    path = tmp_path / "split.json"
    write_split(sample_dir, path, val_images=8, seed=0)
    return path, load_split(path)


def _features(data, name):
    return load_cached(data["feature_cache"][name]["key"])["features"]["2048"]


def _assert_informative(f: torch.Tensor):
    assert torch.isfinite(f).all()
    assert (f.std(dim=0) > 1e-6 * f.abs().mean()).float().mean() > 0.3, "features barely vary"
    d = torch.cdist(f.double(), f.double())
    assert (d[~torch.eye(len(f), dtype=torch.bool)] > 0).all(), "two images share features"


def test_real_preprocess_match_gives_fid_zero_for_the_training_transform(tmp_path, sample_dir, split8, inception,
                                                                         run_cli, monkeypatch):
    """Validation images passed through the training transform score FID ~ 0 against --real val under `match`
    (both sides reach the network alike) and clearly > 0 under `native` (real at native size, squashed in-network)."""
    from harness.dataset import training_view

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    split_path, split = split8
    folder = tmp_path / "transformed"
    folder.mkdir()
    for name in sorted(split.val):
        training_view(sample_dir / "images" / name, 32, "pad").save(folder / (name.rsplit(".", 1)[0] + ".png"))
    common = ["--real", "val", "--split", split_path, "--data", sample_dir, "--metrics", "fid,kid", "--bootstrap",
              "20", "--inception-weights", inception, "--allow-unverified-weights", "--device", "cpu"]
    code, out, err = run_cli("score", folder, *common, "--out", tmp_path / "match.json")
    assert code == 0, err
    match = json.loads((tmp_path / "match.json").read_text())
    code, _, err = run_cli("score", folder, *common, "--real-preprocess", "native", "--out", tmp_path / "native.json")
    assert code == 0, err
    native = json.loads((tmp_path / "native.json").read_text())

    _assert_informative(_features(match, f"{INC}/gen"))
    _assert_informative(_features(native, f"{INC}/real"))
    assert torch.equal(_features(match, f"{INC}/gen"), _features(match, f"{INC}/real"))  # identical input pixels
    fid_match, fid_native = match["metrics"]["fid"]["value"], native["metrics"]["fid"]["value"]
    assert fid_native > 0 and abs(fid_match) < 1e-4 * fid_native, (fid_match, fid_native)
    assert match["real"]["preprocess"]["mode"] == "match" and match["real"]["preprocess"]["size"] == 32
    assert match["real"]["preprocess"]["fit"] == "pad" and native["real"]["preprocess"]["mode"] == "native"
    assert match["generated"]["resolution"] == [32, 32] and match["run_id"] is None
    # KID with 8 images: the subset size is lowered, and the table says so (not only the JSON)
    assert match["metrics"]["kid"]["subset_size"] == 8 and "LOWERED from 1000" in out
    assert any("KID subset size lowered from 1000 to 8" in w for w in match["warnings"])
    # bootstrap interval stored beside the value and printed
    iv = native["metrics"]["fid"]["interval"]
    assert iv["low"] <= fid_native <= iv["high"] and iv["n_boot"] == 20 and "[" in out
    # no manifest in the folder: prompts unknown, no mismatch claimed
    assert match["prompts"]["matches"] is None

    # center-crop is a third, different preprocessing; a folder of mixed sizes cannot be matched
    code, _, err = run_cli("score", folder, *common, "--real-preprocess", "center-crop", "--out", tmp_path / "c.json")
    assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["metrics"]["fid"]["value"] > 10 * abs(fid_match)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "zz-odd.png")
    code, _, err = run_cli("score", folder, *common, "--out", tmp_path / "x.json")
    assert code == 2 and "--real-preprocess native" in err


def _val_run(sample_dir, split_path, split, **cfg):
    return create_run("test-pattern", {"size": 32, "split_path": str(split_path), "data_dir": str(sample_dir), **cfg},
                      data={"split_sha256": split.sha256})


def test_split_val_prompts_strata_and_prompt_mismatch(tmp_path, sample_dir, split8, inception, run_cli,
                                                      monkeypatch):
    from harness.data import load_devset

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    split_path, split = split8
    run = _val_run(sample_dir, split_path, split)
    code, _, err = run_cli("generate", run.dir, "--prompts", "split:val", "--images-per-prompt", "2")
    assert code == 0, err
    from harness.generate import read_manifest

    prompts = [r["prompt"] for r in read_manifest(run.images_dir / "manifest.csv")]
    caps = load_devset(sample_dir).captions_by_image()
    val = sorted(split.val)
    assert len(prompts) == 16
    for i, name in enumerate(val):  # image 2i, 2i+1 = two different captions of validation image i
        assert prompts[2 * i] in caps[name] and prompts[2 * i + 1] in caps[name]
        assert prompts[2 * i] != prompts[2 * i + 1] or len(set(caps[name])) == 1
    code, _, err = run_cli("generate", run.dir, "--prompts", "split:test")  # test prompts come from a file
    assert code == 2 and "split:val" in err and "split:train" in err

    cfg = ScoreConfig(metrics=["kid"], inception_weights=inception, allow_unverified_weights=True, device="cpu",
                      bootstrap=0)
    data = score_run(run, cfg).data
    assert data["prompts"]["matches"] is True and data["prompts"]["real_images_covered"] == 8
    assert data["prompts"]["source"] == "split:val x2"
    assert not any("PROMPT MISMATCH" in w for w in data["warnings"])
    strata = data["metrics"]["kid"]["strata"]
    assert sum(s["n_gen"] for s in strata.values()) == 16 and sum(s["n_real"] for s in strata.values()) == 8
    assert all(s["n_gen"] == 2 * s["n_real"] for s in strata.values())  # each image in its source image's stratum
    assert all("/" in name for name in strata)
    ok = [s for s in strata.values() if s["status"] == "ok"]
    assert all(np.isfinite(s["mean"]) and s["subset_size"] == min(s["n_gen"], s["n_real"]) for s in ok)

    # Test-style prompts against val: the mismatch is stated in metrics.json and in the printed table.
    other = _val_run(sample_dir, split_path, split)
    lines = tmp_path / "test-prompts.txt"
    lines.write_text("".join(f"Generate an image with {i} polyps.\n" for i in range(10)))
    assert run_cli("generate", other.dir, "--prompts", lines)[0] == 0
    code, out, err = run_cli("score", other.dir, "--metrics", "kid", "--inception-weights", inception,
                             "--allow-unverified-weights", "--bootstrap", "0", "--device", "cpu")
    assert code == 0, err
    d = json.loads(other.metrics_path.read_text())
    assert d["prompts"]["matches"] is False and d["prompts"]["prompts_in_real_captions"] == 0
    assert any("PROMPT MISMATCH" in w for w in d["warnings"]) and "PROMPT MISMATCH" in out
    # the board of the runs root the run is in is rebuilt (beside that root, not in the working directory)
    assert other.dir.parent == tmp_path / "runs" and not (tmp_path / "elsewhere" / "leaderboard.md").exists()
    assert "updated " + str(tmp_path / "leaderboard.md") in out


def test_rescoring_merges_per_metric_and_keeps_real_sets_apart(tmp_path, inception, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    run = create_run("test-pattern", {"size": 32})
    generate_images(TestPatternGenerator(32), [f"p{i}" for i in range(6)], run.images_dir)
    real = tmp_path / "real"
    generate_images(TestPatternGenerator(32), [f"q{i}" for i in range(6)], real, base_seed=5)
    base = dict(real=str(real), allow_unverified_weights=True, device="cpu", bootstrap=10, prc_features="inception")
    first = score_run(run, ScoreConfig(metrics=["fid", "prc"], inception_weights=inception, **base)).data
    assert first["metrics"]["prc"]["status"] == "ok" and "intervals" in first["metrics"]["prc"]
    p, r = first["metrics"]["prc"]["precision"], first["metrics"]["prc"]["recall"]
    assert 0 < first["metrics"]["fid"]["value"] and first["metrics"]["prc"]["f1"] == pytest.approx(
        2 * p * r / max(1e-5, p + r))  # torch-fidelity's f_score

    # fewer metrics: prc survives, marked as kept
    second = score_run(run, ScoreConfig(metrics=["fid"], inception_weights=inception, **base)).data
    assert second["metrics"]["prc"]["precision"] == p
    assert second["metrics"]["prc"]["kept_from"] == first["scored"] and any("kept from" in w for w in second["warnings"])
    # missing weights: "not computed" does not replace the good results
    monkeypatch.setenv("HARNESS_OFFLINE", "1")
    third = score_run(run, ScoreConfig(metrics=["fid", "prc"], **base)).data
    assert third["metrics"]["prc"]["recall"] == r and third["metrics"]["fid"]["kept_from"]
    assert third["metrics"]["fid"]["value"] == first["metrics"]["fid"]["value"]
    # another real set is kept beside, not over, this one
    score_run(run, ScoreConfig(**{**base, "real": str(run.images_dir)}, metrics=["fid"], inception_weights=inception))
    on_disk = json.loads(run.metrics_path.read_text())
    assert set(on_disk["results"]) == {"dir:real | match", "dir:images | match"}
    assert on_disk["results"]["dir:real | match"]["metrics"]["prc"]["status"] == "ok"
    # new images: what was computed for the old ones is dropped, not kept
    generate_images(TestPatternGenerator(32), [f"p{i}" for i in range(6)], run.images_dir, base_seed=9,
                    overwrite=True)
    fourth = score_run(run, ScoreConfig(metrics=["fid"], inception_weights=inception, **base)).data
    assert "prc" not in fourth["metrics"] and fourth["metrics"]["fid"]["value"] != first["metrics"]["fid"]["value"]


def test_one_changed_image_costs_one_extraction(tmp_path, inception, monkeypatch, run_cli):
    from harness.features import TorchFidelityExtractor, uint8_chw

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    run = create_run("test-pattern", {"size": 32})
    generate_images(TestPatternGenerator(32), [f"p{i}" for i in range(5)], run.images_dir)
    cfg = ScoreConfig(real=str(run.images_dir), metrics=["fid"], inception_weights=inception,
                      allow_unverified_weights=True, device="cpu", bootstrap=0, real_preprocess="native")
    loads = []
    monkeypatch.setattr(TorchFidelityExtractor, "load", lambda self, p: (loads.append(p.name), uint8_chw(p))[1])
    score_run(run, cfg)
    assert len(loads) == 5  # gen and real are the same files: extracted once, the real side is a per-image hit
    arr = np.asarray(Image.open(run.images_dir / "00003.png")).copy()
    arr[:4] = 255 - arr[:4]
    Image.fromarray(arr).save(run.images_dir / "00003.png")
    loads.clear()
    data = score_run(run, cfg).data
    assert loads == ["00003.png"] and data["feature_cache"][f"{INC}/gen"]["extracted"] == 1
    # the cache key carries the library versions and device type
    blob = load_cached(data["feature_cache"][f"{INC}/gen"]["key"])
    assert {"torch", "torchvision", "pillow", "device_type"} <= set(blob["meta"])

    code, out, _ = run_cli("cache", "info")
    assert code == 0 and "images" in out and "sets" in out
    code, out, _ = run_cli("cache", "prune", "--older-than", "1")
    assert code == 0 and "removed 0 file(s)" in out
    code, out, _ = run_cli("cache", "prune")
    assert code == 0 and "removed 0 file(s)" not in out
    assert not list((tmp_path / "cache" / "features").rglob("*.pt"))


def test_compare_runs_paired_bootstrap(tmp_path, inception, monkeypatch, run_cli):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    real = tmp_path / "real"
    generate_images(TestPatternGenerator(32), [f"polyp {i % 3}" for i in range(8)], real, base_seed=1)
    a = create_run("test-pattern", {"size": 32}, run_id="run-a")
    generate_images(TestPatternGenerator(32), [f"polyp {i % 3}" for i in range(8)], a.images_dir, base_seed=2)
    twin = create_run("test-pattern", {"size": 32}, run_id="run-twin")
    shutil.copytree(a.images_dir, twin.images_dir, dirs_exist_ok=True)
    b = create_run("test-pattern", {"size": 32}, run_id="run-b")
    generate_images(TestPatternGenerator(32), [f"mucosa {i}" for i in range(8)], b.images_dir, base_seed=3)
    cfg = ScoreConfig(real=str(real), metrics=["fid", "kid"], inception_weights=inception,
                      allow_unverified_weights=True, device="cpu", bootstrap=0)
    for r in (a, twin, b):
        score_run(r, cfg)
    da = json.loads(a.metrics_path.read_text())
    _assert_informative(_features(da, f"{INC}/gen"))
    code, out, err = run_cli("compare", a.dir, twin.dir, b.dir, "--bootstrap", "50", "--out", tmp_path / "c.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    same = [r for r in rows if r["b_label"] == "run-twin"]
    assert {r["metric"] for r in same} == {"fid", "kid"}
    assert all(r["diff"] == 0 and r["indistinguishable"] and r["paired"] for r in same)
    other = [r for r in rows if r["b_label"] == "run-b"]
    assert all(r["diff"] != 0 and r["low"] <= r["diff"] <= r["high"] for r in other)
    assert "indistinguishable" in out and "run-b" in out

    # against other real features: refused with one line
    c = create_run("test-pattern", {"size": 32}, run_id="run-c")
    generate_images(TestPatternGenerator(32), [f"x{i}" for i in range(8)], c.images_dir)
    score_run(c, ScoreConfig(**{**cfg.__dict__, "real": str(b.images_dir)}))
    code, _, err = run_cli("compare", a.dir, c.dir)
    assert code == 2 and "same real features" in err
    code, _, err = run_cli("compare", a.dir, tmp_path)
    assert code == 2 and "not scored yet" in err


def test_fd_dinov2_and_clip_are_not_computed_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_OFFLINE", "1")
    run = create_run("test-pattern", {"size": 32})
    generate_images(TestPatternGenerator(32), [f"p{i}" for i in range(4)], run.images_dir)
    data = score_run(run, ScoreConfig(real=str(run.images_dir), metrics=["fd-dinov2", "fd-clip"],
                                      device="cpu")).data
    dino, clip = data["metrics"]["fd-dinov2"], data["metrics"]["fd-clip"]
    assert dino["status"] == clip["status"] == "not computed"
    assert "dinov2_vitl14_pretrain.pth" in dino["detail"] and "facebookresearch_dinov2_main" in dino["detail"]
    assert "clip-vit-l-14-b8cca3fd" in clip["detail"] and "--clip-weights" in clip["detail"]
    from harness.features import default_layer

    assert default_layer("dinov2-vit-l-14", "fid") == "dinov2" and default_layer("clip-vit-l-14", "fid") == "clip"


def test_imageclef2024_scores_the_manifest_images_not_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    clef = write_random_weights("imageclef2024", tmp_path / "clef.pth", seed=0)
    run = create_run("test-pattern", {"size": 16})
    generate_images(TestPatternGenerator(16), [f"p{i}" for i in range(10)], run.images_dir)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(run.images_dir / "00011.png")  # stray, not listed
    real = tmp_path / "real"
    generate_images(TestPatternGenerator(16), [f"q{i}" for i in range(4)], real, base_seed=1)
    cfg = ScoreConfig(real=str(real), metrics=["imageclef2024"], imageclef_weights=clef, device="cpu",
                      allow_unverified_weights=True, bootstrap=0)
    data = score_run(run, cfg).data
    m = data["metrics"]["imageclef2024"]
    assert m["status"] == "ok" and m["n_gen"] == 10 and data["generated"]["n"] == 10
    feats = load_cached(data["feature_cache"]["imageclef2024/gen"]["key"])["features"]["softmax"]
    assert len(feats) == 10 and (feats[0] - feats[1]).abs().max() > 0  # random weights still separate images
