"""`harness rate make`: a blinded, randomised realism-rating study over runs' images and real control images.

Blinding: every sampled image (generated PNG or real JPEG, any size) is decoded, centre-cropped to a square,
resized to one common size and re-encoded as a baseline JPEG with no metadata, so neither the format, the size,
PNG text chunks nor EXIF tell a source apart; the page names each image only by a random id drawn after the
shuffle, shows one generic alt text, and its order is a seeded random permutation (and reshuffled per rater in the
browser). `key.json` (never sent to raters) maps ids back to sources, original files and their sha256.

Strata (`--by`): the case type of an image from its captions (`harness.captions.image_strata`): `stratum` is the
full "procedure/main finding" label, `finding` is normal vs abnormal (a pathology: polyp, oesophagitis, ulcerative
colitis, Barrett's), `procedure` colonoscopy/gastroscopy. A generated image's stratum comes from its prompt; a real
image's from all its captions, and the caption shown with it is drawn (seeded) among those that state that case type.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

from harness import __version__
from harness.errors import UserError
from harness.io import dumps_json, read_json, sha256_bytes, sha256_file, write_text
from harness.runs import Run

KEY_FORMAT = "harness-rate-key/1"
CSV_FORMAT = "harness-rate/1"
CSV_COLUMNS = ["study", "rater", "item", "position", "likert", "turing", "answered_at"]
REAL_SOURCE = "real:val"
LIKERT_LABELS = ("Very unrealistic", "Unrealistic", "Neutral", "Realistic", "Very realistic")
BY_CHOICES = ("stratum", "finding", "procedure")
ABNORMAL = {"polyp", "oesophagitis", "ulcerative-colitis", "barretts"}  # harness.captions.PATHOLOGIES, slugged
JPEG_QUALITY = 90  # one encoder setting for every source: compression artefacts cannot tell real from generated
ID_HEX = 8


@dataclass(frozen=True)
class Candidate:
    source: str
    path: Path
    prompt: str
    stratum: str


@dataclass
class MakeConfig:
    runs: list[Path]
    out: Path
    per_source: int
    real: Literal["val", "none"] = "val"
    by: str | None = None
    seed: int = 0
    turing: bool = False
    split: Path | None = None
    data: Path | None = None
    size: int | None = None  # default: the smallest side among the sampled images (no source is upscaled)
    title: str = "Image realism rating"
    overwrite: bool = False

    def validate(self) -> None:
        if not self.runs:
            raise UserError("give at least one RUN")
        if self.per_source < 1:
            raise UserError(f"--per-source must be >= 1, got {self.per_source}")
        if self.by is not None and self.by not in BY_CHOICES:
            raise UserError(f"--by must be one of {', '.join(BY_CHOICES)}, not {self.by!r}")
        if self.real not in ("val", "none"):
            raise UserError(f"--real must be 'val' or 'none', not {self.real!r}")
        if self.turing and self.real == "none":
            raise UserError("--turing needs real images to tell apart: use --real val")
        if self.size is not None and self.size < 16:
            raise UserError(f"--size must be >= 16 pixels, got {self.size}")


def case_type(label: str, by: str | None) -> str:
    """The `--by` key of an `image_strata` label ('colonoscopy/polyp')."""
    if by is None:
        return "all"
    procedure, _, finding = label.partition("/")
    if by == "stratum":
        return label
    if by == "procedure":
        return procedure
    return "abnormal" if finding in ABNORMAL else "normal"


# ------------------------------------------------------------------------------------------------------- sources


def run_candidates(run: Run, by: str | None) -> list[Candidate]:
    """Every generated image of a run (manifest order), with its prompt and case type."""
    from harness.captions import image_strata
    from harness.generate import MANIFEST, read_manifest

    manifest = run.images_dir / MANIFEST
    if not manifest.is_file():
        raise UserError(f"no generated images (missing {MANIFEST}); run `harness generate {run.dir}` first", manifest)
    out = []
    for k, r in enumerate(read_manifest(manifest), start=2):
        p = run.images_dir / r["filename"]
        if not p.is_file():
            raise UserError(f"image {r['filename']} listed in the manifest is missing; finish it with "
                            f"`harness generate {run.dir}`", manifest, k)
        out.append(Candidate(run.id, p, r["prompt"], case_type(image_strata([r["prompt"]]), by)))
    if not out:
        raise UserError("manifest lists no images", manifest)
    return out


def real_candidates(runs: list[Run], cfg: MakeConfig) -> tuple[list[Candidate], dict[str, Any]]:
    """Validation images of every run's split (no model of the study trained on them), one caption each."""
    from harness.captions import image_strata
    from harness.data import load_devset
    from harness.score import ScoreConfig, resolve_real_set

    names: set[str] | None = None
    info: dict[str, Any] = {}
    for run in runs:
        real = resolve_real_set(run, ScoreConfig(real="val", split=cfg.split, data=cfg.data))
        here = {p.name for p in real.images.paths}
        names = here if names is None else names & here
        info = real.info
    assert names is not None
    if not names:
        raise UserError("the runs' splits share no validation image; rate runs trained on one split, or use "
                        "--real none", cfg.split or runs[0].dir)
    devset = load_devset(Path(info["data_dir"]))
    captions = devset.captions_by_image()
    out = []
    for name in sorted(names):
        caps = captions[name]
        label = case_type(image_strata(caps), cfg.by)
        fitting = [c for c in caps if case_type(image_strata([c]), cfg.by) == label] or caps
        prompt = random.Random(f"{cfg.seed}:caption:{name}").choice(sorted(fitting))
        out.append(Candidate(REAL_SOURCE, devset.image_path(name), prompt, label))
    info = {k: info[k] for k in ("data_dir", "csv_sha256", "split", "split_sha256") if k in info}
    return out, info


def allocate(counts: dict[str, int], n: int, rng: random.Random) -> dict[str, int]:
    """n draws spread as evenly as possible over strata with `counts` available (round robin in a seeded order of
    strata, skipping a stratum once it is used up)."""
    order = sorted(counts)
    rng.shuffle(order)
    quota = {s: 0 for s in order}
    left = n
    while left:
        open_ = [s for s in order if quota[s] < counts[s]]
        for s in open_:
            if not left:
                break
            quota[s] += 1
            left -= 1
    return quota


def sample_source(cands: list[Candidate], n: int, seed: int, stratified: bool) -> list[Candidate]:
    source = cands[0].source
    if len(cands) < n:
        raise UserError(f"source {source} has only {len(cands)} images, fewer than --per-source {n}")
    rng = random.Random(f"{seed}:sample:{source}")
    if not stratified:
        return rng.sample(cands, n)
    by: dict[str, list[Candidate]] = {}
    for c in cands:
        by.setdefault(c.stratum, []).append(c)
    quota = allocate({s: len(v) for s, v in by.items()}, n, rng)
    out: list[Candidate] = []
    for s in sorted(by):
        out += rng.sample(by[s], quota[s])
    return out


# ---------------------------------------------------------------------------------------------------- encoding


def blind_jpeg(path: Path, size: int) -> bytes:
    """Centre square crop, resized to `size`, baseline JPEG, no EXIF/ICC/comment: identical treatment per source."""
    from PIL import Image

    from harness.images import open_rgb

    with open_rgb(path) as im:
        w, h = im.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        sq = im.crop(box).resize((size, size), Image.Resampling.LANCZOS, reducing_gap=None)
    # A fresh image from the pixels alone: PIL carries `info` (a JPEG's COM comment, dpi, ICC profile) through
    # crop/resize and would write it back out.
    sq = Image.frombytes("RGB", sq.size, sq.tobytes())
    buf = io.BytesIO()
    sq.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False, progressive=False)
    return buf.getvalue()


def smallest_side(paths: list[Path]) -> int:
    from harness.images import open_header

    side = None
    for p in paths:
        with open_header(p) as im:
            s = min(im.size)
        side = s if side is None else min(side, s)
    assert side is not None
    return side


# -------------------------------------------------------------------------------------------------------- page


def page_template() -> str:
    return resources.files("harness.rating").joinpath("page.html").read_text(encoding="utf-8")


def render_page(study: dict[str, Any], items: list[dict[str, str]]) -> str:
    """The template with the study embedded as JSON (ids, prompts, data URIs: nothing else about an image)."""
    payload = {"study": study["study"], "title": study["title"], "turing": study["turing"], "n": len(items),
               "csv_columns": CSV_COLUMNS, "likert_labels": list(LIKERT_LABELS), "items": items}
    # JSON inside <script>: escape "<" so no text can close the element.
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    page = page_template()
    return page.replace("{{TITLE}}", html.escape(study["title"])).replace("{{STUDY_JSON}}", blob)


# -------------------------------------------------------------------------------------------------------- make


@dataclass
class MadeStudy:
    page: Path
    key: Path
    study: str
    n_items: int
    per_source: dict[str, dict[str, int]]


def make_study(cfg: MakeConfig, log: Callable[[str], None] = lambda s: None) -> MadeStudy:
    from harness.progress import progress
    from harness.runs import open_run

    cfg.validate()
    runs = [open_run(p) for p in cfg.runs]
    ids = [r.id for r in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"run {dup[0]} is given twice")
    sources = [run_candidates(r, cfg.by) for r in runs]
    real_info: dict[str, Any] = {}
    if cfg.real == "val":
        real, real_info = real_candidates(runs, cfg)
        sources.append(real)
    chosen: list[Candidate] = []
    for cands in sources:
        chosen += sample_source(cands, cfg.per_source, cfg.seed, stratified=cfg.by is not None)
    random.Random(f"{cfg.seed}:order").shuffle(chosen)
    id_rng = random.Random(f"{cfg.seed}:ids")
    item_ids: list[str] = []
    while len(item_ids) < len(chosen):
        cand = f"{id_rng.getrandbits(4 * ID_HEX):0{ID_HEX}x}"
        if cand not in item_ids:
            item_ids.append(cand)
    size = cfg.size or smallest_side([c.path for c in chosen])

    page_items: list[dict[str, str]] = []
    key_items: list[dict[str, Any]] = []
    with progress() as bar:
        task = bar.add_task("blinding images", total=len(chosen))
        for pos, (iid, c) in enumerate(zip(item_ids, chosen), start=1):
            data = base64.b64encode(blind_jpeg(c.path, size)).decode("ascii")
            page_items.append({"id": iid, "prompt": c.prompt, "src": "data:image/jpeg;base64," + data})
            key_items.append({"id": iid, "position": pos, "source": c.source, "stratum": c.stratum,
                              "prompt": c.prompt, "original": str(c.path.resolve()),
                              "original_sha256": sha256_file(c.path)})
            bar.advance(task)

    per_source: dict[str, dict[str, int]] = {}
    for c in chosen:
        per_source.setdefault(c.source, {}).setdefault(c.stratum, 0)
        per_source[c.source][c.stratum] += 1
    if cfg.by is not None and len({tuple(sorted(v.items())) for v in per_source.values()}) > 1:
        # A source short of images of one case type got more of the others: its overall mean mixes case types
        # differently, so only the per-case-type rows compare like with like.
        log("[yellow]warning:[/] the sources are not balanced the same way over case types (too few images of "
            "some); compare them per case type: " + "; ".join(
                f"{s}: " + ", ".join(f"{k} {n}" for k, n in sorted(v.items())) for s, v in sorted(per_source.items())))
    settings = {"per_source": cfg.per_source, "by": cfg.by, "seed": cfg.seed, "turing": cfg.turing,
                "real": cfg.real, "size": size, "jpeg_quality": JPEG_QUALITY}
    # The study id is a hash of everything that defines it: the same inputs give the same study (and bytes).
    identity = json.dumps([settings, [(k["id"], k["source"], k["original_sha256"], k["prompt"]) for k in key_items]])
    study_id = sha256_bytes(identity.encode("utf-8"))[:12]
    study = {"study": study_id, "title": cfg.title, "turing": cfg.turing}
    page_text = render_page(study, page_items)

    key = {
        "format": KEY_FORMAT,
        "study": study_id,
        "title": cfg.title,
        "harness_version": __version__,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": settings,
        "likert_labels": {str(i + 1): label for i, label in enumerate(LIKERT_LABELS)},
        "csv_format": CSV_FORMAT,
        "csv_columns": CSV_COLUMNS,
        "sources": [{"source": r.id, "kind": "run", "run_dir": str(r.dir.resolve()),
                     "config_sha256": sha256_file(r.config_path), "data": r.data_hashes()} for r in runs]
                   + ([{"source": REAL_SOURCE, "kind": "real", **real_info}] if cfg.real == "val" else []),
        "per_source": per_source,
        "order": "seeded permutation (settings.seed); the page reshuffles it per rater, seeded by the rater's name, "
                 "and each CSV row records the position the rater saw",
        "page_sha256": sha256_bytes(page_text.encode("utf-8")),
        "items": key_items,
    }
    out = Path(cfg.out)
    key_path, page_path = out / "key.json", out / "index.html"
    if key_path.is_file() and not cfg.overwrite:
        try:
            old = json.loads(key_path.read_text(encoding="utf-8")).get("study")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != study_id:
            raise UserError(f"already holds another study ({old}); ratings collected for it would no longer match. "
                            "Use another --out, or pass --overwrite", key_path)
    write_text(key_path, dumps_json(key))
    write_text(page_path, page_text)
    return MadeStudy(page_path, key_path, study_id, len(chosen), per_source)


def load_key(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    key = read_json(path)
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise UserError(f"not a study key from `harness rate make` (format {KEY_FORMAT!r} expected)", path)
    for k in ("study", "items", "sources", "settings"):
        if k not in key:
            raise UserError(f"study key has no {k!r}", path)
    return key
