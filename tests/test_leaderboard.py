"""leaderboard.md: grouping of comparable rows, best marks, exclusions, plots, CLI (metrics.json built by hand)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from harness.generate import TestPatternGenerator, generate_images
from harness.io import write_json
from harness.leaderboard import HEADER, collect, grouped, write_leaderboard
from harness.runs import create_run, runs_root

VAL = "a" * 64


def ok(**kw):
    return {"status": "ok", "weights_verified": True, **kw}


INC_SHA = "6726825d" + "0" * 56


def scored(run_id, *, real=("val:aaaaaaaa", VAL), n=(200, 5000), fid=None, isc=None, prc=None, fd=None,
           summary=None, family="kandinsky-prior", unverified=False, images=False, not_computed=None, kid=None,
           fid_iv=None, inc_sha=INC_SHA, preprocess=None, resolution=None, extra_results=(), mismatch=False):
    run = create_run(family, {"summary": summary or {}}, run_id=run_id)
    metrics = {}
    if fid is not None:
        metrics["fid"] = ok(value=fid, n_gen=n[1], n_real=n[0], extractor="inception-v3-compat",
                            weights_sha256=inc_sha)
        if fid_iv:
            metrics["fid"]["interval"] = {"low": fid_iv[0], "high": fid_iv[1], "level": 0.95, "n_boot": 200}
    if kid is not None:
        metrics["kid"] = ok(mean=kid, std=0.001, extractor="inception-v3-compat", weights_sha256=inc_sha)
    if isc is not None:
        metrics["is"] = ok(mean=isc, std=0.1)
    if prc is not None:
        p, r = prc
        metrics["prc"] = ok(precision=p, recall=r, f1=2 * p * r / (p + r), features="vgg16 fc2_relu")
    if fd is not None:
        metrics["imageclef2024"] = ok(fd=fd, is_mean=1.5)
    for k, why in (not_computed or {}).items():
        metrics[k] = {"status": "not computed", "reason": why}
    gen_sha = "g" * 64
    sample = []
    if images:
        from harness.features import ImageSet

        generate_images(TestPatternGenerator(32), [f"prompt number {i}" for i in range(5)], run.images_dir)
        files = sorted(run.images_dir.glob("*.png"))
        gen_sha = ImageSet("x", files).sha256
        sample = [{"filename": f.name, "prompt": f"prompt number {i}"} for i, f in enumerate(files)]
    doc = {
        "format": "harness-metrics/2", "run_id": run_id, "family": family, "scored": "2026-11-22T10:00:00",
        "real": {"label": real[0], "sha256": real[1], "n": n[0], **({"preprocess": preprocess} if preprocess else {})},
        "generated": {"n": n[1], "sha256": gen_sha, "sample": sample, "resolution": resolution},
        "extractors": {"inception-v3-compat": {"weights": {"sha256": inc_sha}}},
        "unverified_weights": unverified, "metrics": metrics, "warnings": [],
        "prompts": {"matches": False if mismatch else None}}
    if extra_results:
        doc["results"] = {"first": dict(doc), **{f"r{i}": {**doc, **e} for i, e in enumerate(extra_results)}}
    write_json(run.metrics_path, doc)
    return run


def test_empty_leaderboard_is_a_committable_header(tmp_path):
    out, got = write_leaderboard(tmp_path / "leaderboard.md")
    text = out.read_text()
    assert text.startswith(HEADER) and "No scored runs yet" in text and got.rows == []


def test_groups_best_marks_and_exclusions(tmp_path):
    sweep = {"sweep": "prior-ranks", "alpha": 8, "targets": ["to_q", "to_v"], "dora": True, "steps": 1000,
             "paraphrase_strategy": "add"}
    scored("r-rank4", fid=80.0, isc=1.6, prc=(0.5, 0.3), fd=0.09, summary={**sweep, "rank": 4}, images=True)
    scored("r-rank8", fid=70.0, isc=1.5, prc=(0.6, 0.2), fd=0.08, summary={**sweep, "rank": 8})
    scored("r-small-n", fid=120.0, n=(200, 500))
    scored("r-all-dev", fid=60.0, real=("all-dev (leaks training images)", "b" * 64), n=(2000, 5000))
    scored("r-test-weights", fid=1.0, unverified=True)
    scored("r-nothing", not_computed={"fid": "missing weights weights-inception-2015-12-05-6726825d.pth"})
    bad = create_run("msdm-unet", {}, run_id="r-broken")
    bad.metrics_path.write_text("{not json")

    got = collect()
    groups = grouped(got.rows)
    assert [[r.run_id for r in g] for g in groups] == [["r-all-dev"], ["r-rank8", "r-rank4"], ["r-small-n"]]
    assert any("r-test-weights" in s and "unverified" in s for s in got.skipped)
    assert any("r-broken" in s for s in got.skipped)

    out, _ = write_leaderboard(tmp_path / "leaderboard.md")
    text = out.read_text()
    lines = text.splitlines()
    row8 = next(line for line in lines if "`r-rank8`" in line)
    row4 = next(line for line in lines if "`r-rank4`" in line)
    assert row8.startswith("| ★ |") and "**70.000**" in row8 and "**0.600**" in row8 and "**0.0800**" in row8
    assert "**1.600**" in row4 and "**0.300**" in row4 and "**80.000**" not in row4  # best IS / recall is rank 4
    assert "| 4 | 8 | to_q,to_v | DoRA | 1000 | add |" in row4
    assert "200/5000" in row8 and "2026-11-22 10:00" in row8
    small = next(line for line in lines if "`r-small-n`" in line)
    assert "**" not in small  # alone in its group: nothing to beat
    assert "## all-dev (leaks training images) · real preprocessing native · N_real 2000 · N_gen 5000" in text
    assert "r-test-weights" in text.split("## Not listed")[1] and "| 1.000 |" not in text
    assert "`r-nothing`: no metric computed" in text and "6726825d.pth" in text

    # plots: one sweep figure, one sample grid (the only run with images), both linked and valid PNGs
    sweep_png = tmp_path / "leaderboard_plots" / "sweep-prior-ranks.png"
    assert "](leaderboard_plots/sweep-prior-ranks.png)" in text and sweep_png.is_file()
    grids = list((tmp_path / "leaderboard_plots").glob("grid-r-rank4-*.png"))
    assert len(grids) == 1 and f"[grid](leaderboard_plots/{grids[0].name})" in row4
    for png in (sweep_png, grids[0]):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 300

    again, _ = write_leaderboard(tmp_path / "leaderboard.md")
    assert again.read_text() == text  # deterministic: no timestamps of its own


def test_unverified_rows_only_when_asked(tmp_path):
    scored("r-test-weights", fid=1.0, unverified=True)
    assert collect().rows == []
    assert [r.run_id for r in collect(include_unverified=True).rows] == ["r-test-weights"]


def test_cli_writes_markdown_and_prints_rich(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scored("r-one", fid=50.0, prc=(0.7, 0.4))
    scored("r-two", fid=40.0, prc=(0.6, 0.5))
    code, out, err = run_cli("leaderboard")
    assert code == 0, err
    assert "2 scored run(s)" in out and (tmp_path / "leaderboard.md").is_file()
    code, out, err = run_cli("leaderboard", "--format", "rich")
    assert code == 0 and "r-one" in out and "r-two" in out and "40.000" in out
    code, out, _ = run_cli("leaderboard", "--out", tmp_path / "docs" / "lb.md", "--runs-dir", runs_root(), "--no-plots")
    assert code == 0 and (tmp_path / "docs" / "lb.md").is_file() and not (tmp_path / "docs" / "leaderboard_plots").exists()


def test_tables_split_only_where_numbers_are_not_comparable(tmp_path):
    match = {"mode": "match", "label": "match (pad to 256px)", "id": "match:256:pad:abc"}
    scored("r-fid-only", fid=50.0, preprocess=match)
    scored("r-more-metrics", fid=40.0, kid=0.01, isc=1.2, preprocess=match, resolution=[256, 256])
    scored("r-other-weights", fid=30.0, inc_sha="1" * 64, preprocess=match)
    scored("r-native", fid=45.0)
    groups = grouped(collect().rows)
    assert sorted(sorted(r.run_id for r in g) for g in groups) == [
        ["r-fid-only", "r-more-metrics"], ["r-native"], ["r-other-weights"]]
    text = write_leaderboard(tmp_path / "lb.md", plots=False)[0].read_text()
    row = next(line for line in text.splitlines() if "`r-more-metrics`" in line)
    assert "| 256×256 |" in row and "**0.0100**" not in row  # KID alone in its column: nothing to beat
    assert "real preprocessing match (pad to 256px)" in text and "real preprocessing native" in text


def test_intervals_results_per_real_set_and_unverified_label(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scored("r-iv", fid=41.5, fid_iv=(39.25, 44.75), mismatch=True,
           extra_results=[{"real": {"label": "all-dev (leaks training images)", "sha256": "b" * 64, "n": 2000}}])
    scored("r-test-weights", fid=1.0, unverified=True)
    rows = collect().rows
    assert sorted(r.real_label for r in rows if r.run_id == "r-iv") == ["all-dev (leaks training images)",
                                                                         "val:aaaaaaaa"]
    text = write_leaderboard(tmp_path / "lb.md", plots=False)[0].read_text()
    assert "41.500 [39.25, 44.75]" in text and "r-test-weights" not in text.split("## Not listed")[0]
    assert "`r-iv` ⚠" in text  # its prompts are not the real set's captions
    code, out, err = run_cli("leaderboard", "--include-unverified", "--no-plots")
    assert code == 0, err
    board = (tmp_path / "leaderboard.md").read_text()
    row = next(line for line in board.splitlines() if "`r-test-weights`" in line)
    assert "UNVERIFIED" in row and "1.000" in row


def test_stale_rows_are_not_shown_and_grids_use_the_scored_images(tmp_path):
    run = scored("r-img", fid=33.0, images=True)
    out, got = write_leaderboard(tmp_path / "lb.md")
    assert [r.run_id for r in got.rows] == ["r-img"]
    grid = next((tmp_path / "leaderboard_plots").glob("grid-r-img-*.png"))
    assert grid.is_file() and [x["filename"] for x in got.rows[0].sample] == [f"{i:05d}.png" for i in range(1, 6)]

    img = run.images_dir / "00002.png"
    arr = np.asarray(Image.open(img)).copy()
    arr[:3] = 255 - arr[:3]
    Image.fromarray(arr).save(img)
    out, got = write_leaderboard(tmp_path / "lb.md")
    text = out.read_text()
    assert got.rows == [] and any("STALE" in s and "r-img" in s for s in got.skipped)
    assert "`r-img`" not in text.split("## Not listed")[0] and "harness score" in text.split("## Not listed")[1]


def test_a_copied_run_is_its_own_row_named_by_its_folder(tmp_path):
    import shutil

    run = scored("r-orig", fid=40.0, images=True)
    shutil.copytree(run.dir, run.dir.parent / "r-copy")  # metrics.json inside still says run_id "r-orig"
    _, got = write_leaderboard(tmp_path / "lb.md")
    assert sorted(r.run_id for r in got.rows) == ["r-copy", "r-orig"]
