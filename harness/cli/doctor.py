"""`harness doctor [--for COMMAND]`: what this machine has for the harness (harness/doctor.py)."""

from __future__ import annotations

import inspect
import sys

import click

from harness.doctor import HUB_TIMEOUT_S, TARGET_NAMES, TARGETS


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(doctor)


def _targets_help() -> str:
    return "\n".join(f"  {t.name:<24} {t.why}" for t in TARGETS)


@click.command("doctor")
@click.option("--for", "for_target", type=click.Choice(TARGET_NAMES), default=None, metavar="COMMAND",
              help="Check what COMMAND needs (see the list below) and exit 1 naming whatever it will miss, 0 when "
                   "everything is on disk.")
@click.option("--verify", is_flag=True,
              help="Also hash the torch.hub weights files against their published sha256 (what `harness score` "
                   "checks before using them; seconds per file the first time, memoised after).")
def doctor(for_target, verify):
    """One table of what this machine has for the harness: Python, torch, CUDA devices and memory, installed
    packages against the floors of the installed medvqa-harness (its pyproject dependencies), the weights files
    and hub models the commands load and where each is looked for, whether the hub answers, and the free disk
    space where the caches grow. Nothing is loaded or downloaded.

    Weights are looked for where the commands look: torch-fidelity's and torchvision's files in
    $TORCH_HOME/hub/checkpoints (what `harness score` reads unless given --inception-weights etc.), the families'
    default hub models (their --base/--prior/--decoder/--text-encoder defaults) in the Hugging Face cache
    ($HF_HUB_CACHE or $HF_HOME/hub). The hub check is a HEAD request to $HF_ENDPOINT (default https://huggingface.co)
    given {timeout:g} s (a reachable hub answers in well under a second; a firewall that drops packets would otherwise
    hang it); with HF_HUB_OFFLINE=1 no request is made. A missing file is reported even when the hub is
    reachable: --for says what is on disk now, before a long job starts.

    \b
    --for COMMAND:
    {targets}

    \b
    Examples:
      harness doctor
      harness doctor --for score
      harness doctor --for train-kandinsky && harness train kandinsky-prior ...
    """
    from rich.console import Console

    from harness.doctor import run_checks, table

    report = run_checks(for_target, verify=verify)
    console = Console(highlight=False, width=max(Console().width, 140))
    console.print(table(report))
    if report.target is None:
        return
    missing = report.missing()
    if missing:
        from rich.markup import escape

        console.print(f"[bold red]{report.target.name} will miss:[/] "
                      + escape("; ".join(f"{c.name} ({c.where})" if c.where else f"{c.name}: {c.detail}"
                                         for c in missing)), soft_wrap=True)
        sys.exit(1)  # not click's Exit: harness.cli.main runs click with standalone_mode=False, which drops it
    console.print(f"[green]{report.target.name}: everything it needs is here[/]")


doctor.help = inspect.cleandoc(doctor.help).replace("{timeout:g}", f"{HUB_TIMEOUT_S:g}").replace("{targets}", _targets_help())
