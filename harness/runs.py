"""Run directories: every training or generation writes into `runs/<run-id>/`.

Layout of a run (created on demand):
    config.json     fully resolved typed config + family + seed + created time + harness version
    data.json       hashes of the data that produced it (prompt-gt.csv sha256, split sha256, image-list hash)
    paths.json      every path named in config.json / data.json, also relative to the run (and hashed when a small
                    file), so a moved or copied run still finds its text encoder, VAE run, data and split
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
from harness.io import read_json, sha256_file, write_json

DEFAULT_RUNS_DIR = Path("runs")
PATHS_JSON = "paths.json"
_HASH_MAX_BYTES = 64 << 20  # files up to this size are identified by sha256 too (split, prompt, paraphrase files)
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

    def config(self, resolve: bool = True) -> dict[str, Any]:
        """config.json. With `resolve`, a recorded path (written with a `/`) that no longer exists where it was (the
        run, or the project around it, was moved or copied, or the command runs from another directory) is replaced
        by where it is found now (see `resolve_recorded`); a path found nowhere is left as recorded, for the reader
        to report (`resolve_recorded` says where it looked)."""
        cfg = read_json(self.config_path)
        if not resolve:
            return cfg
        recorded = self.recorded_paths()
        if not recorded:
            return cfg

        def walk(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, str) and v in recorded and _has_separator(v) and not Path(v).exists():
                found = self._find_recorded(v, recorded)[0]
                return str(found) if found is not None else v
            return v

        return walk(cfg)

    def recorded_paths(self) -> dict[str, dict[str, Any]]:
        p = self.dir / PATHS_JSON
        if not p.is_file():
            return {}
        d = read_json(p)
        return d.get("paths", {}) if isinstance(d, dict) else {}

    def _find_recorded(self, value: str, recorded: dict[str, dict[str, Any]]) -> tuple[Path | None, list[str]]:
        """(found path or None, what was tried). Lookup order, first match wins:
          1. the value as written (absolute, or relative to the working directory);
          2. the absolute path it had when the run was made;
          3. the same place relative to the run folder now (the run moved together with its inputs);
          4. the value relative to the run folder.
        A candidate whose recorded sha256 (small files) differs is skipped: same name, other content."""
        rec = recorded.get(value, {})
        cands: list[Path] = [Path(value)]
        if rec.get("absolute"):
            cands.append(Path(rec["absolute"]))
        here = self.dir.absolute()
        if rec.get("relative"):
            cands.append(Path(os.path.normpath(here / rec["relative"])))
        if not Path(value).is_absolute():
            cands.append(Path(os.path.normpath(here / value)))
        tried: list[str] = []
        for c in dict.fromkeys(cands):
            if not c.exists():
                tried.append(f"{c} (missing)")
                continue
            want = rec.get("sha256")
            if want and c.is_file() and sha256_file(c) != want:
                tried.append(f"{c} (other content)")
                continue
            return c, tried
        return None, tried

    def resolve_recorded(self, value: str | Path, what: str, hub_ok: bool = False) -> Path | str:
        """Where a path recorded in this run (text encoder, VAE run, data, split, adapter) is now; see
        `_find_recorded` for the lookup order. With `hub_ok`, a value that is not a recorded path and looks like a
        hub id (`org/name`, not found on disk) is returned unchanged. Otherwise a path found nowhere is a UserError
        listing every place tried."""
        value = str(value)
        recorded = self.recorded_paths()
        found, tried = self._find_recorded(value, recorded)
        if found is not None:
            return found
        if hub_ok and value not in recorded and not Path(value).is_absolute() and not value.startswith("."):
            return value
        raise UserError(f"{what} {value!r} recorded in this run was not found; tried: {'; '.join(tried)}. Move it "
                        "back, or keep it beside the run as it was when the run was made", self.dir)

    @property
    def family(self) -> str:
        fam = self.config(resolve=False).get("family")
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
    record_paths(run, full, data or {})
    return run


def _has_separator(value: str) -> bool:
    # Only values written as paths (`/abs/x`, `runs/x`, `./x`) are swapped silently by `Run.config`; a bare word
    # that happened to name a file in the working directory ("paper", "tiny-clip") is resolved only where a reader
    # asks for a path (`Run.resolve_recorded`), so a preset name is never turned into a folder.
    return "/" in value or os.sep in value


def record_paths(run: Run, *records: Any) -> dict[str, dict[str, Any]]:
    """Write RUN/paths.json: for every string in `records` naming an existing file or folder, its absolute path,
    its path relative to the run folder, and (small files) its sha256. Read back by `Run.resolve_recorded`."""
    found: dict[str, dict[str, Any]] = {}

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v and len(v) < 4096 and v not in found and v.strip() == v:
            p = Path(v)
            try:
                if not p.exists():
                    return
            except (OSError, ValueError):  # not a possible path (too long, NUL byte)
                return
            absolute = p.resolve()
            entry: dict[str, Any] = {"absolute": str(absolute),
                                     "relative": os.path.relpath(absolute, run.dir.resolve())}
            if absolute.is_file() and absolute.stat().st_size <= _HASH_MAX_BYTES:
                entry["sha256"] = sha256_file(absolute)
            found[v] = entry

    for r in records:
        walk(r)
    write_json(run.dir / PATHS_JSON, {"paths": found})
    return found


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
