"""Shell completion through click's `_HARNESS_COMPLETE` protocol (README "Shell completion")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _invoke(env: dict[str, str]):
    """The root command as the `harness` script runs it (prog name harness -> _HARNESS_COMPLETE), via click's
    testing runner (completion writes bytes to stdout, which a plain StringIO cannot take)."""
    from click.testing import CliRunner

    from harness.cli import cli

    return CliRunner().invoke(cli, [], prog_name="harness", env=env)


def _complete(words: str) -> list[str]:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    r = _invoke({"_HARNESS_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    assert r.exit_code == 0, r.output
    return [line.split(",", 1)[1] for line in r.output.splitlines()]


def test_bash_complete_gives_subcommands_options_and_choices():
    assert _complete("harness tr") == ["train"]
    assert {"sd", "kandinsky3", "msdm-vae"} <= set(_complete("harness train "))
    assert _complete("harness doctor --f") == ["--for"]
    assert _complete("harness doctor --for train-s") == ["train-sd"]
    assert _complete("harness train sd --for") == ["--format"]


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _harness_completion harness"),
                                           ("zsh", "#compdef harness"), ("fish", "complete --no-files --command harness")])
def test_the_source_scripts_of_the_readme(shell, marker):
    r = _invoke({"_HARNESS_COMPLETE": f"{shell}_source"})
    assert r.exit_code == 0 and marker in r.output


def test_the_installed_entry_point_completes():
    exe = Path(sys.executable).with_name("harness")
    if not exe.is_file():
        pytest.skip("no `harness` console script next to this interpreter")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), _HARNESS_COMPLETE="bash_complete", COMP_WORDS="harness tr",
               COMP_CWORD="1")
    out = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["plain,train"], out.stderr
