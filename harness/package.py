"""`harness package` and `harness validate`: the submission zip.

Layout (the 2023 edition's naming; 2024 prescribed none):

    <team>_clef2024_medvqa.zip
      task1/00001.png ... task1/NNNNN.png    one image per prompt line, 1-based index among non-empty lines
      task1/manifest.csv                      index, prompt, filename, seed, model

The same checks run on the images before a zip is written and on any zip afterwards, so what `package` accepts
`validate` accepts too: exactly one image per prompt, each decodes, 3-channel RGB, one common size, lowercase
extension, nothing outside `task1/`, no subfolders, and (zip only) no absolute, `..`, symlink or duplicate entries.

That is the 2024 profile (the default). Another challenge profile (harness.challenges) sets the file names (K images
per prompt), the image format, the zip's name and folder ("" = flat) and whether the manifest goes in; the checks
are the same, and `validate_dir` runs them on a plain images folder.
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


def _profile(profile):
    from harness.challenges import load_profile

    return profile if profile is not None else load_profile()


def _check_image_bytes(name: str, data: bytes, max_pixels: int = MAX_PIXELS, want: str = "PNG"
                       ) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """(size, problem, pixel digest) for one PNG's bytes. The size limit is checked on the header, before a pixel
    is decoded (a 12000x12000 PNG costs its header, not 432 MB); the digest spots a set of identical images."""
    try:
        im = open_header(data, max_pixels, name=name)
    except UserError as e:
        return None, str(e), None
    with im:
        fmt, mode, size = im.format, im.mode, im.size
        if fmt != want:
            return size, f"{name}: is {fmt} data, not {want}", None
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
    max_pixels: int | None = None, profile=None, folder: str | None = None, manifest_required: bool | None = None,
) -> None:
    """Check a set of `task1/...` entries (the profile's folder; `folder` overrides it, "" for a plain images
    folder) against the prompt list (one entry per prompt); problems are appended to `report`.

    Content is checked too: a constant image (what a NaN/inf tensor becomes), a set of identical images, and
    images above `max_pixels` (read from the header) are problems."""
    profile = _profile(profile)
    max_pixels = max_pixels if max_pixels is not None else profile.images.max_pixels
    folder = profile.archive.folder if folder is None else folder
    manifest_required = profile.archive.manifest if manifest_required is None else manifest_required
    k = profile.k
    default = profile.images.file_template == "{index:05d}.png"

    def at(name: str) -> str:
        return f"{folder}/{name}" if folder else name

    expected_list = [at(n) for n in profile.expected_names(len(prompts))]
    expected = set(expected_list)
    manifest = at(MANIFEST)
    images = sorted(n for n in names if n != manifest)
    report.n_images = len(images)
    for n in images:
        p = PurePosixPath(n)
        if p.parent.as_posix() != (folder or "."):
            report.problems.append(f"{n}: outside {folder}/ or in a subfolder" if folder else f"{n}: in a subfolder")
        elif p.suffix != p.suffix.lower():
            report.problems.append(f"{n}: extension must be lowercase")
        elif default and not _IMAGE_NAME.match(p.name):
            report.problems.append(f"{n}: unexpected file (images are named 00001.png ...)")
        elif not default and n not in expected:
            report.problems.append(f"{n}: unexpected file (images are named {', '.join(profile.expected_names(1)[:2])}"
                                   " ...)")
    missing = [n for n in expected_list if n not in set(images)]
    extra = sorted(set(images) - expected)
    n_expected = len(expected_list)
    if len(images) != n_expected or missing or extra:
        detail = f"; missing {', '.join(missing[:5])}" if missing else ""
        detail += f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        detail += f"; unexpected {extra[0]}" if extra else ""
        per = f" x {k} per prompt" if k > 1 else ""
        report.problems.append(f"{len(images)} images for {len(prompts)} prompts{per}{detail}")

    sizes: dict[tuple[int, int], str] = {}
    digests: set[str | None] = set()
    checked = sorted(expected & set(images))
    for n in checked:
        size, problem, digest = _check_image_bytes(n, read(n), max_pixels, profile.images.pil_format)
        if problem:
            report.problems.append(problem)
        if size and size not in sizes:
            sizes[size] = n
        digests.add(digest)
    if len(checked) > 1 and len(digests) == 1 and None not in digests:
        report.problems.append(f"all {len(checked)} images are identical, pixel for pixel (a model that ignores its "
                               "prompt and seed, or one image copied N times)")
    if len(sizes) > 1 and profile.images.same_size:
        desc = ", ".join(f"{w}x{h} ({n})" for (w, h), n in list(sizes.items())[:3])
        report.problems.append(f"images have {len(sizes)} different sizes: {desc}")
    want = tuple(profile.images.size) if profile.images.size else None
    if want:
        for (w, h), n in sizes.items():
            if (w, h) != want:
                report.problems.append(f"{n}: {w}x{h}, the challenge asks for {want[0]}x{want[1]}")
    report.size = next(iter(sizes)) if len(sizes) == 1 else None

    if manifest not in names:
        if manifest_required:
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
    per_image = profile.image_prompts(list(prompts))
    if len(rows) != len(per_image):
        report.problems.append(f"{manifest}: {len(rows)} rows for {len(prompts)} prompts")
    for i, (row, prompt) in enumerate(zip(rows, per_image), start=1):
        if row["prompt"] != prompt or row["filename"] != profile.file_name(i):
            where = f"prompt line {i}" if k == 1 else f"image {i} (prompt {(i - 1) // k + 1})"
            report.problems.append(f"{manifest}: row {i} does not match {where} of the prompt file")
            break


def package_run(
    images_dir: Path, prompts: Sequence[str], team: str, out_dir: Path, profile=None,
) -> tuple[Path, ValidationReport]:
    """Validate `images_dir` against `prompts` (one entry per prompt), then write the zip atomically. Raises
    UserError on any problem."""
    profile = _profile(profile)
    out_path = Path(out_dir) / profile.zip_name(team)
    report = ValidationReport(source=str(images_dir), n_prompts=len(prompts))
    problems = check_images_dir(images_dir, profile.image_prompts(list(prompts)))
    if problems:
        raise UserError(
            f"{len(problems)} problem(s), first: {problems[0]} (run `harness generate` to complete the run)"
        )
    names = [profile.entry(n) for n in profile.expected_names(len(prompts))]
    names += [profile.entry(MANIFEST)] if profile.archive.manifest else []

    def read(name: str) -> bytes:
        return (images_dir / PurePosixPath(name).name).read_bytes()

    check_entries(names, read, prompts, report, profile=profile)
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


def validate_dir(images_dir: Path, prompts: Sequence[str], profile=None) -> ValidationReport:
    """The same checks on a plain images folder (what the organisers' script reads). The harness's own
    manifest.csv and generation.json are allowed beside the images (a manifest present must match)."""
    from harness.generate import GENERATION_JSON

    profile = _profile(profile)
    images_dir = Path(images_dir)
    report = ValidationReport(source=str(images_dir), n_prompts=len(prompts))
    names = []
    for p in sorted(images_dir.iterdir()):
        if p.name == GENERATION_JSON or p.name.startswith(".") and ".tmp" in p.name:
            continue
        if p.is_dir() or p.is_symlink():
            report.problems.append(f"{p.name}: {'subfolder' if p.is_dir() else 'symbolic link'} in the images folder")
            continue
        names.append(p.name)
    check_entries(names, lambda n: (images_dir / n).read_bytes(), prompts, report, profile=profile, folder="",
                  manifest_required=False)
    return report


def validate_zip(zip_path: Path, prompts: Sequence[str], profile=None) -> ValidationReport:
    """All checks on an existing zip; returns a report (problems listed) instead of raising on content issues."""
    profile = _profile(profile)
    folder = profile.archive.folder
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
                if not folder or n.rstrip("/") != folder:
                    allowed = f"only {folder}/ is allowed" if folder else "images lie at the top level"
                    report.problems.append(f"{n}: unexpected folder ({allowed})")
                continue
            if folder and not n.startswith(f"{folder}/"):
                report.problems.append(f"{n}: outside {folder}/")
                continue
            names.append(n)
        try:
            check_entries(names, zf.read, prompts, report, profile=profile)
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
