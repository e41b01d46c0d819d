"""Reference rows on the leaderboard: retrieval and test-pattern runs appear beside the entries they are comparable
with, marked "ref", never ranked; the memorisation metric is the "copies" column."""

from __future__ import annotations

from harness.io import write_json
from harness.leaderboard import write_leaderboard
from harness.runs import create_run

VAL = "a" * 64
INC = "6726825d" + "0" * 56


def _scored(run_id, family, fid, copies=None):
    run = create_run(family, {}, run_id=run_id)
    metrics = {"fid": {"status": "ok", "value": fid, "extractor": "inception-v3-compat", "weights_sha256": INC,
                       "weights_verified": True}}
    if copies is not None:
        metrics["memorisation"] = {"status": "ok", "value": copies, "extractor": "pixels-32", "weights_sha256": "",
                                   "weights_verified": True,
                                   "interval": {"low": max(0.0, copies - 0.05), "high": min(1.0, copies + 0.05)}}
    write_json(run.metrics_path, {
        "format": "harness-metrics/2", "run_id": run_id, "family": family, "scored": "2026-12-01T10:00:00",
        "real": {"label": "val:aaaaaaaa", "sha256": VAL, "n": 200}, "generated": {"n": 200, "sha256": "g" * 64},
        "unverified_weights": False, "metrics": metrics, "warnings": [], "prompts": {"matches": True}})
    return run


def _row(text, run_id):
    return next(line for line in text.splitlines() if f"`{run_id}`" in line)


def test_reference_rows_share_the_table_but_are_marked_and_never_ranked(tmp_path):
    _scored("entry-a", "kandinsky-prior", 50.0, copies=0.02)
    _scored("entry-b", "sd", 40.0)
    _scored("copy", "retrieval", 10.0, copies=1.0)
    _scored("pattern", "test-pattern", 300.0, copies=0.0)
    out, got = write_leaderboard(tmp_path / "leaderboard.md", plots=False)
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert [line.split("`")[1] for line in table] == ["entry-b", "entry-a", "copy", "pattern"]  # one table
    copy, pattern, b = _row(text, "copy"), _row(text, "pattern"), _row(text, "entry-b")
    assert copy.startswith("| ref |") and "retrieval (reference: copies of training images)" in copy
    assert pattern.startswith("| ref |") and "test-pattern (reference: nothing learned" in pattern
    # the retrieval copy has the best FID, yet the star and the bold go to the best entry
    assert b.startswith("| ★ |") and "**40.000**" in b and "**" not in copy and "**" not in pattern
    assert "| 100.0% [95.0%, 100.0%] |" in copy and "| 0.0% [0.0%, 5.0%] |" in pattern
    assert "| 2.0% [0.0%, 7.0%] |" in _row(text, "entry-a") and "| — |" in b
    assert "*ref* rows are reference baselines" in text and "harness train retrieval" in text


def test_a_scored_retrieval_run_is_a_reference_row_with_its_copies(run_cli, tmp_path, sample_dir):
    from harness.split import write_split

    split = tmp_path / "split.json"
    write_split(sample_dir, split, val_images=12, seed=0)
    assert run_cli("train", "retrieval", "--split", split, "--data", sample_dir, "--size", "32", "--run-id",
                   "ret")[0] == 0
    assert run_cli("generate", "ret", "--prompts", "split:val")[0] == 0
    from harness.runs import open_run

    code, out, err = run_cli("score", open_run("ret").dir, "--metrics", "memorisation", "--memorisation-space",
                             "pixels", "--bootstrap", "20", "--leaderboard", tmp_path / "lb.md")
    assert code == 0, err
    assert "100.0% likely copies" in out
    row = _row((tmp_path / "lb.md").read_text(), "ret")
    assert row.startswith("| ref |") and "| 100.0% [" in row
    code, out, err = run_cli("leaderboard", "--format", "rich")
    assert code == 0 and "│ ref │" in out and "100.0%" in out  # the terminal table marks it too
