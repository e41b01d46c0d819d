"""`harness package` and `harness validate`: the submission zip.

Layout (the 2023 edition's naming; 2024 prescribed none):

    <team>_clef2024_medvqa.zip
      task1/00001.png ... task1/NNNNN.png    one image per prompt line, 1-based index among non-empty lines
      task1/manifest.csv                      index, prompt, filename, seed, model

The same checks run on the images before a zip is written and on any zip afterwards, so what `package` accepts
`validate` accepts too: exactly one image per prompt, each decodes, 3-channel RGB, one common size, lowercase
extension, nothing outside `task1/`, no subfolders, and (zip only) no absolute, `..`, symlink or duplicate entries.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import numpy as np

from harness.errors import UserError
from harness.generate import MANIFEST, MANIFEST_FIELDS, check_images_dir, image_name
from harness.images import decode, degenerate_reason, open_header
from harness.io import atomic_path, sha256_file

TASK_DIR = "task1"
_TEAM_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_IMAGE_NAME = re.compile(r"^\d{5}\.png$")
# Largest image a submission may hold: 4096x4096 (16.8 MP). The dev set's largest frame is 1920x1080 (2 MP) and the
# organisers' evaluator resizes every image to 299x299, so anything bigger is a mistake; and 5,000 such PNGs are
# already ~100 GB. Checked on the PNG header, so an oversized (or bomb) image is refused without being decoded.
MAX_PIXELS = 4096 * 4096


def zip_name(team: str) -> str:
    if not _TEAM_OK.match(team):
        raise UserError(f"--team {team!r}: use letters, digits, '-' or '_' (max 64), starting with a letter or digit")
    return f"{team}_clef2024_medvqa.zip"


@dataclass
class ValidationReport:
    source: str
    n_prompts: int
    n_images: int = 0
    size: tuple[int, int] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_image_bytes(name: str, data: bytes, max_pixels: int = MAX_PIXELS
                       ) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """(size, problem, pixel digest) for one PNG's bytes. The size limit is checked on the header, before a pixel
    is decoded (a 12000x12000 PNG costs its header, not 432 MB); the digest spots a set of identical images."""
    try:
        im = open_header(data, max_pixels, name=name)
    except UserError as e:
        return None, str(e), None
    with im:
        fmt, mode, size = im.format, im.mode, im.size
        if fmt != "PNG":
            return size, f"{name}: is {fmt} data, not PNG", None
        if mode != "RGB":
            return size, f"{name}: mode {mode}, expected 3-channel RGB (no alpha, no grey)", None
        try:
            decode(im)
            pixels = np.asarray(im)
        except Exception as e:  # PIL raises many types for broken files
            return size, f"{name}: does not decode ({type(e).__name__}: {e})", None
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    reason = degenerate_reason(pixels)
    return size, (f"{name}: {reason}" if reason else None), digest


def check_entries(
    names: Sequence[str], read: Callable[[str], bytes], prompts: Sequence[str], report: ValidationReport,
    max_pixels: int = MAX_PIXELS,
) -> None:
    """Check a set of `task1/...` entries against the prompt list; problems are appended to `report`.

    Content is checked too: a constant image (what a NaN/inf tensor becomes), a set of identical images, and
    images above `max_pixels` (read from the header) are problems."""
    expected = {f"{TASK_DIR}/{image_name(i)}" for i in range(1, len(prompts) + 1)}
    images = sorted(n for n in names if n != f"{TASK_DIR}/{MANIFEST}")
    report.n_images = len(images)
    for n in images:
        p = PurePosixPath(n)
        if p.parent.as_posix() != TASK_DIR:
            report.problems.append(f"{n}: outside {TASK_DIR}/ or in a subfolder")
        elif p.suffix != p.suffix.lower():
            report.problems.append(f"{n}: extension must be lowercase")
        elif not _IMAGE_NAME.match(p.name):
            report.problems.append(f"{n}: unexpected file (images are named 00001.png ...)")
    missing = sorted(expected - set(images))
    extra = sorted(set(images) - expected)
    if len(images) != len(prompts) or missing or extra:
        detail = f"; missing {missing[0]}" if missing else ""
        detail += f"; unexpected {extra[0]}" if extra else ""
        report.problems.append(f"{len(images)} images for {len(prompts)} prompts{detail}")

    sizes: dict[tuple[int, int], str] = {}
    digests: set[str | None] = set()
    checked = sorted(expected & set(images))
    for n in checked:
        size, problem, digest = _check_image_bytes(n, read(n), max_pixels)
        if problem:
            report.problems.append(problem)
        if size and size not in sizes:
            sizes[size] = n
        digests.add(digest)
    if len(checked) > 1 and len(digests) == 1 and None not in digests:
        report.problems.append(f"all {len(checked)} images are identical, pixel for pixel (a model that ignores its "
                               "prompt and seed, or one image copied N times)")
    if len(sizes) > 1:
        desc = ", ".join(f"{w}x{h} ({n})" for (w, h), n in list(sizes.items())[:3])
        report.problems.append(f"images have {len(sizes)} different sizes: {desc}")
    report.size = next(iter(sizes)) if len(sizes) == 1 else None

    manifest = f"{TASK_DIR}/{MANIFEST}"
    if manifest not in names:
        report.problems.append(f"{manifest}: missing")
        return
    try:
        rows = list(csv.DictReader(io.StringIO(read(manifest).decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as e:
        report.problems.append(f"{manifest}: unreadable ({e})")
        return
    if rows and list(rows[0].keys()) != MANIFEST_FIELDS:
        report.problems.append(f"{manifest}: columns {list(rows[0].keys())}, expected {MANIFEST_FIELDS}")
        return
    if len(rows) != len(prompts):
        report.problems.append(f"{manifest}: {len(rows)} rows for {len(prompts)} prompts")
    for i, (row, prompt) in enumerate(zip(rows, prompts), start=1):
        if row["prompt"] != prompt or row["filename"] != image_name(i):
            report.problems.append(f"{manifest}: row {i} does not match prompt line {i} of the prompt file")
            break


def package_run(
    images_dir: Path, prompts: Sequence[str], team: str, out_dir: Path
) -> tuple[Path, ValidationReport]:
    """Validate `images_dir` against `prompts`, then write the zip atomically. Raises UserError on any problem."""
    out_path = Path(out_dir) / zip_name(team)
    report = ValidationReport(source=str(images_dir), n_prompts=len(prompts))
    problems = check_images_dir(images_dir, prompts)
    if problems:
        raise UserError(
            f"{len(problems)} problem(s), first: {problems[0]} (run `harness generate` to complete the run)"
        )
    names = [f"{TASK_DIR}/{image_name(i)}" for i in range(1, len(prompts) + 1)] + [f"{TASK_DIR}/{MANIFEST}"]

    def read(name: str) -> bytes:
        return (images_dir / PurePosixPath(name).name).read_bytes()

    check_entries(names, read, prompts, report)
    if not report.ok:
        raise UserError(f"{report.problems[0]} ({len(report.problems)} problem(s) in {images_dir})")

    with atomic_path(out_path) as tmp:
        # PNGs are already deflated: storing them is as small and much faster than recompressing.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in names:
                zf.writestr(_entry(name), read(name))
    return out_path, report


def _entry(name: str) -> zipfile.ZipInfo:
    # Fixed timestamps and permissions: the same images always give a byte-identical zip.
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.compress_type = zipfile.ZIP_STORED
    return info


def validate_zip(zip_path: Path, prompts: Sequence[str]) -> ValidationReport:
    """All checks on an existing zip; returns a report (problems listed) instead of raising on content issues."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise UserError("file not found", zip_path)
    report = ValidationReport(source=str(zip_path), n_prompts=len(prompts))
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"not a readable zip ({e})", zip_path) from None
    with zf:
        infos = zf.infolist()
        seen: set[str] = set()
        names: list[str] = []
        for info in infos:
            n = info.filename
            mode = info.external_attr >> 16
            if n.startswith("/") or n.startswith("\\") or re.match(r"^[A-Za-z]:", n):
                report.problems.append(f"{n}: absolute path")
                continue
            if ".." in PurePosixPath(n.replace("\\", "/")).parts:
                report.problems.append(f"{n}: '..' path component")
                continue
            if stat.S_ISLNK(mode):
                report.problems.append(f"{n}: symbolic link")
                continue
            if n in seen:
                report.problems.append(f"{n}: duplicate entry")
                continue
            seen.add(n)
            if info.is_dir():
                if n.rstrip("/") != TASK_DIR:
                    report.problems.append(f"{n}: unexpected folder (only {TASK_DIR}/ is allowed)")
                continue
            if not n.startswith(f"{TASK_DIR}/"):
                report.problems.append(f"{n}: outside {TASK_DIR}/")
                continue
            names.append(n)
        try:
            check_entries(names, zf.read, prompts, report)
        except zipfile.BadZipFile as e:
            report.problems.append(f"{zip_path}: corrupt entry ({e})")
    return report


def zip_summary(path: Path) -> dict[str, object]:
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_prompts(path: Path) -> list[str]:
    """The prompt list of a test-prompt file (the data stage owns the reading rules)."""
    from harness.prompts import read_prompt_file

    return read_prompt_file(path).prompts


def iter_problems(report: ValidationReport, limit: int = 20) -> Iterable[str]:
    yield from report.problems[:limit]
    if len(report.problems) > limit:
        yield f"... and {len(report.problems) - limit} more"
