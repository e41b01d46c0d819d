"""`harness generate RUN --prompts FILE`: the model-agnostic generation driver.

One image per prompt line. Image i (1-based index among non-empty prompt lines) is written to
`<images_dir>/<i:05d>.png` from a seed derived only from (base seed, i), so the same index gives the same image
whatever the batch size, the number of processes, or how often the run was interrupted and resumed.

Model families plug in through `Generator` (below) and a loader named in harness/families/registry.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from harness.errors import UserError
from harness.io import atomic_path, dumps_json, remove_stale_temps, write_text
from harness.runs import Run

MANIFEST = "manifest.csv"
GENERATION_JSON = "generation.json"
MANIFEST_FIELDS = ["index", "prompt", "filename", "seed", "model"]
RECORDS = "records.csv"  # Generator.image_records, when a family gives them


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def image_seed(base_seed: int, index: int) -> int:
    """Per-image seed from (base seed, 1-based index): stable across runs, batch sizes and processes."""
    digest = hashlib.sha256(f"harness-image-seed:{base_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Generator(ABC):
    """What a model family implements so `harness generate` can drive it.

    Contract:
      * `generate(prompts, seeds)` returns one uint8 RGB array (H, W, 3) per prompt, in order;
      * image k depends only on (prompts[k], seeds[k]) and the model, never on the rest of the batch
        (draw every random tensor of sample k from a `torch.Generator` seeded with seeds[k]);
      * encodings of repeated prompts should be computed once and reused (a 5,000-line test file has 260 unique).
    """

    @abstractmethod
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]: ...

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """Model identity for the manifest: family, base model ids, adapters, sampler settings."""

    def image_records(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]] | None:
        """Optional: one dict per image saying how it was made beyond (prompt, seed, model) - e.g. which training
        image the retrieval baseline returned. A pure function of (prompts[k], seeds[k]) like the images, so
        `generate_images` writes them all up front to images/records.csv (None: no such file)."""
        return None

    def identity(self) -> dict[str, Any]:
        """`info()` without where things happen to live (run folder names and paths): what decides the pixels.
        Content hashes in `info()` carry the identity, so a copied or moved run (`cp -r runs/a runs/b`) keeps
        its images valid, and resuming it regenerates nothing."""
        return location_free(self.info())

    def model_key(self) -> str:
        """Short stable tag of `identity()`, written in every manifest row and PNG."""
        return hashlib.sha256(dumps_json(self.identity()).encode()).hexdigest()[:12]


# Keys of `info()` that name a location, not a model: left out of the generation identity (see Generator.identity).
LOCATION_KEYS = frozenset({"run_id", "run", "run_dir", "path", "folder", "dir"})


def location_free(info: Any) -> Any:
    if isinstance(info, dict):
        return {k: location_free(v) for k, v in info.items() if k not in LOCATION_KEYS}
    if isinstance(info, (list, tuple)):
        return [location_free(v) for v in info]
    return info


# `harness generate` options that only some families honour (RunKind.generate_options): override key -> option.
OPTIONAL_OVERRIDES = {"scheduler": "--scheduler", "negative_prompt": "--negative-prompt", "height": "--height",
                      "width": "--width"}


def load_generator(run: Run, overrides: dict[str, Any] | None = None) -> Generator:
    """The generator of `run`, by the loader its family registered (harness/families/registry.py). An optional
    override its kind does not honour is refused (one line naming the option and the family), before loading."""
    from harness.families.registry import generator_loader, kinds, run_kind

    loader: Callable[[Run, dict], Generator] = generator_loader(run.family, run.config_path)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    supported = run_kind(run.family).generate_options
    for key, option in OPTIONAL_OVERRIDES.items():
        if key in given and key not in supported:
            others = ", ".join(k.name for k in kinds() if key in k.generate_options)
            raise UserError(f"{option} is not supported by the {run.family} family (supported by: {others})",
                            run.dir)
    return loader(run, given)


# --------------------------------------------------------------------------------------------------------------
# The trivial generator used by tests (and by quickstart before a model is trained): a seeded colour field.


class TestPatternGenerator(Generator):
    """Deterministic noise-textured colour fields; the colour depends on the prompt, the texture on the seed."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, size: int = 64, delay_s: float = 0.0):
        self.size = size
        self.delay_s = delay_s  # simulated model time, so tests can kill a run mid-way


    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        import time

        out = []
        for prompt, seed in zip(prompts, seeds):
            time.sleep(self.delay_s)
            rng = np.random.default_rng(seed)
            colour = np.frombuffer(hashlib.sha256(prompt.encode()).digest()[:3], dtype=np.uint8).astype(np.int16)
            noise = rng.integers(-40, 41, size=(self.size, self.size, 3), dtype=np.int16)
            out.append(np.clip(colour + noise, 0, 255).astype(np.uint8))
        return out

    def info(self) -> dict[str, Any]:
        return {"family": "test-pattern", "size": self.size}


def load_test_pattern(run: Run, overrides: dict[str, Any]) -> Generator:
    cfg = run.config()
    return TestPatternGenerator(size=int(cfg.get("size", 64)), delay_s=float(cfg.get("delay_s", 0.0)))


# --------------------------------------------------------------------------------------------------------------
# Writing and checking images.


def is_jpeg_name(name: str | Path) -> bool:
    """A challenge profile may ask for JPEG files; the format follows the file name's extension."""
    return Path(name).suffix.lower() in (".jpg", ".jpeg")


def encode_image(img: np.ndarray, meta: dict[str, str], name: str | Path) -> bytes:
    """PNG (iTXt metadata) or, for a .jpg name, baseline JPEG quality 95 with the metadata as a JSON comment: the
    metadata is what lets a resume keep an image, so both formats carry it."""
    if not is_jpeg_name(name):
        return encode_png(img, meta)
    import json

    _check_array(img)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=95, comment=json.dumps(meta, sort_keys=True))
    return buf.getvalue()


def _check_array(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"generator returned {img.dtype} {img.shape}; expected uint8 (H, W, 3)")


def encode_png(img: np.ndarray, meta: dict[str, str]) -> bytes:
    _check_array(img)
    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_itxt(k, v)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def _png_meta(index: int, prompt: str, seed: int, model: str) -> dict[str, str]:
    return {"harness:index": str(index), "harness:prompt": prompt, "harness:seed": str(seed), "harness:model": model}


def existing_image_problem(path: Path, meta: dict[str, str]) -> str | None:
    """Why `path` is not an image we would write with `meta` (None: it is, and fully decodes as an RGB PNG).
    The header is checked against the bomb limit first: a planted 12000x12000 PNG is not decoded."""
    from harness.images import decode, open_header

    if not path.is_file():
        return "missing"
    try:
        with open_header(path, name="") as im:
            want = "JPEG" if is_jpeg_name(path) else "PNG"
            if im.format != want or im.mode != "RGB":
                return f"{im.format} {im.mode} data, not an RGB {want}"
            decode(im)
            if want == "JPEG":
                import json

                try:
                    text = json.loads(im.info.get("comment", b"{}"))
                except ValueError:
                    text = {}
            else:
                text = getattr(im, "text", {}) or {}
    except UserError as e:
        return str(e)
    except Exception as e:  # PIL raises many types for broken files
        return f"incomplete ({type(e).__name__}: {e})"
    if any(text.get(k) != v for k, v in meta.items()):
        return "made with another prompt, seed or model (metadata differs)"
    return None


def existing_image_ok(path: Path, meta: dict[str, str]) -> bool:
    """True when `path` fully decodes as RGB PNG and carries exactly the metadata we would write."""
    return existing_image_problem(path, meta) is None


@dataclass
class GenerateReport:
    images_dir: Path
    total: int
    generated: int
    skipped: int
    manifest: Path
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def write_manifest(images_dir: Path, prompts: Sequence[str], base_seed: int, model_key: str,
                   name: Callable[[int], str] = image_name) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_FIELDS)
    for i, p in enumerate(prompts, start=1):
        w.writerow([i, p, name(i), image_seed(base_seed, i), model_key])
    return write_text(images_dir / MANIFEST, buf.getvalue())


def write_records(generator: Generator, images_dir: Path, prompts: Sequence[str], base_seed: int,
                  name: Callable[[int], str] = image_name) -> Path | None:
    """images/records.csv: index, filename and the generator's `image_records` columns (none: no file; a stale one
    from another generator is removed)."""
    path = images_dir / RECORDS
    records = generator.image_records(prompts, [image_seed(base_seed, i) for i in range(1, len(prompts) + 1)])
    if records is None:
        path.unlink(missing_ok=True)
        return None
    columns = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "filename", *columns])
    for i, r in enumerate(records, start=1):
        w.writerow([i, name(i), *(r.get(c, "") for c in columns)])
    return write_text(path, buf.getvalue())


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and list(rows[0].keys()) != MANIFEST_FIELDS:
        raise UserError(f"unexpected manifest columns {list(rows[0].keys())}", path)
    return rows


def distributed_shard() -> tuple[int, int]:
    """(rank, world size) when launched by `accelerate launch` / torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# What a generation.json must agree on for its images to be kept (the rest, `settings`, is a record).
IDENTITY_FIELDS = ("prompts_sha256", "n_prompts", "base_seed", "model", "model_key")
# Settings that do not change which image is drawn but can move a pixel by one grey level: CPU/GPU kernels sum in an
# order that depends on the batch shape and the thread count (and the device). Recorded, and a change warned about.
PIXEL_SETTINGS = ("batch_size", "threads", "device")


def generation_settings(batch_size: int, device: str | None = None) -> dict[str, Any]:
    import sys

    threads = None
    if "torch" in sys.modules:  # the test-pattern family never imports torch; every model family does
        threads = sys.modules["torch"].get_num_threads()
    return {"batch_size": batch_size, "threads": threads, "device": device}


def _read_generation_json(path: Path) -> dict[str, Any]:
    import json

    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e}); pass --overwrite to start the images again", path) from None
    if not isinstance(old, dict):
        raise UserError("not a generation record; pass --overwrite to start the images again", path)
    old = dict(old)
    if isinstance(old.get("model"), dict):
        old["model"] = location_free(old["model"])  # records written before identities left locations out
    return old


def remove_stale_images(images_dir: Path, n: int, name: Callable[[int], str] = image_name) -> list[Path]:
    """Delete the images past `n` (an --overwrite with a shorter prompt file): they are in no manifest, and a
    folder must hold exactly one image per prompt. With another naming (a challenge profile), an image file of the
    folder that image 1..n does not name is stale (the folder is generate's own)."""
    stale = []
    if name is image_name:
        for p in images_dir.glob("[0-9][0-9][0-9][0-9][0-9].png"):
            if int(p.stem) > n:
                p.unlink(missing_ok=True)
                stale.append(p)
        return sorted(stale)
    keep = {name(i) for i in range(1, n + 1)}
    for p in images_dir.iterdir():
        if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.name not in keep:
            p.unlink(missing_ok=True)
            stale.append(p)
    return sorted(stale)


def generate_images(
    generator: Generator,
    prompts: Sequence[str],
    images_dir: Path,
    *,
    base_seed: int = 0,
    batch_size: int = 8,
    prompts_sha256: str = "",
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    on_batch: Callable[[int], None] | None = None,
    barrier: Callable[[], None] | None = None,
    device: str | None = None,
    warn: Callable[[str], None] | None = None,
    name: Callable[[int], str] = image_name,
) -> GenerateReport:
    """Generate one image per prompt into `images_dir`, resuming where a previous (killed) run stopped.

    Memory stays flat in N: each batch is written and dropped before the next one is made. An image that comes out
    degenerate (constant: what a NaN/inf tensor becomes once cast to uint8) is never written: the run stops with a
    UserError naming its index. `device` is recorded (with the batch size and thread count) in generation.json;
    resuming with other values is allowed, but `warn` is told, since it may move a pixel by one grey level.
    `name(i)` is image i's file name (a challenge profile's template; default 00001.png ...); a .jpg name writes
    JPEG. `prompts` has one entry per image: K images of a prompt are K entries (K per-index seeds).
    """
    import time

    from harness.images import degenerate_reason

    if not prompts:
        raise UserError("no prompts to generate")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    rank, world = shard or distributed_shard()
    model_key = generator.model_key()

    gen_meta: dict[str, Any] = {
        "prompts_sha256": prompts_sha256,
        "n_prompts": len(prompts),
        "base_seed": base_seed,
        "model": generator.identity(),
        "model_key": model_key,
    }
    settings = generation_settings(batch_size, device)
    history: list[dict[str, Any]] = []
    gen_json = images_dir / GENERATION_JSON
    if gen_json.exists() and not overwrite:
        old = _read_generation_json(gen_json)
        import json

        if {k: old.get(k) for k in IDENTITY_FIELDS} != json.loads(dumps_json(gen_meta)):
            raise UserError(
                "holds images from a different prompt file, seed or model; pass --overwrite to replace them "
                "or --out to write elsewhere",
                images_dir,
            )
        history = [h for h in old.get("settings", []) if isinstance(h, dict)]
    changed = [k for k in PIXEL_SETTINGS if history and history[-1].get(k) != settings[k]]
    images_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        remove_stale_temps(images_dir)
        if overwrite:
            remove_stale_images(images_dir, len(prompts), name)
        # Every setting images of this folder were made with, in order (one entry per change).
        record = {**gen_meta, "settings": history + ([settings] if not history or changed else [])}
        write_text(gen_json, dumps_json(record))
        # The manifest is a pure function of (prompts, seed, model), so it is written first and in one piece.
        write_manifest(images_dir, prompts, base_seed, model_key, name)
        write_records(generator, images_dir, prompts, base_seed, name)
    if barrier is not None:
        barrier()  # other ranks start writing only after rank 0 has cleaned stale temps and written the manifest

    # Batches are fixed, aligned blocks of the index space: [1..B], [B+1..2B], ... and rank r takes blocks
    # r, r+world, ... A block with any image missing is regenerated whole and only its missing images are written.
    # So every image is always computed in the same batch: CPU/GPU kernels sum in an order that depends on the
    # batch, and re-batching the leftovers of a killed run would change a pixel here and there.
    n = len(prompts)
    blocks = [list(range(s, min(s + batch_size, n + 1))) for s in range(1, n + 1, batch_size)][rank::world]
    todo: list[tuple[list[int], list[int]]] = []
    skipped = 0
    for block in blocks:
        missing = [
            i for i in block
            if overwrite or not existing_image_ok(images_dir / name(i),
                                                  _png_meta(i, prompts[i - 1], image_seed(base_seed, i), model_key))
        ]
        skipped += len(block) - len(missing)
        if missing:
            todo.append((block, missing))
    warnings_: list[str] = []
    if changed and skipped and todo:
        old = history[-1]
        was = ", ".join(f"{k} {old.get(k)}" for k in changed)
        now = ", ".join(f"{k} {settings[k]}" for k in changed)
        warnings_.append(f"{images_dir}: the {skipped} image(s) kept were made with {was}; this run uses {now}. "
                         "New images may differ by one grey level here and there from an uninterrupted run "
                         f"(kernels sum in another order); for bit-identical output resume with {was}.")
        for w in warnings_:
            (warn or (lambda _m: None))(w)

    t0 = time.perf_counter()
    generated = 0
    for block, missing in todo:
        block_prompts = [prompts[i - 1] for i in block]
        seeds = [image_seed(base_seed, i) for i in block]
        images = generator.generate(block_prompts, seeds)
        if len(images) != len(block):
            raise RuntimeError(f"generator returned {len(images)} images for {len(block)} prompts")
        encoded = []
        for i, p, s, img in zip(block, block_prompts, seeds, images):
            if i not in missing:
                continue
            img = np.asarray(img)
            data = encode_image(img, _png_meta(i, p, s, model_key), name(i))
            reason = degenerate_reason(img)
            if reason:
                raise UserError(f"image {i} ({name(i)}, prompt {p!r}) came out as a {reason}; nothing of its "
                                "batch was written (images already written are kept)", images_dir)
            encoded.append((i, data))
        for i, data in encoded:  # the block is checked whole before any of it is written
            with atomic_path(images_dir / name(i)) as tmp:
                tmp.write_bytes(data)
        generated += len(missing)
        if on_batch:
            on_batch(len(block))
    return GenerateReport(
        images_dir=images_dir,
        total=len(prompts),
        generated=generated,
        skipped=skipped,
        manifest=images_dir / MANIFEST,
        seconds=time.perf_counter() - t0,
        extra={"warnings": warnings_, "settings": settings},
    )


def check_images_dir(images_dir: Path, prompts: Sequence[str]) -> list[str]:
    """Problems that stop `images_dir` from being exactly one valid image per prompt (empty list = complete)."""
    problems = []
    manifest = images_dir / MANIFEST
    if not manifest.is_file():
        return [f"{manifest}: missing (run `harness generate` first)"]
    rows = read_manifest(manifest)
    if len(rows) != len(prompts):
        problems.append(f"{manifest}: {len(rows)} rows for {len(prompts)} prompts")
    for row, prompt in zip(rows, prompts):
        if row["prompt"] != prompt:
            problems.append(f"{manifest}: row {row['index']} prompt differs from the prompt file")
            break
    for row in rows:
        meta = _png_meta(int(row["index"]), row["prompt"], int(row["seed"]), row["model"])
        problem = existing_image_problem(images_dir / row["filename"], meta)
        if problem:
            problems.append(f"{images_dir / row['filename']}: {problem}")
    return problems
