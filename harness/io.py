"""Atomic writes and content hashes.

Every file a user keeps is written to a temporary name in the same directory and renamed into place, so a crash or
SIGKILL never leaves a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"


def _create_temp(directory: Path, name: str) -> Path:
    """A new empty file `.<name>.tmp-<random>` in `directory`, created with mode 0o666 so the kernel applies the
    umask (and any default ACL) exactly as for a plain open(): tempfile.mkstemp would make it 0600, and the rename
    would carry that onto the kept file."""
    for _ in range(100):
        tmp = directory / f".{name}{TMP_MARK}{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name for {name} in {directory}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it onto `path`, on error remove it. The kept file gets the
    mode of any newly created file (0666 minus the umask), whether or not `path` existed before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp(path.parent, path.name)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill a folder all or nothing: yields a temporary sibling folder; when the block succeeds it replaces `path`
    (an existing folder there is removed first), when it fails the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, 2-space indent, trailing newline (byte-identical for equal inputs)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, dumps_json(obj))


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file a user gave; missing or not UTF-8 is one line naming it."""
    from harness.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found", path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None


def read_json(path: str | Path) -> Any:
    from harness.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError("file not found", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", path) from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    """One hash over an ordered list of files: names (relative to root) and bytes."""
    h = hashlib.sha256()
    for p in paths:
        name = str(p.relative_to(root)) if root else p.name
        h.update(name.encode("utf-8") + b"\0")
        h.update(sha256_file(p).encode("ascii"))
    return h.hexdigest()


def remove_stale_temps(directory: str | Path) -> int:
    """Delete temp files left by a killed writer. Returns how many were removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    n = 0
    for p in directory.iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n
