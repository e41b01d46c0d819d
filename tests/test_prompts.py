"""Prompt files: reading rules, `harness prompts check` and `harness prompts make`."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from bad_data import bad_blank_only_prompts, bad_empty_prompts, bad_non_utf8_prompts, prompt_file

from harness.errors import UserError
from harness.prompts import check_prompts, read_prompt_file, shipped_dev_captions, synthesize_test_prompts


def test_reading_rules(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes(b"\xef\xbb\xbfFirst prompt.\r\n\r\n  spaced prompt  \n   \nlast without newline")
    pf = read_prompt_file(p)
    assert pf.prompts == ["First prompt.", "  spaced prompt  ", "last without newline"]  # only line ends stripped
    assert pf.blank_lines == [2, 4] and pf.line_numbers == [1, 3, 5] and pf.bom
    assert len(pf.sha256) == 64


def test_only_newline_splits_a_prompt(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes("a\x0bb\u2028c\rd\n".encode())
    assert read_prompt_file(p).prompts == ["a\x0bb\u2028c\rd"]


@pytest.mark.parametrize("make,match", [
    (bad_non_utf8_prompts, r"latin1.txt:2: not UTF-8 \(byte 0xe9 at byte offset 52\)"),
    (bad_empty_prompts, r"empty.txt: empty file"),
    (bad_blank_only_prompts, r"blank.txt: no prompts \(3 blank lines\)"),
])
def test_bad_prompt_files(tmp_path, make, match, run_cli):
    path = make(tmp_path)
    with pytest.raises(UserError, match=match):
        read_prompt_file(path)
    rc, out, err = run_cli("prompts", "check", path)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(path) in err and "Traceback" not in err


def test_check_prompts_report(tmp_path):
    caps = shipped_dev_captions()
    lines = [caps[0], caps[1], caps[0], "Generate an image with an an abnormality located in the centre.", " " + caps[2],
             "A completely new prompt that is long enough to be the longest one here by a margin."]
    pf = read_prompt_file(prompt_file(tmp_path, lines[:3] + [""] + lines[3:]))
    r = check_prompts(pf, caps, "shipped")
    assert (r.count, r.unique) == (6, 5) and r.blank_lines == [4]
    assert r.longest["index"] == 6
    missing = {m["index"]: m for m in r.not_in_dev}
    assert set(missing) == {4, 5, 6}
    assert missing[4]["closest"] == "Generate an image with an an abnormality located in the center."
    assert missing[5]["closest"] == caps[2] and missing[6]["closest"] is None
    assert r.whitespace_edges == [5]


def test_synthesized_test_file_has_the_real_shape():
    caps = shipped_dev_captions()
    lines = synthesize_test_prompts(caps, n=5000, n_unique=260, seed=0)
    assert len(lines) == 5000 and len(set(lines)) == 260 and set(lines) <= set(caps)
    assert lines == synthesize_test_prompts(caps, 5000, 260, 0)
    assert lines != synthesize_test_prompts(caps, 5000, 260, 1)
    assert lines == synthesize_test_prompts(list(reversed(caps)), 5000, 260, 0)  # input order does not matter


def test_synthesis_follows_caption_frequency():
    caps = ["common"] * 90 + ["rare"] * 10 + ["mid"] * 30
    lines = synthesize_test_prompts(caps, n=2000, n_unique=3, seed=0)
    c = Counter(lines)
    assert c["common"] > c["mid"] > c["rare"] >= 1


@pytest.mark.parametrize("n,u,match", [(10, 500, "distinct captions available"), (5, 10, "cannot hold"),
                                       (0, 0, ">= 1")])
def test_synthesis_bad_arguments(n, u, match):
    with pytest.raises(UserError, match=match):
        synthesize_test_prompts(shipped_dev_captions(), n=n, n_unique=u)


def test_make_then_check_cli(tmp_path, run_cli, sample_dir):
    out = tmp_path / "test-prompts.txt"
    rc, stdout, err = run_cli("prompts", "make", out, "--n", "50", "--unique", "12", "--seed", "2")
    assert rc == 0, err
    pf = read_prompt_file(out)
    assert len(pf.prompts) == 50 and len(set(pf.prompts)) == 12 and not pf.blank_lines
    rc, _, err = run_cli("prompts", "make", out)
    assert rc == 2 and "--overwrite" in err
    rc, stdout, err = run_cli("prompts", "check", out, "--json", tmp_path / "r.json")
    assert rc == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["count"], r["unique"], r["not_in_dev"]) == (50, 12, [])
    assert "every prompt is a dev caption" in stdout
    # against the sample's own captions most of them are unknown
    rc, stdout, err = run_cli("prompts", "check", out, "--data", sample_dir)
    assert rc == 0 and "never seen in the dev captions" in stdout
    # made from a data dir: only its captions are used
    out2 = tmp_path / "from-sample.txt"
    rc, _, err = run_cli("prompts", "make", out2, "--n", "20", "--unique", "5", "--data", sample_dir)
    assert rc == 0, err
    sample_caps = {line.split(";")[0] for line in (sample_dir / "prompt-gt.csv").read_text().splitlines()[1:]}
    assert set(read_prompt_file(out2).prompts) <= sample_caps


def test_prompts_help_has_examples(run_cli):
    for cmd in ("check", "make"):
        rc, out, _ = run_cli("prompts", cmd, "--help")
        assert rc == 0 and "Examples:" in out and f"harness prompts {cmd}" in out
