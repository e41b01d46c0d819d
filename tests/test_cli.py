"""The CLI's own error handling (one red line, exit 2) and the `models make-tiny clip-text` command."""

from __future__ import annotations

from pathlib import Path

import pytest


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("target", ["under-a-file", "proc"])
def test_os_error_on_an_output_path_is_one_line_naming_it(tmp_path, run_cli, monkeypatch, target):
    """Any command: an OSError carrying a path (here raised by a real mkdir deep inside a stage, past the early
    checks) becomes one line naming the path, exit 2, wherever it happens."""
    import harness.split as S

    (tmp_path / "a-file").write_text("x")
    bad = tmp_path / "a-file" / "sub" if target == "under-a-file" else Path("/proc/harness-no/sub")

    def write_split(*a, **k):
        (bad / "x").mkdir(parents=True)

    monkeypatch.setattr(S, "write_split", write_split)
    code, out, err = run_cli("split", tmp_path, "--out", tmp_path / "split.json")
    line = _one_error_line(err)
    assert code == 2 and (str(tmp_path / "a-file") in line or "/proc/harness-no" in line)


def test_os_error_without_a_path_is_a_bug_and_keeps_its_traceback(tmp_path, monkeypatch):
    import harness.split as S
    from harness.cli import main

    def write_split(*a, **k):
        raise OSError("device exploded")

    monkeypatch.setattr(S, "write_split", write_split)
    with pytest.raises(OSError, match="device exploded"):
        main(["split", str(tmp_path), "--out", str(tmp_path / "split.json")])


def test_usage_errors_are_one_line(run_cli, tmp_path):
    code, out, err = run_cli("generate", tmp_path, "--prompts", tmp_path / "p.txt", "--batch-size", "zero")
    assert code == 2 and "harness generate" in _one_error_line(err) and "--batch-size" in err
    code, out, err = run_cli("generate", tmp_path, "--no-such-option")
    assert code == 2 and "--no-such-option" in _one_error_line(err)


def test_make_tiny_clip_text_writes_a_loadable_encoder(tmp_path, run_cli):
    from models.msdm.text import CLIPText

    out = tmp_path / "tiny-clip"
    code, stdout, err = run_cli("models", "make-tiny", "clip-text", out, "--hidden-size", "16")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"tokenizer", "text_encoder"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    text = CLIPText.from_pretrained(out)
    hidden, mask = text(["Generate an image with no polyps."])
    assert hidden.shape[-1] == 16 and text.tokenizer.tokenize("polyps") == ["polyps</w>"]  # learned from captions
    code, _, err = run_cli("models", "make-tiny", "clip-text", out)
    assert code == 2 and "--overwrite" in _one_error_line(err)
    code, _, err = run_cli("models", "make-tiny", "clip-text", out, "--overwrite", "--seed", "1")
    assert code == 0, err


def test_make_tiny_help_documents_the_test_only_scoring_option(run_cli):
    code, out, _ = run_cli("models", "make-tiny", "clip-text", "--help")
    text = " ".join(out.split())
    assert code == 0 and "--allow-unverified-weights" in text and "TEST option" in text
    assert "[default: 32;" in text  # defaults shown


def test_training_into_an_unwritable_runs_root_is_one_line(tmp_path, run_cli, monkeypatch, sample_dir):
    """No per-command code: the runs root is created by `create_run`, and its OSError is mapped centrally."""
    from harness.split import write_split

    write_split(sample_dir, tmp_path / "split.json", val_images=4, seed=0)
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "a-file" / "runs"))
    code, out, err = run_cli("train", "msdm-vae", "--split", tmp_path / "split.json", "--data", sample_dir,
                             "--preset", "tiny", "--max-steps", "1", "--perceptual-weight", "0")
    line = _one_error_line(err)
    assert code == 2 and str(tmp_path / "a-file") in line, line


def _leaf_commands(cmd, path):
    import click

    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _leaf_commands(sub, path + [name])
    else:
        yield " ".join(path), cmd


def test_every_float_option_of_every_command_refuses_nan_and_inf():
    """The class, not the example: a click range lets nan through (every comparison with nan is false), so
    `--kl-weight nan`, `--guidance nan`, `--snr-gamma inf` ... used to be accepted (or, for --eval-every-epochs inf,
    crash with a traceback). Every float option of every command must refuse them at parse time."""
    import click

    from harness.cli import cli

    accepted = []
    for name, cmd in _leaf_commands(cli, ["harness"]):
        for p in cmd.params:
            if not isinstance(p.type, click.types.FloatParamType):
                continue
            for value in ("nan", "inf", "-inf"):
                try:
                    p.type.convert(value, p, click.Context(cmd))
                except click.BadParameter:
                    continue
                accepted.append(f"{name} {p.opts[0]} {value}")
    assert not accepted, accepted


@pytest.mark.parametrize("args", [["train", "msdm-vae", "--kl-weight", "nan"],
                                  ["train", "kandinsky-prior", "--eval-every-epochs", "inf"]])
def test_non_finite_float_option_is_one_line_before_any_work(tmp_path, run_cli, args):
    code, out, err = run_cli(*args, "--split", tmp_path / "split.json", "--data", tmp_path, "--max-steps", "1")
    line = _one_error_line(err)
    assert code == 2 and "not a finite number" in line
