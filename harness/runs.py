"""Run directories: every training or generation writes into `runs/<run-id>/`.

Layout of a run (created on demand):
    config.json     fully resolved typed config + family + seed + created time + harness version
    data.json       hashes of the data that produced it (prompt-gt.csv sha256, split sha256, image-list hash)
    log.txt         plain-text log of the run
    checkpoints/    trainer checkpoints (step-XXXXXXX/), keep-last-K
    images/         generated images + manifest.csv
    metrics.json    written by `harness score`
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import __version__
from harness.errors import UserError
from harness.io import read_json, write_json

DEFAULT_RUNS_DIR = Path("runs")
_ID_OK = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def runs_root() -> Path:
    """`$HARNESS_RUNS_DIR` or ./runs (relative to the working directory, never `~`)."""
    return Path(os.environ.get("HARNESS_RUNS_DIR", DEFAULT_RUNS_DIR))


def make_run_id(family: str, tag: str = "", now: _dt.datetime | None = None) -> str:
    """Readable id: `<family>[-<tag>]-YYYYMMDD-HHMM`, e.g. `msdm-unet-tiny-20261122-1532`, `kandinsky-prior-r32-...`."""
    now = now or _dt.datetime.now()
    parts = [family] + ([tag] if tag else []) + [now.strftime("%Y%m%d-%H%M")]
    rid = "-".join(parts).lower()
    rid = re.sub(r"[^a-z0-9._-]+", "-", rid)
    return rid


@dataclass
class Run:
    """A run directory and its small metadata files."""

    dir: Path

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    @property
    def images_dir(self) -> Path:
        return self.dir / "images"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.json"

    def config(self) -> dict[str, Any]:
        return read_json(self.config_path)

    @property
    def family(self) -> str:
        fam = self.config().get("family")
        if not fam:
            raise UserError("config.json has no 'family'", self.config_path)
        return fam

    def data_hashes(self) -> dict[str, Any]:
        p = self.dir / "data.json"
        return read_json(p) if p.exists() else {}

    def log(self, line: str) -> None:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{stamp} {line}\n")


def create_run(
    family: str,
    config: dict[str, Any],
    data: dict[str, Any] | None = None,
    tag: str = "",
    root: Path | None = None,
    run_id: str | None = None,
) -> Run:
    """Create a fresh, uniquely named run directory and write config.json / data.json into it."""
    root = Path(root) if root is not None else runs_root()
    base = run_id or make_run_id(family, tag)
    if not _ID_OK.match(base):
        raise UserError(f"run id {base!r} must be lowercase letters, digits, '.', '_' or '-'")
    root.mkdir(parents=True, exist_ok=True)
    rid, n = base, 1
    while True:
        try:
            (root / rid).mkdir()
            break
        except FileExistsError:
            if run_id:
                raise UserError("run already exists; pick another --run-id or use --resume", root / rid) from None
            n += 1
            rid = f"{base}-{n}"
    run = Run(root / rid)
    full = {
        "family": family,
        "run_id": rid,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "harness_version": __version__,
        **config,
    }
    write_json(run.config_path, full)
    write_json(run.dir / "data.json", data or {})
    return run


def open_run(path: str | Path) -> Run:
    """Open an existing run given its directory or its id under the runs root."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (runs_root() / p).exists():
        p = runs_root() / p
    if not (p / "config.json").is_file():
        raise UserError("not a run directory (no config.json)", p)
    return Run(p)


def list_runs(root: Path | None = None) -> list[Run]:
    root = Path(root) if root is not None else runs_root()
    if not root.is_dir():
        return []
    return [Run(d) for d in sorted(root.iterdir()) if (d / "config.json").is_file()]
