"""The bad-input corpus: every case is generated into a temp folder by a builder (no binaries in the repo).

A case is (name, builder). The builder gets an empty work folder and returns the `harness` arguments to run
there; the runner then requires: exit code 2, exactly one error line naming the offending file, no traceback, and
no file created or changed in the work folder (nothing partial left behind).
"""

from __future__ import annotations

import io
import json
import shutil
import stat
import sys
import zipfile
from pathlib import Path
from typing import Callable

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for bad_data

import bad_data as bd  # noqa: E402

from harness.generate import TestPatternGenerator, generate_images  # noqa: E402
from harness.package import package_run  # noqa: E402
from harness.runs import create_run  # noqa: E402

Builder = Callable[[Path], list[str]]
CASES: dict[str, Builder] = {}


def case(name: str):
    def deco(fn: Builder) -> Builder:
        CASES[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------------- dev set -> `data check`

def _data_check(builder) -> Builder:
    return lambda tmp: ["data", "check", str(builder(tmp))]


for _name, _builder in {
    "csv with ',' separator": bd.bad_comma_separator,
    "csv missing header": bd.bad_missing_header,
    "csv empty file": bd.bad_empty_csv,
    "csv not UTF-8": bd.bad_non_utf8_csv,
    "csv extra fields": bd.bad_extra_fields,
    "csv filename with ../": bd.bad_dotdot_filename,
    "missing image": bd.bad_missing_image,
    "0-byte image": bd.bad_zero_byte_image,
    "truncated JPEG": bd.bad_truncated_jpeg,
    "PNG saved as .jpg": bd.bad_png_as_jpg,
    "RGBA image": bd.bad_rgba_png,
    "grey image": bd.bad_grey_jpeg,
    "CMYK image": bd.bad_cmyk_jpeg,
    "1x1 image": bd.bad_one_pixel,
    "20000x20000 PNG header (decompression bomb)": bd.bad_huge_png,
}.items():
    CASES[f"data check: {_name}"] = _data_check(_builder)


@case("split: csv extra fields (strict loader)")
def _split_extra_fields(tmp: Path) -> list[str]:
    return ["split", str(bd.bad_extra_fields(tmp)), "--val-images", "1", "--out", str(tmp / "split.json")]


@case("split: csv filename with ../ (strict loader)")
def _split_dotdot(tmp: Path) -> list[str]:
    return ["split", str(bd.bad_dotdot_filename(tmp)), "--val-images", "1", "--out", str(tmp / "split.json")]


# ------------------------------------------------------------------------------------------------ prompt files

@case("prompts check: non-UTF-8 prompt file")
def _prompts_latin1(tmp: Path) -> list[str]:
    return ["prompts", "check", str(bd.bad_non_utf8_prompts(tmp))]


@case("prompts check: empty prompt file")
def _prompts_empty(tmp: Path) -> list[str]:
    return ["prompts", "check", str(bd.bad_empty_prompts(tmp))]


def _test_run(tmp: Path, prompts: list[str] | None = None):
    run = create_run("test-pattern", {"size": 32}, root=tmp / "runs", run_id="tp")
    if prompts:
        generate_images(TestPatternGenerator(32), prompts, run.images_dir)
    return run


@case("generate: non-UTF-8 prompt file")
def _generate_latin1(tmp: Path) -> list[str]:
    run = _test_run(tmp)
    return ["generate", str(run.dir), "--prompts", str(bd.bad_non_utf8_prompts(tmp))]


# -------------------------------------------------------------------------------------------- package / validate

PROMPTS = ["Generate an image with no polyps.", "Generate an image containing text.", "Generate an image with 2 findings."]


@case("package: prompt count != image count")
def _package_mismatch(tmp: Path) -> list[str]:
    run = _test_run(tmp, PROMPTS)
    more = bd.prompt_file(tmp, PROMPTS + ["Generate an image from a gastroscopy procedure."])
    return ["package", str(run.dir), "--prompts", str(more), "--team", "t", "--out", str(tmp / "subs")]


def _zip_with(tmp: Path, info: zipfile.ZipInfo | str, data: bytes) -> list[str]:
    run = _test_run(tmp, PROMPTS)
    prompts = bd.prompt_file(tmp, PROMPTS)
    good, _ = package_run(run.images_dir, PROMPTS, "t", tmp / "good")
    bad = tmp / "bad.zip"
    shutil.copy(good, bad)
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr(info, data)
    shutil.rmtree(tmp / "good")
    return ["validate", str(bad), "--prompts", str(prompts)]


@case("validate: zip with ../ entry")
def _zip_dotdot(tmp: Path) -> list[str]:
    return _zip_with(tmp, "task1/../../escape.png", bd.png_bytes(Image.new("RGB", (32, 32))))


@case("validate: zip with absolute entry")
def _zip_abs(tmp: Path) -> list[str]:
    return _zip_with(tmp, "/tmp/escape.png", bd.png_bytes(Image.new("RGB", (32, 32))))


@case("validate: zip with symlink entry")
def _zip_symlink(tmp: Path) -> list[str]:
    info = zipfile.ZipInfo("task1/00004.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return _zip_with(tmp, info, b"/etc/passwd")


# ------------------------------------------------------------------------------------- splits and checkpoints

@case("train: split JSON with an image on both sides")
def _split_overlap(tmp: Path) -> list[str]:
    from harness.sample import sample_dir
    from harness.split import make_split

    content = make_split(sample_dir(), val_images=4, seed=0)
    content["val"] = sorted(content["val"] + content["train"][:1])
    (tmp / "split.json").write_text(json.dumps(content), encoding="utf-8")
    return ["train", "msdm-vae", "--split", str(tmp / "split.json"), "--data", str(sample_dir()),
            "--preset", "tiny", "--max-steps", "1"]


@case("train: --vae points at a run of another model family")
def _wrong_family_checkpoint(tmp: Path) -> list[str]:
    from harness.sample import sample_dir
    from harness.split import write_split

    write_split(sample_dir(), tmp / "split.json", val_images=4, seed=0)
    other = create_run("kandinsky-prior", {"summary": {}}, root=tmp / "runs", run_id="kprior")
    return ["train", "msdm-unet", "--split", str(tmp / "split.json"), "--data", str(sample_dir()),
            "--vae", str(other.dir), "--max-steps", "1"]


@case("generate: RUN is a checkpoint of a family that cannot generate")
def _generate_vae_run(tmp: Path) -> list[str]:
    run = create_run("msdm-vae", {"summary": {}}, root=tmp / "runs", run_id="vae")
    return ["generate", str(run.dir), "--prompts", str(bd.prompt_file(tmp, PROMPTS))]


# ------------------------------------------------------------- options out of range (click ranges, checked first)

def _a_file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("not a folder\n", encoding="utf-8")
    return tmp / "a-file"


def _generate_with(*extra: str) -> Builder:
    def build(tmp: Path) -> list[str]:
        run = _test_run(tmp)
        _a_file(tmp)
        return ["generate", str(run.dir), "--prompts", str(bd.prompt_file(tmp, PROMPTS)), *extra]

    return build


for _name, _extra in {
    "--batch-size 0": ("--batch-size", "0"),
    "--guidance nan": ("--guidance", "nan"),
    "--guidance inf": ("--guidance", "inf"),
    "--guidance -1": ("--guidance", "-1"),
    "--steps 0": ("--steps", "0"),
    "--seed -1 (below the RNG's range)": ("--seed", "-1"),
    "--seed 2**32 (above the RNG's range)": ("--seed", str(2**32)),
    "--threads 0": ("--threads", "0"),
    "--num-processes 0": ("--num-processes", "0"),
    "--device cuda:99 (no such GPU)": ("--device", "cuda:99"),
    "--device banana (unknown device)": ("--device", "banana"),
    "--out under a regular file": ("--out", "a-file/images"),
    "--out under /proc": ("--out", "/proc/harness-cannot-write-here/images"),
}.items():
    CASES[f"generate: {_name}"] = _generate_with(*_extra)


@case("split: --out under a regular file")
def _split_out_file(tmp: Path) -> list[str]:
    from harness.sample import sample_dir

    return ["split", str(sample_dir()), "--val-images", "4", "--out", str(_a_file(tmp) / "split.json")]


@case("split: --seed -1")
def _split_seed(tmp: Path) -> list[str]:
    from harness.sample import sample_dir

    return ["split", str(sample_dir()), "--seed", "-1", "--out", str(tmp / "split.json")]


@case("data check: --json under /proc")
def _data_check_json_proc(tmp: Path) -> list[str]:
    return ["data", "check", str(bd.good_devset(tmp)), "--json", "/proc/harness-cannot-write-here/report.json"]


@case("data check: --workers 0")
def _data_check_workers(tmp: Path) -> list[str]:
    return ["data", "check", str(bd.good_devset(tmp)), "--workers", "0"]


@case("prompts make: FILE under a regular file")
def _prompts_make_file(tmp: Path) -> list[str]:
    return ["prompts", "make", str(_a_file(tmp) / "p.txt"), "--n", "4", "--unique", "2"]


@case("prompts make: --n 0")
def _prompts_make_n0(tmp: Path) -> list[str]:
    return ["prompts", "make", str(tmp / "p.txt"), "--n", "0"]


@case("package: --out under a regular file")
def _package_out_file(tmp: Path) -> list[str]:
    run = _test_run(tmp, PROMPTS)
    prompts = bd.prompt_file(tmp, PROMPTS)
    return ["package", str(run.dir), "--prompts", str(prompts), "--team", "t", "--out", str(_a_file(tmp) / "subs")]


@case("quickstart: --workdir under /proc")
def _quickstart_proc(tmp: Path) -> list[str]:
    return ["quickstart", "--model", "test-pattern", "--workdir", "/proc/harness-cannot-write-here"]


@case("models make-tiny clip-text: DIR under a regular file")
def _tiny_clip_file(tmp: Path) -> list[str]:
    return ["models", "make-tiny", "clip-text", str(_a_file(tmp) / "tiny-clip")]


@case("models make-tiny clip-text: --hidden-size 9 (not divisible by the heads)")
def _tiny_clip_odd(tmp: Path) -> list[str]:
    return ["models", "make-tiny", "clip-text", str(tmp / "tiny-clip"), "--hidden-size", "9"]


# ------------------------------------------------------------------ degenerate or oversized images (package/validate)

def _black_images(run) -> None:
    """Replace every generated image by an all-black one with the same metadata (what a NaN tensor became)."""
    import numpy as np

    from harness.generate import _png_meta, encode_png, image_name, read_manifest

    for row in read_manifest(run.images_dir / "manifest.csv"):
        i = int(row["index"])
        meta = _png_meta(i, row["prompt"], int(row["seed"]), row["model"])
        (run.images_dir / image_name(i)).write_bytes(encode_png(np.zeros((32, 32, 3), np.uint8), meta))


@case("package: all-black images (NaN output)")
def _package_black(tmp: Path) -> list[str]:
    run = _test_run(tmp, PROMPTS)
    _black_images(run)
    return ["package", str(run.dir), "--prompts", str(bd.prompt_file(tmp, PROMPTS)), "--team", "t",
            "--out", str(tmp / "subs")]


@case("package: 9000x9000 image in the run (header only; never decoded)")
def _package_huge(tmp: Path) -> list[str]:
    run = _test_run(tmp, PROMPTS)
    (run.images_dir / "00002.png").write_bytes(bd.huge_png_header(9000, 9000))
    return ["package", str(run.dir), "--prompts", str(bd.prompt_file(tmp, PROMPTS)), "--team", "t",
            "--out", str(tmp / "subs")]


def _zip_replacing(tmp: Path, replace: dict[str, bytes]) -> list[str]:
    run = _test_run(tmp, PROMPTS)
    prompts = bd.prompt_file(tmp, PROMPTS)
    good, _ = package_run(run.images_dir, PROMPTS, "t", tmp / "good")
    bad = tmp / "bad.zip"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, replace.get(info.filename, zin.read(info.filename)))
    shutil.rmtree(tmp / "good")
    return ["validate", str(bad), "--prompts", str(prompts)]


@case("validate: all-black images")
def _zip_black(tmp: Path) -> list[str]:
    black = bd.png_bytes(Image.new("RGB", (32, 32)))
    return _zip_replacing(tmp, {f"task1/{i:05d}.png": black for i in range(1, len(PROMPTS) + 1)})


@case("validate: one constant (grey) image")
def _zip_constant(tmp: Path) -> list[str]:
    return _zip_replacing(tmp, {"task1/00002.png": bd.png_bytes(Image.new("RGB", (32, 32), (128, 128, 128)))})


@case("validate: every image identical")
def _zip_identical(tmp: Path) -> list[str]:
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    same = bd.png_bytes(Image.fromarray(noise, "RGB"))
    return _zip_replacing(tmp, {f"task1/{i:05d}.png": same for i in range(1, len(PROMPTS) + 1)})


@case("validate: 9000x9000 images (header only; never decoded)")
def _zip_9000(tmp: Path) -> list[str]:
    return _zip_replacing(tmp, {f"task1/{i:05d}.png": bd.huge_png_header(9000, 9000)
                                for i in range(1, len(PROMPTS) + 1)})


@case("validate: 12000x12000 image (above PIL's own bomb limit)")
def _zip_12000(tmp: Path) -> list[str]:
    return _zip_replacing(tmp, {"task1/00001.png": bd.huge_png_header(12000, 12000)})


# Accepted on purpose, reported rather than refused (documented behaviour, checked separately):
ACCEPTED = {
    "csv with UTF-8 BOM": "read, and `data check` reports the BOM (editors on Windows add one)",
    "prompt file with UTF-8 BOM": "the BOM is not part of the first prompt; `prompts check` reports it",
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with (size, mtime_ns): any created, removed or rewritten file shows up."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}
