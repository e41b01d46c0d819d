"""Run every case of the bad-input corpus through the real CLI: one clear line, exit 2, nothing partial."""

from __future__ import annotations

import pytest

from .corpus import ACCEPTED, CASES, snapshot

RAN: list[str] = []


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tmp_path, run_cli, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(work / "runs"))
    monkeypatch.chdir(work)  # anything written relative to the cwd would land here and be caught
    args = CASES[name](work)
    before = snapshot(work)
    code, out, err = run_cli(*args)
    after = snapshot(work)
    assert code == 2, f"{name}: exit {code}\n{out}\n{err}"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{name}: not one error line:\n{err}"
    assert "Traceback" not in out + err
    assert after == before, f"{name}: left files behind: {sorted(set(after) ^ set(before))}"
    RAN.append(f"{name}  ->  {lines[0]}")


def test_corpus_is_complete_and_listed(capsys):
    # At least 20 cases across the commands; the list is printed into the test log every run.
    commands = {name.split(":")[0] for name in CASES}
    assert len(CASES) >= 20, len(CASES)
    assert {"data check", "split", "prompts check", "generate", "package", "validate", "train"} <= commands
    with capsys.disabled():
        print(f"\nbad-input corpus: {len(CASES)} cases, each exit 2 + one error line + nothing written:")
        for name in sorted(CASES):
            print("  -", name)
        for name, why in ACCEPTED.items():
            print(f"  (accepted: {name}: {why})")


def test_prompt_file_bom_is_accepted_and_reported(tmp_path, run_cli):
    from harness.prompts import read_prompt_file

    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfGenerate an image with no polyps.\nGenerate an image containing text.\n")
    assert read_prompt_file(p).prompts[0] == "Generate an image with no polyps."  # the BOM is not prompt text
    code, out, err = run_cli("prompts", "check", p)
    assert code == 0, err
    assert "UTF-8 BOM" in out
