"""`harness data fetch`: a small dataset written with `datasets` itself (save_to_disk and parquet) converted to
prompt-gt.csv + images/, which `harness data check` then accepts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _dataset():
    import datasets

    imgs = [_jpeg(i) for i in range(3)]
    rows = {"img_id": ["a1", "a1", "b2", "c3"],
            "question": ["Is there a polyp?", "How many polyps?", "Is there a polyp?", "Any instrument?"],
            "answer": ["yes", "one", "no", "biopsy forceps"],
            "image": [{"bytes": imgs[0], "path": None}, {"bytes": imgs[0], "path": None},
                      {"bytes": imgs[1], "path": None}, {"bytes": imgs[2], "path": None}]}
    feats = datasets.Features({"img_id": datasets.Value("string"), "question": datasets.Value("string"),
                               "answer": datasets.Value("string"), "image": datasets.Image()})
    return datasets.Dataset.from_dict(rows, features=feats), imgs


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_fetch_converts_a_local_dataset(tmp_path, run_cli, kind):
    ds, imgs = _dataset()
    if kind == "save_to_disk":
        src = tmp_path / "saved"
        ds.save_to_disk(str(src))
    else:
        src = tmp_path / "kvasir.parquet"
        ds.to_parquet(str(src))
    out = tmp_path / "dev"
    code, stdout, err = run_cli("data", "fetch", src, "--out", out)
    assert code == 0, err
    lines = (out / "prompt-gt.csv").read_bytes().decode().split("\r\n")
    assert lines[:5] == ["Prompt;Filename", "Is there a polyp? yes;a1.jpg", "How many polyps? one;a1.jpg",
                         "Is there a polyp? no;b2.jpg", "Any instrument? biopsy forceps;c3.jpg"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a1.jpg", "b2.jpg", "c3.jpg"]
    assert (out / "images" / "b2.jpg").read_bytes() == imgs[1]  # verbatim bytes, no re-encoding
    code, stdout, err = run_cli("data", "check", out)
    assert code == 0, stdout + err


def test_fetch_offline_and_bad_template_are_one_line(tmp_path, run_cli):
    code, stdout, err = run_cli("data", "fetch", "imageclef2025-task2", "--out", tmp_path / "k")
    assert code == 2 and "SimulaMet-HOST/Kvasir-VQA" in err and "huggingface-cli download" in err
    assert not (tmp_path / "k").exists()
    ds, _ = _dataset()
    ds.save_to_disk(str(tmp_path / "saved"))
    code, stdout, err = run_cli("data", "fetch", tmp_path / "saved", "--out", tmp_path / "k",
                                "--prompt-template", "{caption}")
    assert code == 2 and "'caption'" in err and "columns: img_id" in err
    assert not (tmp_path / "k").exists()


def test_fetch_test_material_offline_names_what_to_download(tmp_path, run_cli):
    code, stdout, err = run_cli("data", "fetch", "imageclef2025-task2", "--test", "--out", tmp_path / "t")
    assert code == 2 and "SimulaMet/Kvasir-VQA-test/imagen-test" in err and "prompts.json" in err
    code, stdout, err = run_cli("data", "fetch", "imageclef2024-task1", "--test", "--out", tmp_path / "t")
    assert code == 2 and "names no hub test repository" in err
