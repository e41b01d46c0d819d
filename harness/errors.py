"""User-facing errors: one clear line, exit code 2, no traceback (unless --verbose)."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input (file, row, option) rather than a bug.

    The CLI prints `str(err)` as one red line and exits with code 2. Name the file (and row) in the message.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None, row: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if row is not None:
                where += f":{row}"
            where += ": "
        super().__init__(where + message)
