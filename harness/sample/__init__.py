"""A small real sample of the development set shipped inside the package (see SOURCE.md for origin and licence).

`sample_dir()` is a directory in the official layout (`prompt-gt.csv` beside `images/`), used by the quickstart
and the tests. `dev_unique_captions.txt` lists the 483 unique dev captions (one per line, verbatim), so prompt files
can be checked against the dev captions without the dev set at hand.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def sample_dir() -> Path:
    """The shipped sample: 48 dev images (64 px) and all their caption rows."""
    return _HERE


def dev_unique_captions_path() -> Path:
    return _HERE / "dev_unique_captions.txt"
