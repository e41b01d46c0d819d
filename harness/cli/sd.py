"""`harness ... sd` commands: they live with the family in harness/families/sd/cli.py."""

from __future__ import annotations


def register(cli, train, sweep, models) -> None:
    from harness.families.sd.cli import register as register_sd

    register_sd(cli, train=train, sweep=sweep, models=models)
