"""`harness rate make` / `summarize` on tiny synthetic runs: sampling, blinding, statistics and bad input.
(The page in a real browser: tests/test_rate_browser.py, slow suite.)"""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.errors import UserError
from harness.rating.analysis import (
    binomial_p,
    bootstrap_mean,
    krippendorff_alpha,
    reader_study_markdown,
)
from harness.rating.study import REAL_SOURCE, MakeConfig, allocate, case_type, make_study, sample_source
from rate_fixtures import make_runs, ratings_csv


@pytest.fixture
def study(tmp_path, sample_dir, run_cli):
    runs, split = make_runs(tmp_path, sample_dir)
    out = tmp_path / "study"
    code, stdout, err = run_cli("rate", "make", *[r.dir for r in runs], "--per-source", "6", "--by", "finding",
                                "--turing", "--split", split, "--out", out)
    assert code == 0, err
    return runs, split, out, json.loads((out / "key.json").read_text())


def page_payload(page: Path) -> dict:
    m = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(m.group(1))


# ----------------------------------------------------------------------------------------------------- make


def test_make_samples_each_source_balanced_and_keeps_the_key_apart(study):
    runs, _, out, key = study
    assert sorted(key["per_source"]) == sorted([r.id for r in runs] + [REAL_SOURCE])
    for source, strata in key["per_source"].items():
        assert strata == {"abnormal": 3, "normal": 3}, source  # balanced over normal vs abnormal findings
    items = key["items"]
    assert len(items) == 18 and len({it["id"] for it in items}) == 18
    payload = page_payload(out / "index.html")
    assert [it["id"] for it in payload["items"]] == [it["id"] for it in items]
    assert payload["turing"] is True and payload["n"] == 18
    for it in items:  # the key points at the very file that was shown, by content
        from harness.io import sha256_file

        assert sha256_file(it["original"]) == it["original_sha256"]
        assert case_type(it["stratum"], None) == "all"
    real = [it for it in items if it["source"] == REAL_SOURCE]
    val = set(json.loads((out.parent / "split.json").read_text())["val"])
    assert all(Path(it["original"]).name in val for it in real)  # control = validation images only


def test_page_reveals_nothing_about_the_source(study):
    runs, _, out, key = study
    page = (out / "index.html").read_bytes()
    secrets = {r.id for r in runs} | {REAL_SOURCE, "test-pattern", "harness:", "model0", "model1", "real:", ".png",
                                      ".jpg"}
    secrets |= {Path(it["original"]).name for it in key["items"]} | {Path(it["original"]).stem for it in key["items"]}
    for s in secrets:
        assert s.encode() not in page, s
    # no external resources: nothing fetched from anywhere (fonts, scripts, images)
    assert not re.search(rb"https?://|<link|@import|url\(", page)
    payload = page_payload(out / "index.html")
    assert {tuple(sorted(it)) for it in payload["items"]} == {("id", "prompt", "src")}
    assert page.count(b"<img") == 1 and b'alt="Image to rate"' in page  # one generic alt text
    sizes = set()
    for it in payload["items"]:
        assert it["src"].startswith("data:image/jpeg;base64,")
        raw = base64.b64decode(it["src"].split(",", 1)[1])
        assert b"Exif" not in raw and b"tEXt" not in raw and b"iTXt" not in raw and b"ICC_PROFILE" not in raw
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert set(im.info) <= {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi"}
            sizes.add(im.size)
    # one size for all, whatever each source wrote (runs at 24 and 32 px, real images at 64 px): the smallest
    assert sizes == {(24, 24)}


def test_order_and_ids_do_not_follow_the_source(tmp_path, sample_dir):
    runs, split = make_runs(tmp_path, sample_dir, n_runs=2)
    firsts, contiguous = Counter(), 0
    for seed in range(8):
        made = make_study(MakeConfig(runs=[r.dir for r in runs], out=tmp_path / f"s{seed}", per_source=6,
                                     split=split, seed=seed))
        key = json.loads(made.key.read_text())
        order = [it["source"] for it in key["items"]]
        firsts[order[0]] += 1
        for s in set(order):
            pos = [k for k, o in enumerate(order) if o == s]
            contiguous += pos[-1] - pos[0] == len(pos) - 1
        # ids are drawn after the shuffle: sorting by id does not regroup sources either
        by_id = [it["source"] for it in sorted(key["items"], key=lambda it: it["id"])]
        assert by_id != sorted(by_id)
    assert len(firsts) >= 2  # the first image is not always from the same source
    assert contiguous <= 2  # 24 source blocks; a random order makes a block of 6 contiguous with p ~ 0.001


def test_make_is_deterministic_and_refuses_to_replace_another_study(tmp_path, sample_dir, run_cli):
    runs, split = make_runs(tmp_path, sample_dir)
    args = ["rate", "make", *[r.dir for r in runs], "--per-source", "4", "--split", split]
    assert run_cli(*args, "--out", tmp_path / "a")[0] == 0
    assert run_cli(*args, "--out", tmp_path / "b")[0] == 0
    assert (tmp_path / "a/index.html").read_bytes() == (tmp_path / "b/index.html").read_bytes()
    assert run_cli(*args, "--out", tmp_path / "a")[0] == 0  # the same study again: fine
    before = (tmp_path / "a/key.json").read_bytes()
    code, _, err = run_cli(*args, "--out", tmp_path / "a", "--seed", "1")
    assert code == 2 and "already holds another study" in err and "key.json" in err
    assert (tmp_path / "a/key.json").read_bytes() == before
    assert run_cli(*args, "--out", tmp_path / "a", "--seed", "1", "--overwrite")[0] == 0


@pytest.mark.parametrize("extra, message", [
    (["--per-source", "40"], "has only 16 images, fewer than --per-source 40"),
    (["--per-source", "4", "--turing", "--real", "none"], "--turing needs real images"),
    (["--per-source", "0"], "--per-source"),
])
def test_make_bad_options(tmp_path, sample_dir, run_cli, extra, message):
    runs, split = make_runs(tmp_path, sample_dir)
    code, _, err = run_cli("rate", "make", *[r.dir for r in runs], "--split", split, "--out", tmp_path / "s", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_allocation_is_even_and_fills_from_other_strata():
    import random

    q = allocate({"a": 10, "b": 1, "c": 5}, 9, random.Random(0))
    assert q == {"a": 4, "b": 1, "c": 4}
    assert allocate({"a": 2, "b": 2}, 4, random.Random(1)) == {"a": 2, "b": 2}
    assert sum(allocate({"a": 3, "b": 7}, 5, random.Random(2)).values()) == 5
    assert case_type("colonoscopy/polyp", "finding") == "abnormal"
    assert case_type("gastroscopy/landmark", "finding") == "normal"
    assert case_type("gastroscopy/landmark", "procedure") == "gastroscopy"
    assert case_type("gastroscopy/landmark", "stratum") == "gastroscopy/landmark"


def test_sample_source_without_strata_and_too_few():
    from harness.rating.study import Candidate

    cands = [Candidate("s", Path(f"{k}.png"), "p", "all") for k in range(10)]
    got = sample_source(cands, 4, seed=0, stratified=False)
    assert len(got) == 4 and len(set(got)) == 4
    assert got == sample_source(cands, 4, seed=0, stratified=False)
    with pytest.raises(UserError, match="only 10 images"):
        sample_source(cands, 11, seed=0, stratified=False)


# ------------------------------------------------------------------------------------------------ statistics


def test_krippendorff_alpha_hand_computed_and_published():
    # Two raters, three units: A = 1,2,3; B = 1,2,2. Coincidences o11 = 2, o22 = 2, o23 = o32 = 1; n1, n2, n3 = 2, 3, 1;
    # n = 6. Nominal: Do = 2/6, De = 2(n1n2 + n1n3 + n2n3)/(6*5) = 22/30 -> 1 - 10/22. Interval: De = 2(6*1 + 2*4 +
    # 3*1)/30 = 34/30 -> 1 - 10/34. Ordinal: d(2,3) = ((3+1)/2)^2 = 4, d(1,2) = 2.5^2, d(1,3) = (6-1.5)^2, so
    # Do = 2*4/6 and De = 2(6*6.25 + 2*20.25 + 3*4)/30 = 6 -> 1 - 8/36.
    h = np.array([[1, 2, 3], [1, 2, 2]], dtype=float)
    assert krippendorff_alpha(h, "nominal") == pytest.approx(12 / 22)
    assert krippendorff_alpha(h, "interval") == pytest.approx(24 / 34)
    assert krippendorff_alpha(h, "ordinal") == pytest.approx(7 / 9)
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", 4 observers x 12 units with missing values:
    # published alpha nominal 0.743, ordinal 0.815, interval 0.849.
    n = np.nan
    d = np.array([[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
                  [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]])
    assert round(krippendorff_alpha(d, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(d, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(d, "interval"), 3) == 0.849
    assert krippendorff_alpha(np.array([[3, 3, 3], [3, 3, 3]], dtype=float)) != krippendorff_alpha(h)  # nan: no variation


def test_bootstrap_mean_interval():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 6, size=(1, 200)).astype(float)
    point, lo, hi = bootstrap_mean(x, [np.arange(200)], n_boot=1000, seed=1)
    assert point == pytest.approx(x.mean())
    se = x.std() / np.sqrt(200)
    assert lo < point < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)  # the normal interval
    assert bootstrap_mean(x, [np.arange(200)], n_boot=1000, seed=1) == (point, lo, hi)  # seeded
    x[0, :50] = np.nan  # missing answers are left out, not counted as zero
    assert bootstrap_mean(x, [np.arange(200)], n_boot=10, seed=1)[0] == pytest.approx(np.nanmean(x))
    const = np.full((3, 10), 4.0)
    assert bootstrap_mean(const, [np.arange(10)], n_boot=50, seed=0) == (4.0, 4.0, 4.0)


def test_binomial_test_against_half():
    assert binomial_p(9, 10) == pytest.approx(22 / 1024)  # two-sided: P(X<=1) + P(X>=9)
    assert binomial_p(5, 10) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------- summarize


def _likert_a(it):  # rater a: real images 5, generated 2; always right in the Turing test
    return 5 if it["source"] == REAL_SOURCE else 2


def _turing_a(it):
    return "real" if it["source"] == REAL_SOURCE else "synthetic"


def test_summarize_end_to_end(study, run_cli, tmp_path, monkeypatch):
    runs, _, out, key = study
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "ratings-a.csv", tmp_path / "ratings-b.csv"
    a.write_text(ratings_csv(key, "a", _likert_a, _turing_a))
    # rater b rates every image 3 and calls everything real; leaves the first image unrated
    first = key["items"][0]["id"]
    b.write_text(ratings_csv(key, "b", lambda it: None if it["id"] == first else 3,
                             lambda it: None if it["id"] == first else "real", order=key["items"][::-1]))
    code, stdout, err = run_cli("rate", "summarize", out / "key.json", a, b, "--n-boot", "300")
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    run0 = runs[0].id
    cell = s["sources"][run0]["all"]
    n_b = 6 - (key["items"][0]["source"] == run0)
    assert cell["images"] == 6 and cell["raters"] == 2 and cell["ratings"] == 6 + n_b
    assert cell["likert"]["mean"] == pytest.approx((6 * 2 + n_b * 3) / (6 + n_b))
    assert cell["distribution"] == {"1": 0, "2": 6, "3": n_b, "4": 0, "5": 0}
    assert cell["likert"]["low"] <= cell["likert"]["mean"] <= cell["likert"]["high"]
    assert set(s["sources"][run0]) == {"all", "abnormal", "normal"}
    assert s["sources"][REAL_SOURCE]["all"]["rated_real"]["mean"] == pytest.approx(1.0)
    tv = cell["turing_vs_real"]
    # a: 12 right (6 run + 6 real); b: 0 right on the run's images, right on the real ones it answered
    n_b_real = 6 - (key["items"][0]["source"] == REAL_SOURCE)
    assert tv["correct"] == 12 + n_b_real and tv["answers"] == 12 + n_b + n_b_real
    assert tv["p_binomial"] == pytest.approx(binomial_p(tv["correct"], tv["answers"]))
    assert s["agreement"]["images_rated_by_2_or_more"] == 17
    assert s["agreement"]["likert_alpha_ordinal"] < 0.5  # b's flat 3s disagree with a
    assert s["overall"]["turing_accuracy"]["answers"] == 18 + 17
    assert [r["rater"] for r in s["raters"]] == ["a", "b"] and s["raters"][1]["likert_answers"] == 17
    # per run: its own cells plus the control, tagged with the study
    for r in runs:
        rs = json.loads((r.dir / "reader_study.json").read_text())
        mine = rs["studies"][key["study"]]
        assert set(mine["sources"]) == {r.id, REAL_SOURCE} and mine["source"] == r.id
    assert (out / "realism.png").stat().st_size > 1000 and (out / "summary.md").is_file()
    board = (tmp_path / "leaderboard.md").read_text()
    assert "## Reader study" in board and run0 in board and "real (control)" in board
    assert "| Study | Source | Case type |" in board
    section = reader_study_markdown()
    assert section and section in board
    assert board.count("real (control) | all") == 1  # the control once per study, not once per run


def test_leaderboard_has_no_reader_study_section_without_studies(tmp_path):
    assert reader_study_markdown(tmp_path / "nothing") == ""


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _bad_inputs(key):
    good = ratings_csv(key, "a", _likert_a, _turing_a)
    lines = _lines(good)
    other = good.replace(key["study"], "0123456789ab")
    foreign = good.replace(key["items"][3]["id"], "deadbeef")
    dup = "".join(lines[:4] + [lines[3]] + lines[4:])
    return {
        "another-study": (other, "another study", 2),
        "id-not-in-key": (foreign, "'deadbeef' is not in this study's key", None),
        "duplicate-row": (dup, "answered twice (first on row 4)", 5),
        "likert-6": (good.replace(",2,synthetic,", ",6,synthetic,", 1), "likert '6' out of range", None),
        "likert-0": (good.replace(",2,synthetic,", ",0,synthetic,", 1), "likert '0' out of range", None),
        "likert-3.5": (good.replace(",2,synthetic,", ",3.5,synthetic,", 1), "likert '3.5' out of range", None),
        "turing-maybe": (good.replace(",synthetic,", ",maybe,", 1), "turing 'maybe'", None),
        "truncated-mid-row": (good[: len(good) - len(lines[-1]) // 2], "truncated", len(lines)),
        "truncated-at-row": ("".join(lines[:-3]), "lists 15 of the study's 18 images", len(lines) - 3),
        "wrong-header": ("a,b,c\n" + "".join(lines[1:]), "not a ratings file", 1),
        "empty": ("", "empty file", 1),
        "position-out-of-range": (good.replace(",1,", ",99,", 1), "position '99' out of range", 2),
    }


@pytest.mark.parametrize("case", ["another-study", "id-not-in-key", "duplicate-row", "likert-6", "likert-0",
                                  "likert-3.5", "turing-maybe", "truncated-mid-row", "truncated-at-row",
                                  "wrong-header", "empty", "position-out-of-range"])
def test_summarize_bad_input_one_line_nothing_written(study, run_cli, tmp_path, monkeypatch, case):
    runs, _, out, key = study
    monkeypatch.chdir(tmp_path)
    text, message, row = _bad_inputs(key)[case]
    good = tmp_path / "ratings-good.csv"
    good.write_text(ratings_csv(key, "b", 3, "real"))
    bad = tmp_path / "ratings-bad.csv"
    bad.write_text(text)
    code, stdout, err = run_cli("rate", "summarize", out / "key.json", good, bad, "--n-boot", "10")
    assert code == 2, (stdout, err)
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert str(bad) in err.replace("\n", "")
    if row is not None:
        assert f"{bad}:{row}:" in err.replace("\n", "")
    assert not (out / "summary.json").exists() and not (out / "realism.png").exists()
    assert not any((r.dir / "reader_study.json").exists() for r in runs)
    assert not (tmp_path / "leaderboard.md").exists()


def test_summarize_duplicate_rater_across_files(study, run_cli, tmp_path):
    _, _, out, key = study
    a1, a2 = tmp_path / "ratings-a.csv", tmp_path / "ratings-a-again.csv"
    a1.write_text(ratings_csv(key, "a", _likert_a, _turing_a))
    a2.write_text(ratings_csv(key, "a", 3, "real"))
    code, _, err = run_cli("rate", "summarize", out / "key.json", a1, a2, "--no-leaderboard")
    assert code == 2 and "rater 'a' already answered in" in err and str(a2) in err.replace("\n", "")
    assert not (out / "summary.json").exists()


def test_summarize_refuses_turing_answers_in_a_likert_only_study(tmp_path, sample_dir, run_cli):
    runs, split = make_runs(tmp_path, sample_dir)
    out = tmp_path / "s"
    assert run_cli("rate", "make", *[r.dir for r in runs], "--per-source", "3", "--split", split, "--out", out)[0] == 0
    key = json.loads((out / "key.json").read_text())
    f = tmp_path / "ratings-x.csv"
    f.write_text(ratings_csv(key, "x", 4, "real"))
    code, _, err = run_cli("rate", "summarize", out / "key.json", f, "--no-leaderboard")
    assert code == 2 and "made without --turing" in err
    f.write_text(ratings_csv(key, "x", 4))
    code, _, err = run_cli("rate", "summarize", out / "key.json", f, "--no-leaderboard", "--n-boot", "50")
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["sources"][REAL_SOURCE]["all"]["likert"]["mean"] == 4.0 and "turing_vs_real" not in \
        s["sources"][runs[0].id]["all"] and s["agreement"] == {}


def test_make_warns_when_a_source_cannot_be_balanced_like_the_others(tmp_path, sample_dir):
    from harness.generate import TestPatternGenerator, generate_images
    from harness.runs import create_run

    runs, split = make_runs(tmp_path, sample_dir, n_runs=1)
    lopsided = create_run("test-pattern", {"size": 16, "data_dir": str(sample_dir), "split": str(split)}, tag="poly")
    prompts = ["Generate an image containing a polyp."] * 7 + ["Generate an image with no polyps."]
    generate_images(TestPatternGenerator(size=16), prompts, lopsided.images_dir)
    said: list[str] = []
    made = make_study(MakeConfig(runs=[r.dir for r in runs] + [lopsided.dir], out=tmp_path / "s", per_source=6,
                                 by="finding", split=split), log=said.append)
    assert made.per_source[lopsided.id] == {"abnormal": 5, "normal": 1}
    assert made.per_source[REAL_SOURCE] == {"abnormal": 3, "normal": 3}
    assert len(said) == 1 and "not balanced the same way" in said[0] and f"{lopsided.id}: abnormal 5, normal 1" in said[0]
