"""One look for every long-running loop: a rich progress bar on stderr (quiet when not a terminal and in tests)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)


def progress(*extra_columns, transient: bool = False) -> Progress:
    """A Progress with description, bar, n/N, elapsed and ETA; extra columns (e.g. loss) go before the times."""
    disable = bool(os.environ.get("HARNESS_NO_PROGRESS")) or (not sys.stderr.isatty() and "PYTEST_CURRENT_TEST" in os.environ)
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable,
    )
