"""prompt-gt.csv reading, the DevSet API, `harness data check` on the shipped sample and on every crafted bad input."""

from __future__ import annotations

import json

import pytest
from bad_data import DATA_CASES, good_devset, rows_of, with_bom, with_lf, write_csv

from harness.data import CaptionRow, check_devset, load_devset, parse_csv, size_bucket
from harness.errors import UserError


def test_sample_devset_api(sample_dir):
    ds = load_devset(sample_dir)
    assert len(ds.rows) == 490 and len(ds.images()) == 48 and len(ds.unique_prompts()) == 85
    assert ds.rows[0] == CaptionRow(ds.rows[0].prompt, ds.rows[0].filename, 2)  # header is line 1
    assert ds.images() == sorted(set(r.filename for r in ds.rows))
    by = ds.captions_by_image()
    assert sum(len(v) for v in by.values()) == 490
    assert all(ds.image_path(n).is_file() for n in ds.images())
    # verbatim: the dev typos survive reading
    assert any("an an abnormality" in p for p in ds.unique_prompts())
    # captions_by_image returns copies: a caller cannot corrupt the DevSet
    by[ds.images()[0]].append("x")
    assert "x" not in ds.captions_by_image()[ds.images()[0]]


def test_sample_csv_is_byte_faithful_copy(sample_dir, dev_dir):
    """Every sample row is a row of the real CSV, byte for byte (prompt and filename)."""
    real = {(r.prompt, r.filename) for r in load_devset(dev_dir).rows}
    sample = load_devset(sample_dir)
    assert all((r.prompt, r.filename) in real for r in sample.rows)
    real_rows_of_sample = sum(1 for p, f in real if f in set(sample.images()))
    assert real_rows_of_sample == len(sample.rows)  # ALL rows of each sample image were copied
    assert (sample_dir / "prompt-gt.csv").read_bytes().count(b"\r\n") == len(sample.rows) + 1


def test_bom_and_lf_are_accepted_and_reported(tmp_path):
    p = parse_csv(with_bom(tmp_path / "a") / "prompt-gt.csv")
    assert p.bom and p.line_endings == "CRLF" and not p.problems
    p = parse_csv(with_lf(tmp_path / "b") / "prompt-gt.csv")
    assert not p.bom and p.line_endings == "LF"
    assert [r.prompt for r in p.rows] == [r[0] for r in rows_of(tmp_path / "b" / "data")]


def test_prompts_kept_verbatim_including_odd_characters(tmp_path):
    root = good_devset(tmp_path)
    name = rows_of(root)[0][1]
    odd = ["  leading and trailing spaces  ", "vertical\x0btab and U+2028\u2028inside", "stray \r inside"]
    write_csv(root, [(p, name) for p in odd])
    assert [r.prompt for r in load_devset(root).rows] == odd


def test_load_devset_is_strict_checker_collects(tmp_path):
    root = good_devset(tmp_path)
    rows = rows_of(root)
    write_csv(root, rows + [rows[0], ("only one field",)])  # type: ignore[list-item]
    with pytest.raises(UserError, match=r"prompt-gt.csv:\d+: duplicate of line 2.*and 1 more problems"):
        load_devset(root)
    kinds = [p.kind for p in check_devset(root).problems]
    assert kinds.count("duplicate") == 1 and kinds.count("fields") == 1


def test_header_messages_are_specific(tmp_path):
    root = good_devset(tmp_path)
    write_csv(root, rows_of(root), header="prompt;filename")
    with pytest.raises(UserError, match="case matters"):
        load_devset(root)
    write_csv(root, rows_of(root), header="Prompt\tFilename", sep="\t")
    with pytest.raises(UserError, match=r"prompt-gt.csv:1: header uses tab"):
        load_devset(root)


def test_non_utf8_names_line_and_byte(tmp_path):
    from bad_data import bad_non_utf8_csv

    root = bad_non_utf8_csv(tmp_path)
    with pytest.raises(UserError, match=r"prompt-gt.csv:4: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_devset(root)


def test_image_path_refuses_traversal(sample_dir):
    ds = load_devset(sample_dir)
    with pytest.raises(UserError, match="not a plain image filename"):
        ds.image_path("../prompt-gt.csv")


def test_check_sample_report(sample_dir):
    r = check_devset(sample_dir)
    assert (r.rows, r.unique_prompts, r.unique_images, r.files_in_images_dir) == (490, 85, 48, 48)
    assert r.captions_per_image["min"] >= 7 and r.captions_per_image["max"] <= 14
    assert r.size_histogram == {"1-64px": 48} and r.formats == {"JPEG": 48} and r.modes == {"RGB": 48}
    # the sample was chosen to contain contradictory images, and nothing else is wrong with it
    assert {p.kind for p in r.problems} == {"contradiction"}
    assert len({p.file for p in r.problems}) >= 2
    assert r.line_endings == "CRLF" and not r.bom


def test_size_buckets():
    assert size_bucket(64, 48) == "1-64px"
    assert size_bucket(256, 200) == "129-256px"
    assert size_bucket(1920, 1072) == "1537-2048px"
    assert size_bucket(5000, 10) == ">2048px"


@pytest.mark.parametrize("make,code,kind", DATA_CASES, ids=[c[0].__name__ for c in DATA_CASES])
def test_data_check_cli_on_bad_input(tmp_path, run_cli, make, code, kind):
    root = make(tmp_path)
    rc, out, err = run_cli("data", "check", root, "--json", tmp_path / "report.json", "--show", "0")
    from harness.data import WARNING_KINDS

    # defects found in a readable dev set: full report printed and written, then exit 2 with one error line
    expected = 2 if code == 0 and kind not in WARNING_KINDS else code
    assert rc == expected, (out, err)
    assert "Traceback" not in out + err
    if rc == 2 and code == 0:
        assert err.strip().startswith("error:") and "defect(s)" in err and len(err.strip().splitlines()) == 1
    if code == 2:
        # one red line naming the file, nothing written
        assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
        assert "prompt-gt.csv" in err or str(root) in err
        assert not (tmp_path / "report.json").exists()
        return
    report = json.loads((tmp_path / "report.json").read_text())
    hits = [p for p in report["problems"] if p["kind"] == kind]
    assert hits, report["problems"]
    # each problem names a file (the CSV with a line, or the image)
    assert all(p["file"] for p in hits)
    if kind in ("fields", "duplicate", "bad_filename"):
        assert all(p["file"].endswith("prompt-gt.csv") and p["line"] for p in hits)
    else:
        assert all("/images" in p["file"] for p in hits)
    assert report["problem_counts"][kind] == len(hits)
    assert "problem(s)" in out and kind_label(kind) in out


def kind_label(kind: str) -> str:
    from harness.data import PROBLEM_KINDS

    return PROBLEM_KINDS[kind]


def test_data_check_cli_sample(run_cli, sample_dir):
    rc, out, err = run_cli("data", "check", sample_dir)
    assert rc == 0, err
    assert "490" in out and "85" in out and "48" in out and "contradiction" in out


def test_data_check_help_has_example(run_cli):
    rc, out, _ = run_cli("data", "check", "--help")
    assert rc == 0 and "Examples:" in out and "harness data check" in out


def test_missing_directory_is_user_error(tmp_path, run_cli):
    rc, out, err = run_cli("data", "check", tmp_path / "nope")
    assert rc == 2 and "not found" in err and "Traceback" not in err


@pytest.mark.slow
def test_real_dev_set_check(dev_dir, run_cli, tmp_path):
    rc, out, err = run_cli("data", "check", dev_dir, "--json", tmp_path / "r.json")
    assert rc == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["rows"], r["unique_prompts"], r["unique_images"], r["files_in_images_dir"]) == (20241, 483, 2000, 2000)
    assert r["csv_sha256"] == "4bc29f140132a2836281ef836a83fe0c5ceac0503d844d47ed903894ae5f300e"
    assert r["captions_per_image"] == {"min": 7, "mean": 10.12, "max": 14}
    assert r["formats"] == {"JPEG": 2000} and r["modes"] == {"RGB": 2000}
    assert set(r["problem_counts"]) == {"contradiction"}


def test_shipped_sample_is_reproducible(dev_dir, sample_dir, tmp_path):
    from harness.sample.make_sample import make_sample

    chosen = make_sample(dev_dir, tmp_path)
    assert chosen == load_devset(sample_dir).images()
    assert (tmp_path / "prompt-gt.csv").read_bytes() == (sample_dir / "prompt-gt.csv").read_bytes()
    for name in chosen:
        assert (tmp_path / "images" / name).read_bytes() == (sample_dir / "images" / name).read_bytes()
    size = sum(p.stat().st_size for p in sample_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 300_000
