"""`harness score`: parity with torch_fidelity.calculate_metrics, cache behaviour, weights handling, real sets.

No pretrained weights exist offline, so the extractors are randomly initialised and saved to files; the first test
proves those features are informative enough for the parity checks to mean something.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import UserError
from harness.features import (
    WEIGHTS,
    TorchFidelityExtractor,
    WeightsSpec,
    load_cached,
    resolve_weights,
    write_random_weights,
)
from harness.generate import TestPatternGenerator, generate_images
from harness.runs import create_run
from harness.score import ScoreConfig, resolve_real_set, score_run

INC, VGG = "inception-v3-compat", "vgg16"
N = 10  # the smallest N for IS over 10 splits; InceptionV3 + VGG16 on CPU cost ~0.3 s per image


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    return {INC: write_random_weights(INC, d / "inception.pth", seed=0),
            VGG: write_random_weights(VGG, d / "vgg16.pth", seed=1)}


def _cfg(weights, real, **kw) -> ScoreConfig:
    return ScoreConfig(real=str(real), inception_weights=weights[INC], vgg_weights=weights.get(VGG), device="cpu",
                       allow_unverified_weights=True, **kw)


@pytest.fixture(scope="module")
def scene(tmp_path_factory, weights):
    """A 10-image run, a 10-image real folder (half the prompts shared, other seeds), both scored."""
    root = tmp_path_factory.mktemp("scene")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_CACHE_DIR", str(root / "cache"))
        run = create_run("test-pattern", {"size": 64}, root=root / "runs")
        generate_images(TestPatternGenerator(64), [f"polyp variant {i % 4}" for i in range(N)], run.images_dir)
        real = root / "real"
        prompts = [f"polyp variant {i % 4}" if i % 2 else f"mucosa {i % 3}" for i in range(N)]
        generate_images(TestPatternGenerator(64), prompts, real, base_seed=7)
        cfg = _cfg(weights, real, metrics=["fid", "is", "prc", "kid"], kid_subset_size=N)
        result = score_run(run, cfg)
        same = json.loads(json.dumps(score_run(run, _cfg(weights, run.images_dir, metrics=["fid", "prc"])).data))
        cache = {k: load_cached(v["key"]) for k, v in result.data["feature_cache"].items()}
    return {"run": run, "real": real, "result": result, "same": same, "cache": cache}


def test_random_extractors_give_informative_features(scene):
    for name, layer in ((f"{INC}/gen", "2048"), (f"{INC}/gen", "logits_unbiased"), (f"{VGG}/gen", "fc2_relu")):
        f = scene["cache"][name]["features"][layer]
        assert f.shape[0] == N and torch.isfinite(f).all()
        spread = f.std(dim=0)
        assert (spread > 1e-6 * f.abs().mean()).float().mean() > 0.3, f"{name}/{layer}: features barely vary"
        d = torch.cdist(f.double(), f.double())
        assert (d[~torch.eye(N, dtype=torch.bool)] > 0).all(), f"{name}/{layer}: two images share features"
    fid_diff = scene["result"].metrics["fid"]["value"]
    fid_same = scene["same"]["metrics"]["fid"]["value"]
    assert fid_diff > 1.0
    assert abs(fid_same) < 1e-4 * fid_diff  # identical sets: FID ~ 0 (eigvals noise of a rank-12 covariance)
    assert scene["same"]["metrics"]["prc"]["precision"] == 1.0 and scene["same"]["metrics"]["prc"]["recall"] == 1.0


def test_parity_with_torch_fidelity_calculate_metrics(scene, weights):
    import torch_fidelity

    common = dict(input1=str(scene["run"].images_dir), input2=str(scene["real"]), cuda=False, verbose=False,
                  cache=False, save_cpu_ram=True)
    ref = torch_fidelity.calculate_metrics(**common, fid=True, isc=True, kid=True, kid_subset_size=N,
                                           feature_extractor_weights_path=str(weights[INC]))
    ref.update(torch_fidelity.calculate_metrics(**common, prc=True, feature_extractor_weights_path=str(weights[VGG])))
    m = scene["result"].metrics
    ours = {"frechet_inception_distance": m["fid"]["value"], "inception_score_mean": m["is"]["mean"],
            "inception_score_std": m["is"]["std"], "kernel_inception_distance_mean": m["kid"]["mean"],
            "precision": m["prc"]["precision"], "recall": m["prc"]["recall"], "f_score": m["prc"]["f1"]}
    for k, v in ours.items():
        assert v == pytest.approx(ref[k], rel=1e-6, abs=1e-12), k
    assert 0 < m["prc"]["precision"] < 1 or 0 < m["prc"]["recall"] < 1, "P/R saturated: the check is too weak"
    assert all(m[k]["n_gen"] == N for k in m) and m["fid"]["n_real"] == N


def test_metrics_json_records_provenance(scene, weights):
    d = scene["result"].data
    assert d["generated"]["n"] == N and d["real"]["n"] == N and d["real"]["kind"] == "dir"
    assert len(d["real"]["sha256"]) == 64 and d["generated"]["generation"]["base_seed"] == 0
    assert d["extractors"][INC]["weights"]["sha256"] == json.loads(json.dumps(d))["metrics"]["fid"]["weights_sha256"]
    assert d["extractors"][VGG]["layers"] == ["fc2_relu"]
    assert set(d["libraries"]) >= {"torch", "torch_fidelity", "numpy", "scipy"}
    assert d["unverified_weights"] is True and any("UNVERIFIED" in w for w in d["warnings"])
    assert any("< 2048" in w for w in d["warnings"])
    assert d["config"]["real"] == str(scene["real"]) and d["seed"]["rng_seed"] == 2020
    on_disk = json.loads((scene["run"].dir / "metrics.json").read_text())  # the last scoring (vs its own images)
    results = on_disk.pop("results")
    assert on_disk == scene["same"] and on_disk["real"]["sha256"] == on_disk["generated"]["sha256"]
    # each real set keeps its own result: scoring against the run's own images did not overwrite the first one
    assert set(results) == {"dir:real | match", "dir:images | match"}
    assert results["dir:real | match"]["metrics"]["fid"]["value"] == d["metrics"]["fid"]["value"]
    assert d["real"]["preprocess"]["mode"] == "match" and d["real"]["preprocess"]["size"] == 64
    assert d["generated"]["resolution"] == [64, 64] and len(d["generated"]["sample"]) == N


def test_cache_hit_skips_the_network_and_one_changed_image_invalidates(tmp_path, weights, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    run = create_run("test-pattern", {"size": 64})
    generate_images(TestPatternGenerator(64), [f"p{i}" for i in range(4)], run.images_dir)
    real = tmp_path / "real"
    generate_images(TestPatternGenerator(64), [f"q{i}" for i in range(4)], real, base_seed=3)
    cfg = _cfg({INC: weights[INC]}, real, metrics=["fid", "prc"], prc_features="inception")

    first = score_run(run, cfg).data
    assert [v["hit"] for v in first["feature_cache"].values()] == [False, False]  # one extractor serves both
    assert first["metrics"]["prc"]["layer"] == "2048" and "Inception features" in first["metrics"]["prc"]["features"]

    def boom(*a, **k):
        raise AssertionError("extractor built although every feature set is cached")

    with monkeypatch.context() as mp:
        mp.setattr(TorchFidelityExtractor, "__init__", boom)
        second = score_run(run, cfg).data
    assert [v["hit"] for v in second["feature_cache"].values()] == [True, True]
    assert second["metrics"]["fid"]["value"] == first["metrics"]["fid"]["value"]
    assert first["metrics"]["fid"]["reused"] is False and second["metrics"]["fid"]["reused"] is True
    recomputed = score_run(run, ScoreConfig(**{**cfg.__dict__, "reuse_metric_values": False})).data
    assert recomputed["metrics"]["fid"]["reused"] is False
    assert recomputed["metrics"]["fid"]["value"] == first["metrics"]["fid"]["value"]

    # Same name, same size, new pixels: the content hash changes, only the generated side is recomputed.
    from PIL import Image

    img = run.images_dir / "00003.png"
    arr = np.asarray(Image.open(img).convert("RGB")).copy()
    arr[:8] = 255 - arr[:8]
    Image.fromarray(arr).save(img)
    third = score_run(run, cfg).data
    assert third["feature_cache"][f"{INC}/gen"]["hit"] is False
    assert third["feature_cache"][f"{INC}/real"]["hit"] is True
    assert third["generated"]["sha256"] != first["generated"]["sha256"]
    assert third["metrics"]["fid"]["value"] != first["metrics"]["fid"]["value"]

    # --no-cache recomputes and does not touch the cache
    fourth = score_run(run, ScoreConfig(**{**cfg.__dict__, "use_cache": False})).data
    assert not any(v["hit"] for v in fourth["feature_cache"].values())
    assert fourth["metrics"]["fid"]["value"] == pytest.approx(third["metrics"]["fid"]["value"], rel=1e-9)


def _tiny_run(n=4):
    run = create_run("test-pattern", {"size": 32})
    generate_images(TestPatternGenerator(32), [f"p{i}" for i in range(n)], run.images_dir)
    return run


def test_missing_weights_are_not_computed_with_a_clear_message(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    run = _tiny_run()
    code, out, err = run_cli("score", run.dir, "--real", run.images_dir)
    assert code == 0, err
    data = json.loads((run.dir / "metrics.json").read_text())
    for name in ("fid", "is", "prc", "imageclef2024"):
        m = data["metrics"][name]
        assert m["status"] == "not computed"
        assert not {"value", "mean", "precision", "fd"} & set(m), f"{name} carries a number"
    assert "weights-inception-2015-12-05-6726825d.pth" in data["metrics"]["fid"]["detail"]
    assert "hub/checkpoints" in data["metrics"]["fid"]["detail"] and "--inception-weights" in data["metrics"]["fid"]["detail"]
    assert "vgg16-397923af.pth" in data["metrics"]["prc"]["reason"]
    assert "weights-inception-2015-12-05-6726825d.pth" in err + out
    board = (tmp_path / "leaderboard.md").read_text()
    assert "no metric computed" in board and "| FID |" not in board


def test_weights_resolution_checks_sha256(tmp_path, weights, monkeypatch):
    with pytest.raises(UserError, match="is not the published weights-inception"):
        resolve_weights(INC, weights[INC])
    with pytest.raises(UserError, match="not found"):
        resolve_weights(INC, tmp_path / "nope.pth")
    ok = resolve_weights(INC, weights[INC], allow_unverified=True)
    assert ok.verified is False and ok.source == "explicit"

    # A file under $TORCH_HOME/hub/checkpoints whose sha256 has the prefix its name promises is verified.
    from harness.io import sha256_file

    blob = tmp_path / "blob.pth"
    blob.write_bytes(b"pretend weights")
    prefix = sha256_file(blob)[:8]
    spec = WeightsSpec(INC, f"weights-test-{prefix}.pth", "https://example.invalid/x.pth", "--inception-weights")
    monkeypatch.setitem(WEIGHTS, INC, spec)
    home = torch.hub.get_dir()
    dst = tmp_path / "torch-home" / "hub" / "checkpoints" / spec.filename
    assert str(dst).startswith(home)
    dst.parent.mkdir(parents=True)
    shutil.copy(blob, dst)
    got = resolve_weights(INC, None, allow_download=False)
    assert got.verified and got.source == "torch-home" and got.path == dst.resolve()
    dst.write_bytes(b"tampered")  # same name, other bytes
    with pytest.raises(UserError, match="is not the published"):
        resolve_weights(INC, None, allow_download=False)


def test_real_set_defaults_to_the_runs_validation_images(tmp_path, sample_dir):
    from harness.split import load_split, write_split

    split_path = tmp_path / "split.json"
    write_split(sample_dir, split_path, val_images=8, seed=0)
    split = load_split(split_path)
    run = create_run("test-pattern", {"size": 32, "split_path": str(split_path), "data_dir": str(sample_dir)},
                     data={"split_sha256": split.sha256})
    real = resolve_real_set(run, ScoreConfig())
    assert [p.name for p in real.images.paths] == sorted(split.val)
    assert real.kind == "val" and real.info["leaks_training_images"] is False and not set(split.train) & {
        p.name for p in real.images.paths}

    nested = create_run("test-pattern", {"data": {"side": "train", "split": "train", "data_dir": str(sample_dir),
                                                  "split_path": str(split_path)}})
    assert resolve_real_set(nested, ScoreConfig()).images.sha256 == real.images.sha256

    everything = resolve_real_set(run, ScoreConfig(real="all"))
    assert len(everything.images) == 48 and "leaks training images" in everything.label

    other = tmp_path / "other.json"
    write_split(sample_dir, other, val_images=8, seed=1)
    with pytest.raises(UserError, match="trained with another split"):
        resolve_real_set(run, ScoreConfig(split=other))

    bare = create_run("test-pattern", {"size": 32})
    with pytest.raises(UserError, match="--data"):
        resolve_real_set(bare, ScoreConfig())
    with pytest.raises(UserError, match="--split"):
        resolve_real_set(bare, ScoreConfig(data=sample_dir))


def test_bad_inputs_are_user_errors(tmp_path, run_cli):
    run = create_run("test-pattern", {"size": 32})
    code, _, err = run_cli("score", run.dir, "--real", tmp_path)
    assert code == 2 and "harness generate" in err  # no images yet
    run = _tiny_run()
    (run.images_dir / "00002.png").unlink()
    code, _, err = run_cli("score", run.dir, "--real", run.images_dir, "--no-leaderboard")
    assert code == 2 and "00002.png" in err
    code, _, err = run_cli("score", _tiny_run().dir, "--metrics", "fid,bogus", "--no-leaderboard")
    assert code == 2 and "bogus" in err
    code, _, err = run_cli("score", _tiny_run().dir, "--real", tmp_path / "missing", "--no-leaderboard")
    assert code == 2 and "--real" in err


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_output_files_fail_before_any_work(tmp_path, run_cli, monkeypatch, where):
    """score --out / --leaderboard, compare --out, leaderboard --out: one line naming the path, before features
    are extracted (these used to fail after the work with 'regfile: File exists' or a temp file's name)."""
    import harness.score as S

    def no_work(*a, **k):
        raise AssertionError("scored despite an unwritable output path")

    monkeypatch.setattr(S, "score_run", no_work)
    monkeypatch.setattr(S, "score_folder", no_work)
    (tmp_path / "a-file").write_text("x")
    bad = tmp_path / "a-file" / "out.json" if where == "under-a-file" else Path("/proc/harness-no/out.json")
    run = _tiny_run()
    for args in (["score", run.dir, "--out", bad], ["score", run.dir, "--leaderboard", bad],
                 ["score", run.images_dir, "--out", bad], ["compare", run.dir, run.dir, "--out", bad],
                 ["leaderboard", "--out", bad]):
        code, _, err = run_cli(*args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and str(bad) in lines[0] and "tmp-" not in lines[0], (args, err)


def test_help_has_examples(run_cli):
    for cmd in ("score", "leaderboard", "compare", "cache info", "cache prune"):
        code, out, _ = run_cli(*cmd.split(), "--help")
        assert code == 0 and "Examples" in out and f"harness {cmd}" in out
