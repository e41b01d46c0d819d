"""The development set in its official layout: `prompt-gt.csv` beside `images/`.

`prompt-gt.csv` is read exactly as published: UTF-8 (the real file is ASCII), an optional BOM (noted), CRLF or LF
line ends, `;` separator, header exactly `Prompt;Filename`, no quoting. Prompts are kept verbatim, typos included
("an an abnormality", "snareandtube", "lower-rigth"): the test prompts are dev captions, so a "cleaned" caption
would be a caption the model never sees at test time.

Two entry points:
- `load_devset(root)` (training, splitting): strict - the first bad row is a UserError naming file and line;
- `check_devset(root)` (`harness data check`): collects every problem in the CSV and in images/ into a report.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from harness.errors import UserError
from harness.io import sha256_bytes

CSV_NAME = "prompt-gt.csv"
IMAGES_DIR = "images"
HEADER = "Prompt;Filename"
SEPARATOR = ";"
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class CaptionRow:
    prompt: str
    filename: str
    line: int  # 1-based line number in prompt-gt.csv (the header is line 1)


@dataclass(frozen=True)
class CsvProblem:
    kind: str  # fields | duplicate | bad_filename | empty_field | blank_line
    line: int
    message: str


@dataclass
class ParsedCsv:
    path: Path
    sha256: str
    rows: list[CaptionRow]
    problems: list[CsvProblem]
    bom: bool
    line_endings: str  # "CRLF", "LF" or "mixed"
    n_bytes: int


def _decode(path: Path, data: bytes, base: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {base + e.start}); "
                        "prompt-gt.csv must be UTF-8/ASCII", path, line) from None


def bad_filename_reason(name: str) -> str | None:
    """Why `name` cannot be a file directly inside images/ (None when it is fine)."""
    if name != name.strip():
        return "leading/trailing whitespace"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name in (".", "..") or name.startswith(".."):
        return "is a relative path component"
    if "\x00" in name:
        return "contains a NUL byte"
    return None


def parse_csv(path: str | Path) -> ParsedCsv:
    """Read prompt-gt.csv. File-level problems (missing, empty, not UTF-8, wrong header or separator) raise
    UserError; row-level problems are collected so the checker can list them all."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found (expected {CSV_NAME} beside {IMAGES_DIR}/)", path)
    data = path.read_bytes()
    sha = sha256_bytes(data)
    bom = data.startswith(BOM)
    body = data[len(BOM):] if bom else data
    if not body.strip():
        raise UserError("empty file (expected the header 'Prompt;Filename' and caption rows)", path)
    text = _decode(path, body, len(BOM) if bom else 0)

    # Split on "\n" only and drop one trailing "\r": str.splitlines() would also split on \x0b, \x1c, U+2028 ...,
    # which would silently change a prompt.
    raw_lines = text.split("\n")
    n_crlf = sum(1 for ln in raw_lines[:-1] if ln.endswith("\r"))
    n_lf = len(raw_lines) - 1 - n_crlf
    line_endings = "CRLF" if n_lf == 0 and n_crlf else "LF" if n_crlf == 0 else "mixed"
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in raw_lines]
    if lines and lines[-1] == "":
        lines.pop()  # the final line ending

    header = lines[0]
    if header != HEADER:
        if header.strip() == HEADER:
            msg = f"header has extra whitespace: {header!r}; expected exactly {HEADER!r}"
        elif header.replace(",", ";") == HEADER or header.replace("\t", ";") == HEADER:
            sep = "','" if "," in header else "tab"
            msg = f"header uses {sep} as separator; expected {HEADER!r} with ';'"
        elif header.lower() == HEADER.lower():
            msg = f"header is {header!r}; expected exactly {HEADER!r} (case matters)"
        elif SEPARATOR in header and Path(header.rsplit(SEPARATOR, 1)[-1]).suffix:
            msg = f"missing header {HEADER!r} (the first line is a data row)"
        else:
            msg = f"first line is {header[:80]!r}; expected the header {HEADER!r}"
        raise UserError(msg, path, 1)

    rows: list[CaptionRow] = []
    problems: list[CsvProblem] = []
    seen: dict[tuple[str, str], int] = {}
    for i, line in enumerate(lines[1:], start=2):
        if line == "" or not line.strip():
            problems.append(CsvProblem("blank_line", i, "blank line"))
            continue
        fields = line.split(SEPARATOR)
        if len(fields) != 2:
            problems.append(CsvProblem("fields", i, f"{len(fields)} fields, expected 2 (Prompt;Filename, no quoting): "
                                                    f"{line[:100]!r}"))
            continue
        prompt, filename = fields
        if not prompt.strip() or not filename.strip():
            problems.append(CsvProblem("empty_field", i, f"empty {'prompt' if not prompt.strip() else 'filename'}"))
            continue
        reason = bad_filename_reason(filename)
        if reason:
            problems.append(CsvProblem("bad_filename", i, f"filename {filename!r} {reason}"))
            continue
        key = (prompt, filename)
        if key in seen:
            problems.append(CsvProblem("duplicate", i, f"duplicate of line {seen[key]}: {filename}"))
            continue
        seen[key] = i
        rows.append(CaptionRow(prompt=prompt, filename=filename, line=i))
    if not rows and not problems:
        raise UserError("no caption rows after the header", path)
    return ParsedCsv(path=path, sha256=sha, rows=rows, problems=problems, bom=bom, line_endings=line_endings,
                     n_bytes=len(data))


@dataclass
class DevSet:
    """Caption rows of a dev-set directory (verbatim, file order) plus the CSV's sha256."""

    root: Path
    csv_path: Path
    csv_sha256: str
    rows: list[CaptionRow]

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES_DIR

    def images(self) -> list[str]:
        """Sorted unique image filenames named by the CSV."""
        return sorted({r.filename for r in self.rows})

    @cached_property
    def _by_image(self) -> dict[str, list[str]]:
        by: dict[str, list[str]] = defaultdict(list)
        for r in self.rows:
            by[r.filename].append(r.prompt)
        return dict(by)

    def captions_by_image(self) -> dict[str, list[str]]:
        """filename -> its captions in CSV order."""
        return {k: list(v) for k, v in self._by_image.items()}

    def image_path(self, filename: str) -> Path:
        if bad_filename_reason(filename):
            raise UserError(f"not a plain image filename: {filename!r}", self.csv_path)
        return self.images_dir / filename

    def unique_prompts(self) -> list[str]:
        """Unique captions in order of first appearance."""
        return list(dict.fromkeys(r.prompt for r in self.rows))


def load_devset(root: str | Path) -> DevSet:
    """Strict loader for training and splitting: any malformed row is an error (file + line)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError("data directory not found (expected prompt-gt.csv beside images/)", root)
    parsed = parse_csv(root / CSV_NAME)
    if parsed.problems:
        p = parsed.problems[0]
        more = f" (and {len(parsed.problems) - 1} more problems; run `harness data check {root}`)" \
            if len(parsed.problems) > 1 else ""
        raise UserError(p.message + more, parsed.path, p.line)
    return DevSet(root=root, csv_path=parsed.path, csv_sha256=parsed.sha256, rows=parsed.rows)


# ----------------------------------------------------------------------------------------------------------- check


@dataclass
class Problem:
    kind: str
    message: str
    file: str | None = None
    line: int | None = None

    def where(self) -> str:
        if self.file and self.line:
            return f"{self.file}:{self.line}"
        return self.file or ""


# Kinds that describe the data rather than break it: the official dev set itself has 27 caption contradictions.
# Every other kind makes `harness data check` exit 2 (after printing and writing the full report).
WARNING_KINDS = frozenset({"contradiction", "blank_line"})

PROBLEM_KINDS = {
    "fields": "rows with the wrong number of fields",
    "empty_field": "rows with an empty prompt or filename",
    "blank_line": "blank lines",
    "duplicate": "duplicate rows",
    "bad_filename": "filenames that are not plain names",
    "missing_image": "images named in the CSV but missing",
    "undecodable": "images that do not decode",
    "not_rgb": "non-RGB images",
    "format_mismatch": "extension does not match the format",
    "tiny_image": "images too small to train on",
    "uncaptioned": "files in images/ with no caption",
    "contradiction": "caption contradictions within an image",
}


@dataclass
class CheckReport:
    root: str
    csv_sha256: str
    csv_bytes: int
    bom: bool
    line_endings: str
    rows: int
    unique_prompts: int
    unique_images: int  # named by the CSV
    files_in_images_dir: int
    captions_per_image: dict[str, float]  # min / mean / max
    size_histogram: dict[str, int]  # bucket label -> count (decodable images)
    distinct_sizes: int
    formats: dict[str, int]
    modes: dict[str, int]
    problems: list[Problem] = field(default_factory=list)

    @property
    def problem_counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["problem_counts"] = self.problem_counts
        return d


# Longer-side buckets (px) for the size histogram; the dev set spans 396-1920 px wide, dev-256 is 256 px.
SIZE_BUCKETS = (64, 128, 256, 512, 768, 1024, 1536, 2048)
MIN_SIDE = 32  # below this an image carries no usable content at the 64-256 px training resolutions


def size_bucket(width: int, height: int) -> str:
    side = max(width, height)
    lo = 0
    for b in SIZE_BUCKETS:
        if side <= b:
            return f"{lo + 1}-{b}px"
        lo = b
    return f">{SIZE_BUCKETS[-1]}px"


def _bucket_order(label: str) -> float:
    return math.inf if label.startswith(">") else int(label.split("-")[1][:-2])


def check_devset(root: str | Path, workers: int | None = None, on_image=None) -> CheckReport:
    """Check a dev-set directory: every CSV row and every file in images/. File-level CSV errors raise UserError
    (nothing else can be checked); everything else becomes a Problem in the report.

    `on_image()` is called once per inspected image (progress bar)."""
    from harness.captions import contradictions
    from harness.images import IMAGE_EXTENSIONS, inspect_image

    root = Path(root)
    if not root.is_dir():
        raise UserError("data directory not found (expected prompt-gt.csv beside images/)", root)
    parsed = parse_csv(root / CSV_NAME)
    csv_name = str(parsed.path)
    problems = [Problem(p.kind, p.message, csv_name, p.line) for p in parsed.problems]

    by_image: dict[str, list[CaptionRow]] = defaultdict(list)
    for r in parsed.rows:
        by_image[r.filename].append(r)
    images_dir = root / IMAGES_DIR
    on_disk = sorted(p.name for p in images_dir.iterdir() if p.is_file() and not p.name.startswith(".")) \
        if images_dir.is_dir() else []
    on_disk_set = set(on_disk)
    if not images_dir.is_dir():
        problems.append(Problem("missing_image", f"{IMAGES_DIR}/ directory not found; no image can be checked",
                                str(images_dir)))

    named = sorted(by_image)
    for name in named:
        if name not in on_disk_set and images_dir.is_dir():
            problems.append(Problem("missing_image", f"image named in the CSV is missing ({CSV_NAME} line "
                                    f"{by_image[name][0].line})", str(images_dir / name)))
    for name in on_disk:
        if name not in by_image:
            problems.append(Problem("uncaptioned", "file in images/ has no caption row"
                                    + ("" if Path(name).suffix.lower() in IMAGE_EXTENSIONS else " (not an image file)"),
                                    str(images_dir / name)))

    # Inspect every image file that is present (captioned or not). Decoding releases the GIL, so threads scale.
    to_inspect = [images_dir / n for n in on_disk if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    workers = workers or min(8, (os.cpu_count() or 2))

    def _inspect(p: Path):
        info = inspect_image(p)
        if on_image:
            on_image()
        return info

    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = list(pool.map(_inspect, to_inspect))

    sizes: Counter[str] = Counter()
    exact_sizes: set[tuple[int, int]] = set()
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    for info in infos:
        if info.format:
            formats[info.format] += 1
        if info.mode:
            modes[info.mode] += 1
        if not info.ok:
            problems.append(Problem("undecodable", info.problem or "does not decode", info.path))
            continue
        sizes[size_bucket(info.width, info.height)] += 1
        exact_sizes.add((info.width, info.height))
        if info.format_mismatch:
            problems.append(Problem("format_mismatch", info.format_mismatch, info.path))
        if not info.is_rgb:
            problems.append(Problem("not_rgb", f"mode {info.mode} ({_MODE_NAMES.get(info.mode or '', 'not RGB')}); "
                                    "it will be converted to RGB when loaded", info.path))
        if min(info.width, info.height) < MIN_SIDE:
            problems.append(Problem("tiny_image", f"{info.width}x{info.height} px (shorter side < {MIN_SIDE})",
                                    info.path))

    for name in named:
        for c in contradictions([r.prompt for r in by_image[name]]):
            problems.append(Problem("contradiction", c, str(images_dir / name)))

    counts = [len(v) for v in by_image.values()]
    return CheckReport(
        root=str(root),
        csv_sha256=parsed.sha256,
        csv_bytes=parsed.n_bytes,
        bom=parsed.bom,
        line_endings=parsed.line_endings,
        rows=len(parsed.rows),
        unique_prompts=len({r.prompt for r in parsed.rows}),
        unique_images=len(by_image),
        files_in_images_dir=len(on_disk),
        captions_per_image={
            "min": min(counts) if counts else 0,
            "mean": round(sum(counts) / len(counts), 3) if counts else 0.0,
            "max": max(counts) if counts else 0,
        },
        size_histogram=dict(sorted(sizes.items(), key=lambda kv: _bucket_order(kv[0]))),
        distinct_sizes=len(exact_sizes),
        formats=dict(sorted(formats.items())),
        modes=dict(sorted(modes.items())),
        problems=problems,
    )


_MODE_NAMES = {"L": "greyscale", "LA": "greyscale + alpha", "RGBA": "RGB + alpha", "CMYK": "CMYK", "P": "palette",
               "PA": "palette + alpha", "1": "1-bit", "I;16": "16-bit greyscale", "I": "32-bit greyscale",
               "F": "float greyscale", "YCbCr": "YCbCr"}
