"""Challenge profiles: everything about a submission that differs between text-to-image challenges, as data.

A profile is one TOML file (the shipped ones live in `harness/challenges/profiles/`): prompt format and how it is
flattened, images per prompt, the file-name template, image format and size rules, the archive layout and name, the
official metric(s) and a description of the real reference set. `load_profile(NAME | FILE.toml)` reads one, failing
with one line (file:line: key) on a syntax error, an unknown key or a bad value.

File-name template fields (all 1-based): `{index}` the image's position among all images, `{prompt}` the prompt's
number, `{image}` the image's number within its prompt. Image `index` belongs to prompt (index-1)//K + 1, where K is
images_per_prompt: the K images of a prompt are K per-index seeds of the same prompt.
"""

from __future__ import annotations

import re
import string
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from harness.config import from_dict
from harness.errors import UserError

DEFAULT = "imageclef2024-task1"
_TEMPLATE_FIELDS = {"index", "prompt", "image"}
_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg")}
# What the metric names of a profile may be: the 2024 evaluator's (harness.score) and the 2025 ones (metrics_2025).
KNOWN_METRICS = ("fid-softmax", "inception-score", "fid", "fidelity", "agreement", "diversity", "fbd")


@dataclass
class PromptSpec:
    format: Literal["lines", "json-pairs"] = "lines"
    images_per_prompt: int = 1

    def validate(self) -> None:
        if self.images_per_prompt < 1:
            raise UserError(f"prompts.images_per_prompt: must be >= 1, got {self.images_per_prompt}")


@dataclass
class ImageSpec:
    file_template: str = "{index:05d}.png"
    format: Literal["png", "jpeg"] = "png"
    max_pixels: int = 4096 * 4096
    same_size: bool = True
    size: list[int] | None = None  # [width, height] when the challenge prescribes one

    def validate(self) -> None:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(self.file_template) if f is not None}
            self.file_template.format(index=1, prompt=1, image=1)
        except (ValueError, KeyError, IndexError) as e:
            raise UserError(f"images.file_template: {self.file_template!r} is not a valid template ({e})") from None
        unknown = names - _TEMPLATE_FIELDS
        if unknown:
            raise UserError(f"images.file_template: unknown field(s) {', '.join(sorted(unknown))}; use "
                            "{index}, {prompt}, {image}")
        if "index" not in names and not {"prompt", "image"} <= names:
            raise UserError(f"images.file_template: {self.file_template!r} must contain {{index}}, or both "
                            "{prompt} and {image}, so every image gets its own name")
        if "/" in self.file_template or "\\" in self.file_template:
            raise UserError("images.file_template: no folders in file names (archive.folder sets the folder)")
        ext = Path(self.file_template.format(index=1, prompt=1, image=1)).suffix
        allowed = {".png"} if self.format == "png" else {".jpg", ".jpeg"}
        if ext not in allowed:
            raise UserError(f"images.file_template: extension {ext!r} does not fit images.format {self.format!r} "
                            f"(use {' or '.join(sorted(allowed))})")
        if self.max_pixels < 1:
            raise UserError(f"images.max_pixels: must be >= 1, got {self.max_pixels}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise UserError(f"images.size: expected [width, height], got {self.size}")

    @property
    def pil_format(self) -> str:
        return _FORMATS[self.format][0]


@dataclass
class ArchiveSpec:
    kind: Literal["zip"] = "zip"
    name: str = "{team}_submission.zip"
    folder: str = ""  # "" = images at the zip's top level
    manifest: bool = False  # include the harness's manifest.csv beside the images

    def validate(self) -> None:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.name) if f is not None}
        except ValueError as e:
            raise UserError(f"archive.name: {self.name!r} is not a valid template ({e})") from None
        if fields - {"team"}:
            raise UserError(f"archive.name: only {{team}} may be used, got {', '.join(sorted(fields - {'team'}))}")
        if not self.name.endswith(".zip") or "/" in self.name:
            raise UserError(f"archive.name: {self.name!r} must be a file name ending in .zip")
        if self.folder and (self.folder.startswith("/") or ".." in self.folder.split("/")
                            or not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", self.folder)):
            raise UserError(f"archive.folder: {self.folder!r} must be a relative folder of letters, digits, ._-")


@dataclass
class HubSpec:
    """Where a challenge publishes its data on the Hugging Face hub (`harness data fetch NAME [--test]`)."""
    train_dataset: str | None = None  # training images with captions / QA
    test_dataset: str | None = None  # the organisers' scoring repo (a dataset repo)
    test_split: str | None = None  # its split holding the real reference images
    prompts_file: str | None = None  # file of test_dataset holding the test prompts
    real_mapping_file: str | None = None  # file of test_dataset: prompt number -> real image ids


@dataclass
class ChallengeProfile:
    name: str
    title: str = ""
    reference: str = ""  # the real reference set, in words
    metrics: list[str] = field(default_factory=list)
    hub: HubSpec = field(default_factory=HubSpec)
    prompts: PromptSpec = field(default_factory=PromptSpec)
    images: ImageSpec = field(default_factory=ImageSpec)
    archive: ArchiveSpec = field(default_factory=ArchiveSpec)
    source: str = ""  # where it was loaded from (set by the loader, not a TOML key)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise UserError(f"name: {self.name!r}: use letters, digits, '.', '-' or '_'")
        bad = [m for m in self.metrics if m not in KNOWN_METRICS]
        if bad:
            raise UserError(f"metrics: unknown metric(s) {', '.join(bad)}; known: {', '.join(KNOWN_METRICS)}")

    # ------------------------------------------------------------------------------------------- naming

    @property
    def k(self) -> int:
        return self.prompts.images_per_prompt

    def file_name(self, index: int) -> str:
        """Name of image `index` (1-based among all images)."""
        p, j = divmod(index - 1, self.k)
        return self.images.file_template.format(index=index, prompt=p + 1, image=j + 1)

    def expected_names(self, n_prompts: int) -> list[str]:
        return [self.file_name(i) for i in range(1, n_prompts * self.k + 1)]

    def zip_name(self, team: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", team):
            raise UserError(f"--team {team!r}: use letters, digits, '-' or '_' (max 64), starting with a letter or "
                            "digit")
        return self.archive.name.format(team=team)

    def entry(self, name: str) -> str:
        return f"{self.archive.folder}/{name}" if self.archive.folder else name

    # ------------------------------------------------------------------------------------------- prompts

    def read_prompts(self, path: str | Path):
        """The prompt file in this challenge's format, as a `harness.prompts.PromptFile` (one entry per prompt,
        not per image)."""
        from harness.prompts import read_json_pair_prompts, read_prompt_file

        if self.prompts.format == "json-pairs":
            return read_json_pair_prompts(path)
        self.check_lines_source(str(path))
        return read_prompt_file(path)

    def check_lines_source(self, source: str) -> None:
        """A .json file under a one-prompt-per-line profile is a mistake (its lines would become prompts)."""
        if source.lower().endswith(".json"):
            raise UserError(f"a JSON prompt file, but the challenge {self.name} reads one prompt per line; pass "
                            "--challenge imageclef2025-task2 (or a profile with prompts.format = \"json-pairs\")",
                            source)

    def image_prompts(self, prompts: list[str]) -> list[str]:
        """One entry per image: each prompt K times, in order (image i belongs to prompt (i-1)//K + 1)."""
        return [p for p in prompts for _ in range(self.k)]


# ----------------------------------------------------------------------------------------------- loading


def shipped_names() -> list[str]:
    root = resources.files("harness.challenges").joinpath("profiles")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def _key_line(text: str, message: str) -> int | None:
    """Line of the first key named in a from_dict message (`Section.key: ...` or `unknown key(s) a, b`)."""
    m = re.search(r"unknown key\(s\) ([\w-]+)", message) or re.match(r"(?:\w+\.)*([\w-]+):", message)
    if not m:
        return None
    key = m.group(1)
    for i, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"\s*(\[\s*)?{re.escape(key)}\s*(=|\])", line):
            return i
    return None


def parse_profile(text: str, source: str) -> ChallengeProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None)
        raise UserError(f"not valid TOML ({getattr(e, 'msg', e)})", source, line) from None
    if "source" in data:
        raise UserError("unknown key(s) source (set by the loader)", source, _key_line(text, "unknown key(s) source"))
    try:
        profile = from_dict(ChallengeProfile, data, "profile")
    except UserError as e:
        msg = str(e)
        raise UserError(msg, source, _key_line(text, msg)) from None
    profile.source = source
    return profile


def load_profile(name_or_path: str | Path | None = None) -> ChallengeProfile:
    """A shipped profile by name, or a TOML file; None = the 2024 default (today's behaviour)."""
    spec = str(name_or_path) if name_or_path else DEFAULT
    if spec.endswith(".toml") or "/" in spec:
        from harness.io import read_text

        return parse_profile(read_text(spec, "challenge profile"), str(Path(spec)))
    if spec not in shipped_names():
        raise UserError(f"--challenge {spec!r}: no such challenge (shipped: {', '.join(shipped_names())}; or pass a "
                        "FILE.toml)")
    ref = resources.files("harness.challenges").joinpath("profiles", f"{spec}.toml")
    return parse_profile(ref.read_text(encoding="utf-8"), spec)
