"""The 2025 task-2 metrics against a straightforward NumPy re-computation on fixed features (intended and quirk),
and the BiomedCLIP CLS extractor on a tiny CLIP vision tower saved with save_pretrained."""

from __future__ import annotations

import numpy as np
import pytest

from harness.challenges.metrics_2025 import INTENDED, QUIRKS, metrics_2025


def _fd(a, b):
    # tr(sqrtm(S1 S2)) = sum of the square roots of the eigenvalues of S1 S2 (real, >= 0 for PSD S1, S2).
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2)
    return float(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())


def _reference(gen, real, quirk):
    n = len(gen)
    loop = range(0, n // 2, 2) if quirk else range(0, n, 2)  # the public script's loop vs every pair
    agree, div, fid, per_prompt, all_gen, all_real = [], [], [], [], [], []
    for i in loop:
        a, b, ref = gen[i], gen[i + 1], real[i // 2]
        sims = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x in a for y in b]
        agree.append(np.mean(sims))
        for feats in (a, b):
            u = [f / np.linalg.norm(f) for f in feats]
            div.append(np.mean([np.linalg.norm(u[j] - u[k]) for j in range(len(u)) for k in range(j + 1, len(u))]))
        fid.append((_fd(a, ref) + _fd(b, ref)) / 2)  # the pair's FID: mean of its two prompts'
        per_prompt += [_fd(a, ref), _fd(b, ref)]
        all_gen += [*a, *b]
        all_real += [*ref]
    fbd = _fd(np.array(all_gen), np.array(all_real))
    return {"fidelity": np.mean([1000 / (1 + f) for f in fid]),
            "fidelity_per_prompt": np.mean([1000 / (1 + f) for f in per_prompt]), "agreement": np.mean(agree),
            "diversity": np.mean(div), "FBD": fbd}


@pytest.mark.parametrize("quirk", [False, True])
def test_metrics_match_a_numpy_recomputation(quirk):
    rng = np.random.default_rng(0)
    d, k, n_prompts = 6, 10, 8  # 4 pairs: the quirk scores 2 of them
    gen = [rng.normal(p * 0.1, 1, size=(k, d)) for p in range(n_prompts)]
    real = [rng.normal(0, 1, size=(12, d)) for _ in range(n_prompts // 2)]  # one real set per pair
    got = metrics_2025(gen, real, organiser_quirks=quirk).to_dict()
    want = _reference(gen, real, quirk)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert got["variant"] == (QUIRKS if quirk else INTENDED)
    assert got["pairs_scored"] == (2 if quirk else 4) and got["pairs_total"] == 4


def test_quirk_changes_the_numbers_and_odd_counts_are_refused():
    rng = np.random.default_rng(1)
    gen = [rng.normal(p, 1, size=(5, 4)) for p in range(4)]
    real = [rng.normal(0, 1, size=(8, 4)) for _ in range(2)]
    a, b = metrics_2025(gen, real), metrics_2025(gen, real, organiser_quirks=True)
    assert a.agreement != b.agreement and a.fbd != b.fbd and (a.pairs_scored, b.pairs_scored) == (2, 1)
    from harness.errors import UserError

    with pytest.raises(UserError, match="even"):
        metrics_2025(gen[:3], real[:1])


def test_biomedclip_cls_features_from_a_saved_tiny_tower(tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from harness.challenges.metrics_2025 import BiomedCLIPFeatures, BiomedCLIPMissing

    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16)
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "tower")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "tower")
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    feats = BiomedCLIPFeatures(tmp_path / "tower")(paths, batch_size=2)
    assert feats.shape == (3, 16) and np.isfinite(feats).all()
    with pytest.raises(BiomedCLIPMissing, match="BiomedCLIP vision tower not loadable"):
        BiomedCLIPFeatures(tmp_path / "nothing-here")


def _tiny_tower(path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16)
    CLIPVisionModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_score_challenge_2025_end_to_end(tmp_path, run_cli):
    import json

    from PIL import Image

    from harness.runs import create_run

    pairs = {"g": {"a": ["one polyp", "a single polyp"], "b": ["no polyp", "without polyps"]}}
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(pairs), encoding="utf-8")
    flat = [c for qa in pairs.values() for pair in qa.values() for c in pair]
    real = tmp_path / "real"
    (real / "images").mkdir(parents=True)
    rows = ["Prompt;Filename"]
    for i, p in enumerate(flat):
        for j in range(3):
            name = f"r{i}{j}.jpg"
            Image.fromarray(np.random.default_rng(10 * i + j).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
                real / "images" / name)
            rows.append(f"{p};{name}")
    (real / "prompt-gt.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    run = create_run("test-pattern", {"size": 16})
    assert run_cli("generate", run.dir, "--prompts", prompts, "--challenge", "imageclef2025-task2")[0] == 0
    tower = _tiny_tower(tmp_path / "tower")
    out = {}
    for quirk in (False, True):
        args = ["score", run.dir, "--challenge", "imageclef2025-task2", "--prompts", prompts, "--data", real,
                "--biomedclip", tower, "--device", "cpu", "--out", tmp_path / f"m{quirk}.json"]
        code, stdout, err = run_cli(*args, *(["--organiser-quirks"] if quirk else []))
        assert code == 0, err
        out[quirk] = json.loads((tmp_path / f"m{quirk}.json").read_text())
        assert ("organiser-quirks" in stdout) == quirk
    assert out[False]["pairs_scored"] == 2 and out[True]["pairs_scored"] == 1
    # The organisers' real_mapping (pair's first prompt number -> img ids = file stems of the real set).
    mapping = tmp_path / "real_mapping.json"
    mapping.write_text(json.dumps({"1": ["r00", "r01", "r10"], "3": ["r20", "r21", "r30", "r31"]}))
    code, stdout, err = run_cli("score", run.dir, "--challenge", "imageclef2025-task2", "--prompts", prompts,
                                "--data", real, "--biomedclip", tower, "--device", "cpu", "--real-mapping", mapping,
                                "--out", tmp_path / "mapped.json")
    assert code == 0, err
    mapped = json.loads((tmp_path / "mapped.json").read_text())
    assert mapped["real_mapping_sha256"] and mapped["fidelity"] != out[False]["fidelity"]
    mapping.write_text(json.dumps({"1": ["r00", "nope"], "3": ["r20", "r21"]}))
    code, stdout, err = run_cli("score", run.dir, "--challenge", "imageclef2025-task2", "--prompts", prompts,
                                "--data", real, "--biomedclip", tower, "--real-mapping", mapping)
    assert code == 2 and "nope" in err and "real_mapping.json" in err
    assert all(np.isfinite(out[False][k]) for k in ("fidelity", "agreement", "diversity", "FBD"))
    # Offline without the weights: recorded as not computed, naming what is missing, never a number.
    code, stdout, err = run_cli("score", run.dir, "--challenge", "imageclef2025-task2", "--prompts", prompts,
                                "--data", real, "--device", "cpu", "--out", tmp_path / "none.json")
    assert code == 0 and "not computed" in stdout and "BiomedCLIP_ViT_patch16_224" in stdout
    assert json.loads((tmp_path / "none.json").read_text())["fidelity"] is None
