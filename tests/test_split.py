"""Split by image: no leakage, stratified, deterministic to the byte, load_split validation."""

from __future__ import annotations

import json

import pytest
from bad_data import good_devset, rows_of, write_csv

from harness.data import load_devset
from harness.errors import UserError
from harness.io import write_json
from harness.split import _quotas, check_split_matches, load_split, make_split, write_split


def _assert_valid(d, devset):
    train, val = set(d["train"]), set(d["val"])
    assert not train & val
    assert train | val == set(devset.images())
    assert d["train"] == sorted(d["train"]) and d["val"] == sorted(d["val"])
    side = {i: "train" for i in train} | {i: "val" for i in val}
    rows = {"train": 0, "val": 0}
    for r in devset.rows:  # every row follows its image
        rows[side[r.filename]] += 1
    assert d["counts"]["train"] == {"images": len(train), "rows": rows["train"]}
    assert d["counts"]["val"] == {"images": len(val), "rows": rows["val"]}
    for name, c in d["strata"].items():
        if c["train"] + c["val"] >= 2:
            assert c["train"] >= 1 and c["val"] >= 1, name


def test_sample_split_cli_is_valid_and_byte_identical(sample_dir, tmp_path, run_cli):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (a, b):
        rc, stdout, err = run_cli("split", sample_dir, "--val-images", "8", "--seed", "3", "--out", out)
        assert rc == 0, err
    assert a.read_bytes() == b.read_bytes()
    d = json.loads(a.read_text())
    assert d["seed"] == 3 and d["counts"]["val"]["images"] == 8
    assert d["csv_sha256"] == load_devset(sample_dir).csv_sha256
    _assert_valid(d, load_devset(sample_dir))
    assert "sha256" in stdout and "colonoscopy/polyp" in stdout
    s = load_split(a)
    assert (s.train, s.val, s.seed) == (d["train"], d["val"], 3) and len(s.sha256) == 64


def test_seed_changes_the_split_but_not_the_counts(sample_dir):
    a, b = make_split(sample_dir, 8, seed=0), make_split(sample_dir, 8, seed=1)
    assert a["val"] != b["val"] and a["strata"] == b["strata"]
    assert a["counts"]["val"]["images"] == b["counts"]["val"]["images"] == 8  # rows differ: 7-14 per image


def test_too_many_val_images_is_user_error(sample_dir, tmp_path, run_cli):
    rc, _, err = run_cli("split", sample_dir, "--out", tmp_path / "s.json")  # default 200 > 48 images
    assert rc == 2 and "more than possible" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.json").exists()
    with pytest.raises(UserError, match=">= 1"):
        make_split(sample_dir, 0)


def test_quotas_keep_every_stratum_on_both_sides():
    q = _quotas({"big": 1000, "mid": 50, "pair": 2, "single": 1}, 100)
    assert sum(q.values()) == 100 and q["pair"] == 1 and q["single"] == 0 and q["mid"] >= 1
    q = _quotas({"a": 100, "b": 2, "c": 2, "d": 1}, 10)
    assert q == {"a": 8, "b": 1, "c": 1, "d": 0}  # the big stratum gives up its share first
    q = _quotas({"a": 100, "b": 2, "c": 2}, 2)  # budget below the number of strata: still exact
    assert sum(q.values()) == 2


def _write_split(tmp_path, **over):
    d = {"format": "harness-split/1", "seed": 0, "csv_sha256": "0" * 64, "train": ["a.jpg", "b.jpg"],
         "val": ["c.jpg"]} | over
    p = tmp_path / "split.json"
    write_json(p, d)
    return p


@pytest.mark.parametrize("over,match", [
    ({"val": ["a.jpg"]}, r"'a.jpg' is on both sides"),
    ({"train": ["a.jpg", "a.jpg"]}, "listed twice"),
    ({"train": "a.jpg"}, "must be a list"),
    ({"train": []}, "'train' is empty"),
    ({"format": "other/9"}, "unknown split format"),
    ({"seed": "zero"}, "'seed' must be an integer"),
])
def test_load_split_rejects_malformed(tmp_path, over, match):
    p = _write_split(tmp_path, **over)
    with pytest.raises(UserError, match=match) as e:
        load_split(p)
    assert str(p) in str(e.value)


def test_load_split_missing_keys_and_not_json(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('{"train": []}')
    with pytest.raises(UserError, match="missing key"):
        load_split(p)
    p.write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        load_split(p)


def test_split_must_match_the_csv(sample_dir, tmp_path):
    out = tmp_path / "s.json"
    write_split(sample_dir, out, val_images=8)
    root = good_devset(tmp_path)
    write_csv(root, rows_of(root)[:-1])  # a different prompt-gt.csv
    with pytest.raises(UserError, match="different prompt-gt.csv"):
        check_split_matches(load_split(out), load_devset(root))
    check_split_matches(load_split(out), load_devset(sample_dir))


@pytest.mark.slow
def test_real_dev_split(dev_dir, tmp_path, run_cli):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (a, b):
        rc, _, err = run_cli("split", dev_dir, "--val-images", "200", "--seed", "0", "--out", out)
        assert rc == 0, err
    assert a.read_bytes() == b.read_bytes()
    d = json.loads(a.read_text())
    devset = load_devset(dev_dir)
    assert (d["counts"]["train"]["images"], d["counts"]["val"]["images"]) == (1800, 200)
    assert d["counts"]["train"]["rows"] + d["counts"]["val"]["rows"] == 20241
    _assert_valid(d, devset)
    s = load_split(a)
    check_split_matches(s, devset)
    # both procedures and the main finding types on both sides
    for name in ("colonoscopy/polyp", "colonoscopy/ulcerative-colitis", "gastroscopy/oesophagitis",
                 "colonoscopy/instrument"):
        assert d["strata"][name]["val"] >= 30 and d["strata"][name]["train"] >= 300
