"""`harness score RUN|DIR`: FID, Inception Score, precision/recall/F1, KID, FD on DINOv2/CLIP and the organisers'
2024 metric, with bootstrap intervals and per-stratum KID.

Standard metrics are torch-fidelity's: its extractor modules produce the features (harness/features.py, cached per
image and per set by content hash) and its feature->metric functions turn them into numbers, with
calculate_metrics' defaults (generated = input1, real = input2; FID on Inception pool3 "2048"; IS on
"logits_unbiased", 10 splits, shuffled with seed 2020; precision/recall with k = 3 on VGG16 "fc2_relu" at 224 px,
torch-fidelity's `default_layer` for prc; F1 is its `f_score`). No metric maths is re-implemented here.

Real images reach the networks the way the generated ones did (`--real-preprocess match`, the default): the
training transform of harness/dataset.py (pad to square, antialiased bicubic resize) to the generated size, so a
perfect model scores FID ~ 0. `native` feeds the real files at their own size (torch-fidelity then squashes every
image to 299x299 with non-antialiased bilinear: what calling torch-fidelity on the folders does), `center-crop`
resizes the shorter side and crops the centre. The organisers' 2024 metric keeps the organisers' own pipeline.

The real set is, by default, the validation side of the run's split (no image the model trained on); `all` is the
whole dev set (the seed paper's protocol, which leaks training images - labelled so); or any folder. Results are
kept per real set and preprocessing in metrics.json ("results"; the top level is the latest scoring), and merged per
metric: re-scoring with fewer metrics, or without some weights, keeps what was computed before for the same images.

Every number is stored with N_gen / N_real; a metric whose weights are missing is stored as "not computed" with the
reason, never as a number from an untrained network. Results: RUN/metrics.json, DIR/metrics.json or --out (atomic).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from harness import __version__
from harness.config import to_dict
from harness.distributed import pick_device
from harness.errors import UserError
from harness.features import (
    CachedFeatures,
    ImageSet,
    MissingWeights,
    ResolvedWeights,
    TorchFidelityExtractor,
    code_id,
    default_layer,
    extract_features,
    resolve_weights,
    runtime_identity,
    stat_fingerprint,
    uint8_chw,
)
from harness.io import read_json, write_json
from harness.runs import Run

METRICS_FORMAT = "harness-metrics/2"
ALL_METRICS = ("fid", "is", "prc", "kid", "imageclef2024", "fd-dinov2", "fd-clip", "memorisation", "adherence")
# Metrics computed by their own module from the images (not from the extractor plan below).
OWN_METRICS = ("memorisation", "adherence")
DEFAULT_METRICS = ("fid", "is", "prc", "kid", "imageclef2024")
MIN_N = 2048  # below this FID is biased and the 2048-d covariance is rank-deficient
NOT_COMPUTED = "not computed"
INCEPTION = "inception-v3-compat"
# torch-fidelity's default layers: pool3 "2048" for FID/KID(/PRC), "logits_unbiased" for IS - one pass, one entry
INCEPTION_LAYERS = ("2048", "logits_unbiased")
# FD on other feature spaces (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics", and EDM2
# use DINOv2 ViT-L/14; CLIP ViT-L/14 is their CLIP baseline): extractors torch-fidelity 0.4 registers.
FD_EXTRACTORS = {"fd-dinov2": "dinov2-vit-l-14", "fd-clip": "clip-vit-l-14"}
REAL_PREPROCESS = ("match", "native", "center-crop")
SAMPLE_GRID = 16  # images recorded for the leaderboard's sample grid
KEPT_KEYS = ("fter",)  # top-level metrics.json entries written by other commands (harness/fter.py)


@dataclass
class ScoreConfig:
    real: str = "val"  # "val" | "all" | a folder of images
    split: Path | None = None  # SPLIT.json (default: the one named in the run's config)
    data: Path | None = None  # dev-set dir (default: the one named in the run's config)
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    # How real images are prepared: "match" = the training transform to the generated size (module docstring).
    real_preprocess: Literal["match", "native", "center-crop"] = "match"
    prc_features: Literal["vgg16", "inception"] = "vgg16"
    inception_weights: Path | None = None
    vgg_weights: Path | None = None
    imageclef_weights: Path | None = None
    clip_weights: Path | None = None
    batch_size: int = 64
    device: str = "auto"
    isc_splits: int = 10
    prc_neighborhood: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # lowered to min(N_gen, N_real) when the sets are smaller (shown and recorded)
    rng_seed: int = 2020  # torch-fidelity's default seed (IS shuffle, KID subsets); also seeds the bootstrap
    bootstrap: int = 200  # bootstrap replicates for the 95 % intervals (0 = none)
    strata: bool = True  # per-stratum KID (procedure x finding) when the real set has captions
    out: Path | None = None  # metrics file (default RUN/metrics.json or DIR/metrics.json)
    use_cache: bool = True
    # Reuse a metric value computed before from the very same cached features and parameters (the FID eigvals of a
    # 2048x2048 matrix and the 1000x1000 sqrtm cost seconds on CPU, the rest of a re-score milliseconds).
    reuse_metric_values: bool = True
    allow_download: bool = True
    # Test-only: accept weights whose sha256 is not the published one (randomly initialised extractors). Results are
    # labelled "unverified weights" and the leaderboard leaves them out unless asked.
    allow_unverified_weights: bool = False
    classifier: Path | None = None  # attribute classifier run (harness train attributes): adherence, memorisation
    memorisation_space: Literal["auto", "classifier", "inception", "pixels"] = "auto"  # see harness/memorisation.py

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown or not self.metrics:
            raise UserError(f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {','.join(ALL_METRICS)}")
        if self.real_preprocess not in REAL_PREPROCESS:
            raise UserError(f"--real-preprocess must be one of {', '.join(REAL_PREPROCESS)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.isc_splits < 1 or self.prc_neighborhood < 1 or self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise UserError("isc_splits, prc_neighborhood and kid_subsets must be >= 1, kid_subset_size >= 2")
        if self.bootstrap < 0:
            raise UserError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        from harness.memorisation import SPACES

        if self.memorisation_space not in SPACES:
            raise UserError(f"--memorisation-space must be one of {', '.join(SPACES)}")
        if self.memorisation_space == "classifier" and self.classifier is None:
            raise UserError("--memorisation-space classifier needs --classifier CLF_RUN")
        if "adherence" in self.metrics and self.classifier is None:
            raise UserError("--metrics adherence needs --classifier CLF_RUN (a run of `harness train attributes`)")


def parse_metrics(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    names = ["is" if m in ("isc", "inception-score") else m for m in names]
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------------ the sets


@dataclass
class GeneratedSet:
    images: ImageSet
    dir: Path
    prompts: list[str] | None  # prompt of each image (from the manifest), None for a bare folder
    generation: dict[str, Any]
    run: Run | None
    resolution: tuple[int, int] | None  # (width, height) when every image has it

    @property
    def label(self) -> str:
        return self.run.id if self.run else f"dir:{self.dir.name}"


def _sizes(paths: list[Path]) -> set[tuple[int, int]]:
    from PIL import Image

    out = set()
    for p in paths:
        with Image.open(p) as im:
            out.add(im.size)
    return out


def _folder_images(folder: Path) -> list[Path]:
    """torch-fidelity's folder rule: direct children, extension png/jpg/jpeg in any case, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def generated_set(run: Run) -> GeneratedSet:
    """RUN/images in manifest order (image i = prompt i), plus generation.json for provenance."""
    from harness.generate import GENERATION_JSON, MANIFEST, read_manifest

    manifest = run.images_dir / MANIFEST
    if not manifest.is_file():
        raise UserError(f"no generated images (missing {MANIFEST}); run `harness generate {run.dir}` first", manifest)
    rows = read_manifest(manifest)
    if not rows:
        raise UserError("manifest lists no images", manifest)
    paths = [run.images_dir / r["filename"] for r in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} images in the manifest are missing, e.g. {missing[0].name}; "
                        f"finish them with `harness generate {run.dir}`", run.images_dir)
    gen_json = run.images_dir / GENERATION_JSON
    generation = read_json(gen_json) if gen_json.is_file() else {}
    sizes = _sizes(paths)
    return GeneratedSet(ImageSet(f"{run.id}/images", paths), run.images_dir, [r["prompt"] for r in rows], generation,
                        run, next(iter(sizes)) if len(sizes) == 1 else None)


def folder_set(folder: Path) -> GeneratedSet:
    """Any folder of images (made elsewhere): sorted like torch-fidelity; prompts from a manifest.csv if present."""
    from harness.generate import MANIFEST, read_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("not a folder of images", folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        rows = read_manifest(manifest)
        paths, prompts = [folder / r["filename"] for r in rows], [r["prompt"] for r in rows]
    else:
        paths, prompts = _folder_images(folder), None
    if not paths:
        raise UserError("no .png/.jpg/.jpeg images in the folder", folder)
    sizes = _sizes(paths)
    return GeneratedSet(ImageSet(f"dir:{folder.name}", paths), folder, prompts, {}, None,
                        next(iter(sizes)) if len(sizes) == 1 else None)


@dataclass
class RealSet:
    images: ImageSet
    kind: str  # "val" | "all" | "dir"
    label: str  # short, shown on the leaderboard
    info: dict[str, Any]
    official: list[Path]  # the same set under the organisers' listing rule
    captions: list[list[str]] | None = None  # each image's captions (dev set only)


def find_config_value(d: Any, names: tuple[str, ...], accept: Callable[[str], bool] = bool) -> str | None:
    """First string value under any of `names` that `accept`s, searching nested dicts (trainer configs nest their
    data options; a key such as "split" may also hold a side name, hence the predicate)."""
    if isinstance(d, dict):
        for n in names:
            if isinstance(d.get(n), str) and accept(d[n]):
                return d[n]
        for v in d.values():
            found = find_config_value(v, names, accept)
            if found:
                return found
    return None


def recorded_data_paths(run: Run | None, config: dict) -> tuple[Path | None, Path | None]:
    """(dev-set dir, split file) a run was trained on, from its config. A recorded path that is no longer where it
    was is looked up through `Run.resolve_recorded` (beside a moved run, ...), whose error names every place tried."""

    def find(names: tuple[str, ...], looks_like: Callable[[str], bool], what: str) -> Path | None:
        value = find_config_value(config, names, looks_like)
        if value is None:
            return None
        if Path(value).exists() or run is None:
            return Path(value)
        return Path(run.resolve_recorded(value, what))

    # Trainers record absolute paths (a "data" key may also hold a nested dict or a side name: hence the shapes).
    data_dir = find(("data_dir", "data"), lambda v: Path(v).is_dir() or Path(v).is_absolute(), "dev-set directory")
    split_path = find(("split_path", "split"), lambda v: v.endswith(".json"), "split file")
    return data_dir, split_path


def resolve_real_set(run: Run | None, cfg: ScoreConfig) -> RealSet:
    from harness.imageclef2024 import list_images, official_name

    if cfg.real not in ("val", "all"):
        folder = Path(cfg.real)
        if not folder.is_dir():
            raise UserError("--real must be 'val', 'all' or an existing folder of images", folder)
        paths = _folder_images(folder)
        if not paths:
            raise UserError("no .png/.jpg/.jpeg images in the real-image folder", folder)
        images = ImageSet(f"dir:{folder.name}", paths)
        return RealSet(images, "dir", f"dir:{folder.name}", {"dir": str(folder.resolve())}, list_images(folder))

    from harness.data import load_devset

    config = run.config() if run else {}
    run_data, run_split = recorded_data_paths(run, config)
    data_dir = cfg.data or run_data
    if not data_dir:
        raise UserError(f"--real {cfg.real}: the run's config names no dev-set directory; pass --data DATA_DIR")
    devset = load_devset(Path(data_dir))
    info: dict[str, Any] = {"data_dir": str(Path(data_dir).resolve()), "csv_sha256": devset.csv_sha256}
    if cfg.real == "all":
        names = devset.images()
        label = "all-dev (leaks training images)"
        info["leaks_training_images"] = True
    else:
        from harness.split import check_split_matches, load_split

        split_path = cfg.split or run_split
        if not split_path:
            raise UserError("--real val: the run's config names no split; pass --split SPLIT.json --data DATA_DIR "
                            "(or --real all / --real DIR)")
        split = load_split(Path(split_path))
        check_split_matches(split, devset)
        trained_on = (run.data_hashes() if run else {}).get("split_sha256")
        if trained_on and trained_on != split.sha256:
            raise UserError(f"the run was trained with another split (sha256 {trained_on[:12]}...): its validation "
                            "images may be training images of this run; pass the run's own split", split.path)
        if not split.val:
            raise UserError("the split has no validation images", split.path)
        names = sorted(split.val)
        label = f"val:{split.sha256[:8]}"
        info.update(split=str(Path(split_path).resolve()), split_sha256=split.sha256, leaks_training_images=False)
    paths = [devset.image_path(n) for n in names]
    images = ImageSet(label, paths)
    by_image = devset.captions_by_image()
    return RealSet(images, cfg.real, label, info, [p for p in paths if official_name(p.name)],
                   [list(by_image.get(n, [])) for n in names])


# ------------------------------------------------------------------------------------------ real preprocessing


@dataclass(frozen=True)
class RealPreprocess:
    """How a real image file becomes the uint8 3xHxW tensor the extractor receives (see module docstring)."""

    mode: str  # match | native | center-crop
    size: int | None = None  # generated side length (match, center-crop)
    fit: str | None = None  # the training transform's fit for match ("pad" or "crop")

    def load(self, path: Path) -> torch.Tensor:
        if self.mode == "native":
            return uint8_chw(path)
        from harness.dataset import training_view

        img = training_view(path, int(self.size), self.fit or "pad")
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

    def shape_key(self, path: Path) -> Any:
        return (self.size, self.size)

    @property
    def preprocess_id(self) -> str:
        from harness import dataset
        from harness.images import to_rgb

        if self.mode == "native":
            return native_preprocess_id()
        code = code_id(RealPreprocess.load, dataset.training_view, dataset.open_for_training, dataset._resize,
                       dataset._place, dataset._scale, to_rgb)
        return f"{self.mode}:{self.size}:{self.fit}:{code}"

    @property
    def label(self) -> str:
        if self.mode == "native":
            return "native"
        if self.mode == "match":
            return f"match ({self.fit} to {self.size}px)"
        return f"center-crop to {self.size}px"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "size": self.size, "fit": self.fit, "label": self.label, "id": self.preprocess_id}


def native_preprocess_id() -> str:
    """Files at native size as torch-fidelity receives them (the generated side, and real under `native`)."""
    from harness.images import open_rgb, to_rgb

    return f"native:{code_id(uint8_chw, open_rgb, to_rgb)}"


def real_preprocess(cfg: ScoreConfig, gen: GeneratedSet) -> RealPreprocess:
    # The organisers' 2024 metric reads both sides its own way (numpy.resize quirk): only the others use this.
    if cfg.real_preprocess == "native" or set(cfg.metrics) <= {"imageclef2024"}:
        return RealPreprocess("native")
    res = gen.resolution
    if res is None or res[0] != res[1]:
        what = "images of several sizes" if res is None else f"{res[0]}x{res[1]} images"
        raise UserError(f"--real-preprocess {cfg.real_preprocess} brings the real images to the generated size, but "
                        f"the generated set has {what}; use --real-preprocess native", gen.dir)
    if cfg.real_preprocess == "center-crop":
        return RealPreprocess("center-crop", res[0], "crop")
    config = gen.run.config() if gen.run else {}
    fit = find_config_value(config, ("fit",), lambda v: v in ("pad", "crop")) or "pad"
    return RealPreprocess("match", res[0], fit)


# ------------------------------------------------------------------------------------------------------- results


@dataclass
class ScoreResult:
    path: Path
    data: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.data["metrics"]

    @property
    def warnings(self) -> list[str]:
        return self.data["warnings"]

    def summary_line(self) -> str:
        m, parts = self.metrics, []
        if m.get("fid", {}).get("status") == "ok":
            parts.append(f"FID {m['fid']['value']:.3f}")
        if m.get("is", {}).get("status") == "ok":
            parts.append(f"IS {m['is']['mean']:.3f}")
        if m.get("prc", {}).get("status") == "ok":
            parts.append(f"P {m['prc']['precision']:.3f} R {m['prc']['recall']:.3f} F1 {m['prc']['f1']:.3f}")
        if m.get("kid", {}).get("status") == "ok":
            parts.append(f"KID {m['kid']['mean']:.4f}")
        if m.get("imageclef2024", {}).get("status") == "ok":
            parts.append(f"2024-FD {m['imageclef2024']['fd']:.4f}")
        if m.get("adherence", {}).get("status") == "ok":
            parts.append(f"adherence {m['adherence']['value']:.3f}")
        skipped = [k for k, v in m.items() if v.get("status") != "ok"]
        if skipped:
            parts.append(f"not computed: {', '.join(skipped)}")
        n = f"N_gen={self.data['generated']['n']} N_real={self.data['real']['n']}"
        return f"{'; '.join(parts) or 'no metric computed'} ({n})"


def _not_computed(reason: str) -> dict[str, Any]:
    return {"status": NOT_COMPUTED, "reason": reason}


def _versions() -> dict[str, str]:
    import PIL
    import scipy
    import torch_fidelity
    import torchvision

    return {"harness": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "torch_fidelity": torch_fidelity.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "pillow": PIL.__version__}


def result_key(real_label: str, preprocess_mode: str) -> str:
    """Key of one real set's results inside metrics.json ("results")."""
    return f"{real_label} | {preprocess_mode}"


# --------------------------------------------------------------------------------------------------------- score


def metric_extractor(metric: str, cfg: ScoreConfig) -> str:
    if metric == "prc":
        return "vgg16" if cfg.prc_features == "vgg16" else INCEPTION
    if metric in FD_EXTRACTORS:
        return FD_EXTRACTORS[metric]
    if metric == "imageclef2024":
        return "imageclef2024"
    return INCEPTION


def score_run(run: Run, cfg: ScoreConfig | None = None, *, log: Callable[[str], None] | None = None) -> ScoreResult:
    """Score RUN/images (the manifest's images) against the real set; merges into RUN/metrics.json."""
    return score_images(generated_set(run), cfg, log=log)


def score_folder(folder: Path, cfg: ScoreConfig | None = None, *,
                 log: Callable[[str], None] | None = None) -> ScoreResult:
    """Score any folder of images (made elsewhere) on the same footing; merges into DIR/metrics.json or cfg.out."""
    return score_images(folder_set(folder), cfg, log=log)


def score_images(gen: GeneratedSet, cfg: ScoreConfig | None = None, *,
                 log: Callable[[str], None] | None = None) -> ScoreResult:
    from harness.progress import progress

    cfg = cfg or ScoreConfig()
    cfg.validate()
    log = log or (lambda s: None)
    real = resolve_real_set(gen.run, cfg)
    prep = real_preprocess(cfg, gen)
    device = pick_device(cfg.device)
    want = list(cfg.metrics)
    if "adherence" in want:  # a bad --classifier fails before any feature is extracted
        from harness.attributes import load_classifier

        load_classifier(cfg.classifier)
    n_gen, n_real = len(gen.images), len(real.images)

    # Which extractor serves which metric; every extractor sees both sides except Inception for IS alone.
    plan: dict[str, dict[str, Any]] = {}
    explicit = {INCEPTION: cfg.inception_weights, "vgg16": cfg.vgg_weights, "imageclef2024": cfg.imageclef_weights,
                FD_EXTRACTORS["fd-clip"]: cfg.clip_weights}
    for m in want:
        if m in OWN_METRICS:
            continue
        name = metric_extractor(m, cfg)
        if name == INCEPTION:
            layers: tuple[str, ...] = INCEPTION_LAYERS
        elif name == "imageclef2024":
            layers = ("softmax",)
        else:
            layers = (default_layer(name, "prc" if m == "prc" else "fid"),)
        entry = plan.setdefault(name, {"layers": layers, "real": False, "explicit": explicit.get(name)})
        entry["real"] = entry["real"] or m != "is"

    weights: dict[str, ResolvedWeights] = {}
    missing: dict[str, tuple[str, str]] = {}  # extractor -> (short reason, full message)
    for name, p in plan.items():
        try:
            weights[name] = resolve_weights(name, p["explicit"], allow_download=cfg.allow_download,
                                            allow_unverified=cfg.allow_unverified_weights)
        except MissingWeights as e:
            from harness.features import WEIGHTS

            missing[name] = (f"missing weights {WEIGHTS[name].filename}", str(e))
            log(f"[yellow]warning:[/] {name}: {e}")

    # The organisers' metric scores the manifest's images (their listing rule decides which names count).
    official_gen: ImageSet | None = None
    official_real: ImageSet | None = None
    if "imageclef2024" in weights:
        from harness.imageclef2024 import official_name

        listed = [p for p in gen.images.paths if official_name(p.name)]
        if listed and real.official:
            hashes = dict(zip(gen.images.paths, gen.images.hashes))
            official_gen = ImageSet(f"{gen.label} (organisers' listing)", listed, hashes=[hashes[p] for p in listed])
            official_real = ImageSet(f"{real.label} (organisers' listing)", real.official)
        else:
            why = "no image name ends in png/jpg/jpeg (the organisers' case-sensitive listing rule)"
            missing["imageclef2024"] = (why, f"{why}: {'generated' if not listed else 'real'} set")
            del weights["imageclef2024"]

    jobs = []
    for name in plan:
        if name not in weights:
            continue
        sides = [("gen", official_gen if name == "imageclef2024" else gen.images)]
        if plan[name]["real"]:
            sides.append(("real", official_real if name == "imageclef2024" else real.images))
        jobs.extend((name, side, image_set) for side, image_set in sides)

    built: dict[str, Any] = {}

    def maker(name: str) -> Callable[[], Any]:
        def make():
            if name not in built:
                if name == "imageclef2024":
                    from harness.imageclef2024 import OrganisersInception

                    built[name] = OrganisersInception(weights[name], device)
                else:
                    built[name] = TorchFidelityExtractor(name, plan[name]["layers"], weights[name], device)
            return built[name]
        return make

    feats: dict[tuple[str, str], CachedFeatures] = {}
    with progress() as bar:
        for i, (name, side, image_set) in enumerate(jobs):
            task = bar.add_task(f"{name} {side}", total=len(image_set))
            custom = side == "real" and name != "imageclef2024" and prep.mode != "native"
            identity = feature_identity(name, plan[name]["layers"], weights[name], device,
                                        prep.preprocess_id if side == "real" and name != "imageclef2024" else None)
            feats[(name, side)] = extract_features(
                image_set, identity, maker(name), batch_size=cfg.batch_size, use_cache=cfg.use_cache,
                load=prep.load if custom else None, shape_key=prep.shape_key if custom else None,
                on_progress=lambda k, t=task: bar.advance(t, k))
            if i + 1 == len(jobs) or jobs[i + 1][0] != name:
                built.pop(name, None)  # free this network (GPU memory) before the next one is built
    cache = {f"{n}/{s}": {"hit": f.hit, "key": f.key, "extracted": f.meta.get("images_extracted", 0)}
             for (n, s), f in feats.items()}

    ctx = _Context(cfg, feats, weights, missing, n_gen, n_real, gen, real)
    out = Path(cfg.out) if cfg.out else (gen.run.metrics_path if gen.run else gen.dir / "metrics.json")
    metrics: dict[str, Any] = {m: _compute_memo(m, ctx) for m in want if m not in OWN_METRICS}
    if "memorisation" in want:
        from harness.memorisation import compute_memorisation

        metrics["memorisation"] = compute_memorisation(gen, prep, cfg, device, out.parent, log)
    if "adherence" in want:
        metrics["adherence"] = _adherence(gen, cfg)

    warnings: list[str] = []
    computed = {k for k, v in metrics.items() if v.get("status") == "ok"}
    if min(n_gen, n_real) < MIN_N and computed & {"fid", "kid", "prc", "imageclef2024", *FD_EXTRACTORS}:
        warnings.append(f"N_gen={n_gen}, N_real={n_real} < {MIN_N}: FID is biased upward and the 2048-d covariance "
                        "is rank-deficient; compare only numbers computed at the same N")
    kid = metrics.get("kid", {})
    if kid.get("status") == "ok" and kid["subset_size"] < kid.get("subset_size_requested", kid["subset_size"]):
        warnings.append(f"KID subset size lowered from {kid['subset_size_requested']} to {kid['subset_size']} "
                        f"(N_gen={n_gen}, N_real={n_real})")
    if real.info.get("leaks_training_images"):
        warnings.append("real set = all dev images, which include the training images (seed paper's protocol)")
    prompts = prompt_match(gen, real)
    if prompts.get("matches") is False:
        warnings.append(prompts["warning"])
    unverified = sorted(n for n, w in weights.items() if not w.verified)
    if metrics.get("memorisation", {}).get("weights_verified") is False:
        unverified.append(f"{metrics['memorisation']['extractor']} (memorisation)")
    if unverified:
        warnings.append(f"UNVERIFIED weights for {', '.join(unverified)}: not a real score, kept off the leaderboard")

    config = gen.run.config() if gen.run else {}
    sample = _sample(gen)
    data = {
        "format": METRICS_FORMAT,
        "run_id": gen.run.id if gen.run else None,
        "family": config.get("family"),
        "scored": _dt.datetime.now().isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "seed": {"rng_seed": cfg.rng_seed, "generation_base_seed": gen.generation.get("base_seed")},
        "summary": config.get("summary", {}),
        "generated": {"dir": str(gen.dir.resolve()), "n": n_gen, "sha256": gen.images.sha256,
                      "stat_fingerprint": stat_fingerprint(gen.images.paths),
                      "resolution": list(gen.resolution) if gen.resolution else None, "sample": sample,
                      "generation": gen.generation, "data": gen.run.data_hashes() if gen.run else {}},
        "real": {"kind": real.kind, "label": real.label, "n": n_real, "sha256": real.images.sha256,
                 "preprocess": prep.to_dict(), **real.info},
        "prompts": prompts,
        "extractors": {n: {"layers": list(plan[n]["layers"]), "weights": w.to_dict()} for n, w in weights.items()},
        "unavailable_extractors": {n: detail for n, (_, detail) in missing.items()},
        "device": str(device),
        "feature_cache": cache,
        "libraries": _versions(),
        "unverified_weights": bool(unverified),
        "metrics": metrics,
        "warnings": warnings,
    }
    merged = merge_results(read_json(out) if out.is_file() else None, data, result_key(real.label, prep.mode))
    write_json(out, merged)
    if gen.run:
        gen.run.log(f"score: {', '.join(f'{k}={_short(v)}' for k, v in metrics.items())} (N_gen={n_gen}, "
                    f"N_real={n_real}, real={real.label}, preprocess={prep.label})")
    return ScoreResult(out, {k: v for k, v in merged.items() if k != "results"})


def _adherence(gen: GeneratedSet, cfg: ScoreConfig) -> dict[str, Any]:
    from harness.adherence import adherence_metric

    return adherence_metric(gen, cfg)


def _sample(gen: GeneratedSet) -> list[dict[str, str]]:
    """The first images that were scored (the leaderboard's grid draws these, not whatever the folder holds now)."""
    prompts = gen.prompts or [""] * len(gen.images)
    return [{"filename": p.name, "prompt": q, "sha256": h}
            for p, q, h in list(zip(gen.images.paths, prompts, gen.images.hashes))[:SAMPLE_GRID]]


def split_val_factor(gen: GeneratedSet, real: RealSet) -> int | None:
    """K when the generated prompts are exactly `--prompts split:val --images-per-prompt K` of this real set."""
    from harness.prompts import validation_prompts

    if real.kind != "val" or not gen.prompts or len(gen.prompts) % len(real.images):
        return None
    k = len(gen.prompts) // len(real.images)
    try:
        same = validation_prompts(real.info["data_dir"], real.info["split"], k) == gen.prompts
    except (UserError, KeyError):
        return None
    return k if same else None


def prompt_match(gen: GeneratedSet, real: RealSet) -> dict[str, Any]:
    """Whether the generated prompts are the real set's captions (else the score measures the prompt mix too)."""
    if real.captions is None:
        return {"matches": None, "reason": "real set is a folder: its captions are unknown"}
    if gen.prompts is None:
        return {"matches": None, "reason": "generated set has no manifest: its prompts are unknown"}
    real_caps = {c for caps in real.captions for c in caps}
    gen_prompts = set(gen.prompts)
    inside = sum(p in real_caps for p in gen.prompts)
    covered = sum(any(c in gen_prompts for c in caps) for caps in real.captions)
    out = {"matches": inside == len(gen.prompts), "prompts_in_real_captions": inside, "n_prompts": len(gen.prompts),
           "real_images_covered": covered, "n_real": len(real.captions)}
    k = split_val_factor(gen, real)
    if k:
        out["source"] = f"split:val x{k}"
    if not out["matches"]:
        out["warning"] = (f"PROMPT MISMATCH: {len(gen.prompts) - inside} of {len(gen.prompts)} generated prompts are "
                          f"not captions of the real set ({real.label}); the score then measures the prompt mix, not "
                          f"only the model. Generate with `--prompts split:val` to score against val")
    return out


def merge_results(previous: dict[str, Any] | None, new: dict[str, Any], key: str) -> dict[str, Any]:
    """metrics.json after scoring `new` under `key`: every real set keeps its own result ("results"), and within
    one real set a metric computed before survives a re-score that does not recompute it (fewer --metrics, missing
    weights), as long as the images on both sides are the same; the top level is the latest result."""
    results: dict[str, Any] = {}
    if isinstance(previous, dict) and str(previous.get("format", "")).startswith("harness-metrics/"):
        if isinstance(previous.get("results"), dict):
            results = dict(previous["results"])
        elif isinstance(previous.get("metrics"), dict) and isinstance(previous.get("real"), dict):
            old_prep = (previous["real"].get("preprocess") or {}).get("mode", "native")  # format 1 fed native sizes
            results = {result_key(previous["real"].get("label", "?"), old_prep): previous}
    doc = dict(new)
    old = results.get(key)
    same_images = (isinstance(old, dict) and old.get("generated", {}).get("sha256") == new["generated"]["sha256"]
                   and old.get("real", {}).get("sha256") == new["real"]["sha256"]
                   and (old.get("real", {}).get("preprocess") or {}).get("id") == new["real"]["preprocess"]["id"])
    if same_images:
        metrics, extractors = dict(new["metrics"]), dict(new["extractors"])
        kept = []
        for name, value in old.get("metrics", {}).items():
            if value.get("status") == "ok" and metrics.get(name, {}).get("status") != "ok":
                metrics[name] = {**value, "kept_from": value.get("kept_from") or old.get("scored")}
                kept.append(name)
                ex = value.get("extractor")
                if ex and ex in old.get("extractors", {}):
                    extractors.setdefault(ex, old["extractors"][ex])
        doc.update(metrics=metrics, extractors=extractors)
        if kept:
            doc["warnings"] = [*new["warnings"], f"kept from the scoring of {old.get('scored')}: {', '.join(kept)} "
                                                 "(same images; not recomputed this time)"]
        doc["unverified_weights"] = any(not v.get("weights_verified", True) for v in metrics.values()
                                        if v.get("status") == "ok")
    results[key] = doc
    # Entries other commands keep in metrics.json beside the scores (harness fter) survive a re-score.
    carried = {k: previous[k] for k in KEPT_KEYS if isinstance(previous, dict) and k in previous}
    return {**carried, **doc, "results": results}


def _metric_memo_key(metric: str, ctx: "_Context", extractor: str) -> str | None:
    """Content key of one metric value: the feature-cache keys it reads, its parameters, the library versions."""
    import scipy
    import torch_fidelity

    from harness.io import dumps_json, sha256_bytes

    sides = {s: ctx.feats[(extractor, s)].key for s in ("gen", "real") if (extractor, s) in ctx.feats}
    if "gen" not in sides:
        return None
    cfg = ctx.cfg
    params = {k: getattr(cfg, k) for k in ("isc_splits", "prc_neighborhood", "kid_subsets", "kid_subset_size",
                                           "rng_seed", "prc_features", "bootstrap", "strata")}
    material = {"metric": metric, "features": sides, "params": params, "torch_fidelity": torch_fidelity.__version__,
                "numpy": np.__version__, "scipy": scipy.__version__, "format": METRICS_FORMAT,
                "harness": __version__, "strata": _strata_signature(ctx) if metric == "kid" else None}
    return sha256_bytes(dumps_json(material).encode("utf-8"))


@dataclass
class _Context:
    cfg: ScoreConfig
    feats: dict[tuple[str, str], CachedFeatures]
    weights: dict[str, ResolvedWeights]
    missing: dict[str, tuple[str, str]]
    n_gen: int
    n_real: int
    gen: GeneratedSet
    real: RealSet


def _compute_memo(metric: str, ctx: _Context) -> dict[str, Any]:
    import json

    from harness.features import cache_root

    extractor = metric_extractor(metric, ctx.cfg)
    key = None if extractor in ctx.missing else _metric_memo_key(metric, ctx, extractor)
    path = cache_root() / "metrics" / f"{key}.json" if key else None
    if path is not None and ctx.cfg.use_cache and ctx.cfg.reuse_metric_values and path.is_file():
        try:
            return {**json.loads(path.read_text(encoding="utf-8")), "reused": True}
        except ValueError:
            pass  # damaged memo: recompute below
    out = _compute(metric, ctx)
    if path is not None and ctx.cfg.use_cache and out.get("status") == "ok":
        write_json(path, out)
    return {**out, "reused": False} if out.get("status") == "ok" else out


def feature_identity(name: str, layers: tuple[str, ...], weights: ResolvedWeights, device: torch.device,
                     real_preprocess_id: str | None = None) -> dict[str, Any]:
    """What decides an extractor's features (its cache key): network, layers, weights, preprocessing, runtime.
    Generated images pass None (native); real images pass their `RealPreprocess.preprocess_id`."""
    if name == "imageclef2024":
        from harness.imageclef2024 import OrganisersInception, preprocess

        pre = f"{OrganisersInception.preprocess_id}:{code_id(OrganisersInception, preprocess)}"
    else:
        pre = real_preprocess_id or native_preprocess_id()
    return {"extractor": name, "layers": sorted(layers), "weights_sha256": weights.sha256, "preprocess": pre,
            "dtype": "float32", **runtime_identity(device)}


def _short(v: dict[str, Any]) -> str:
    if v.get("status") != "ok":
        return NOT_COMPUTED
    for k in ("value", "mean", "f1", "fd"):
        if k in v:
            return f"{v[k]:.4g}"
    return "ok"


def _gen_strata(ctx: _Context) -> list[str] | None:
    """Stratum of each generated image: that of the real images its prompt is a caption of (most common, ties by
    name), so split:val prompts land in their image's stratum; else parsed from the prompt alone (a lone caption
    rarely names the procedure: "unknown/<finding>")."""
    from collections import Counter

    from harness.captions import image_strata

    if ctx.gen.prompts is None or ctx.real.captions is None:
        return None
    real_strata = [image_strata(caps) for caps in ctx.real.captions]
    k = split_val_factor(ctx.gen, ctx.real)
    if k:  # generated from `--prompts split:val`: image i is a caption of validation image i // k
        return [real_strata[i // k] for i in range(len(ctx.gen.prompts))]
    by_caption: dict[str, Counter] = {}
    for caps, stratum in zip(ctx.real.captions, real_strata):
        for c in set(caps):
            by_caption.setdefault(c, Counter())[stratum] += 1
    out = []
    for p in ctx.gen.prompts:
        votes = by_caption.get(p)
        out.append(min(votes, key=lambda k: (-votes[k], k)) if votes else image_strata([p]))
    return out


def _strata_signature(ctx: _Context) -> Any:
    from harness.captions import image_strata

    g = _gen_strata(ctx)
    if g is None or not ctx.cfg.strata:
        return None
    return [g, [image_strata(c) for c in ctx.real.captions or []]]


def _kid_strata(ctx: _Context, gen: torch.Tensor, real: torch.Tensor) -> dict[str, Any] | None:
    """KID per procedure x finding stratum (harness.captions.image_strata of the prompt / of the real image's
    captions): unbiased at small N, so a user sees which kinds of prompts a model fails."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    from harness.captions import image_strata

    g_strata = _gen_strata(ctx)
    if not ctx.cfg.strata or g_strata is None:
        return None
    r_strata = [image_strata(c) for c in ctx.real.captions or []]
    out: dict[str, Any] = {}
    for s in sorted(set(g_strata) | set(r_strata)):
        gi = [i for i, x in enumerate(g_strata) if x == s]
        ri = [i for i, x in enumerate(r_strata) if x == s]
        if min(len(gi), len(ri)) < 2:
            out[s] = {"status": NOT_COMPUTED, "reason": "fewer than 2 images on a side", "n_gen": len(gi),
                      "n_real": len(ri)}
            continue
        size = min(ctx.cfg.kid_subset_size, len(gi), len(ri))
        k = kid_features_to_metric(gen[gi], real[ri], kid_subsets=ctx.cfg.kid_subsets, kid_subset_size=size,
                                   rng_seed=ctx.cfg.rng_seed, verbose=False)
        out[s] = {"status": "ok", "mean": k["kernel_inception_distance_mean"],
                  "std": k["kernel_inception_distance_std"], "subset_size": size, "n_gen": len(gi), "n_real": len(ri)}
    return out


def _compute(metric: str, ctx: _Context) -> dict[str, Any]:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    from harness import stats

    cfg = ctx.cfg
    extractor = metric_extractor(metric, cfg)
    if extractor in ctx.missing:
        reason, detail = ctx.missing[extractor]
        return {**_not_computed(reason), "detail": detail}
    n_gen, n_real = ctx.n_gen, ctx.n_real
    w = ctx.weights[extractor]
    base = {"status": "ok", "extractor": extractor, "weights_sha256": w.sha256, "weights_verified": w.verified,
            "n_gen": n_gen, "n_real": n_real}
    gen = ctx.feats[(extractor, "gen")].features
    real = ctx.feats.get((extractor, "real"))
    real = real.features if real else None
    boot = {"n_boot": cfg.bootstrap, "seed": cfg.rng_seed}

    if metric == "fid" or metric in FD_EXTRACTORS:
        layer = default_layer(extractor, "fid")
        if min(n_gen, n_real) < 2:
            return _not_computed(f"{metric} needs at least 2 images on each side")
        out = fid_statistics_to_metric(fid_features_to_statistics(gen[layer]),
                                       fid_features_to_statistics(real[layer]), verbose=False)
        res = {**base, "layer": layer, "value": out["frechet_inception_distance"]}
        if cfg.bootstrap:
            res["interval"] = stats.bootstrap(stats.FID(), gen[layer], real[layer], point={"fid": res["value"]},
                                              **boot)["fid"].to_dict()
        return res
    if metric == "is":
        if n_gen < cfg.isc_splits:
            return _not_computed(f"IS over {cfg.isc_splits} splits needs at least {cfg.isc_splits} generated images")
        layer = default_layer(extractor, "isc")
        out = isc_features_to_metric(gen[layer], cfg.isc_splits, True, cfg.rng_seed)
        return {**base, "n_real": None, "layer": layer, "splits": cfg.isc_splits,
                "mean": out["inception_score_mean"], "std": out["inception_score_std"]}
    if metric == "kid":
        size = min(cfg.kid_subset_size, n_gen, n_real)
        if size < 2:
            return _not_computed("KID needs at least 2 images on each side")
        layer = default_layer(extractor, "kid")
        out = kid_features_to_metric(gen[layer], real[layer], kid_subsets=cfg.kid_subsets, kid_subset_size=size,
                                     rng_seed=cfg.rng_seed, verbose=False)
        res = {**base, "layer": layer, "subsets": cfg.kid_subsets, "subset_size": size,
               "subset_size_requested": cfg.kid_subset_size,
               "mean": out["kernel_inception_distance_mean"], "std": out["kernel_inception_distance_std"]}
        if cfg.bootstrap:
            est = stats.KID(cfg.kid_subsets, size, cfg.rng_seed)
            res["interval"] = stats.bootstrap(est, gen[layer], real[layer], point={"kid": res["mean"]},
                                              **boot)["kid"].to_dict()
        strata = _kid_strata(ctx, gen[layer], real[layer])
        if strata is not None:
            res["strata"] = strata
        return res
    if metric == "prc":
        k = cfg.prc_neighborhood
        if min(n_gen, n_real) <= k:
            return _not_computed(f"precision/recall with k={k} needs more than {k} images on each side")
        layer = default_layer(extractor, "prc")
        out = prc_features_to_metric(gen[layer], real[layer], prc_neighborhood=k, prc_batch_size=10000,
                                     save_cpu_ram=False, verbose=False)
        res = {**base, "layer": layer, "k": k, "features": f"{extractor} {layer}" +
               ("" if extractor == "vgg16" else " (Inception features, not the paper's VGG16)"),
               "precision": out["precision"], "recall": out["recall"], "f1": out["f_score"]}
        if cfg.bootstrap:
            iv = stats.bootstrap(stats.PRC(k), gen[layer], real[layer], point={n: res[n] for n in stats.PRC.names},
                                 **boot)
            res["intervals"] = {name: iv[name].to_dict() for name in ("precision", "recall", "f1")}
        return res
    # imageclef2024
    from harness.imageclef2024 import IS_SPLITS, frechet_distance, inception_score, label_for, weights_kind

    g, rl = gen["softmax"].numpy(), real["softmax"].numpy()
    if len(g) < IS_SPLITS or len(rl) < 2:
        return _not_computed(f"the 2024 metric needs >= {IS_SPLITS} generated and >= 2 real images")
    isc = inception_score(g)
    return {**base, "n_gen": len(g), "n_real": len(rl), "label": label_for(w.path),
            "network_weights": weights_kind(w.path), "fd": frechet_distance(rl, g),
            "is_mean": isc["mean"], "is_std": isc["std"], "is_median": isc["median"], "is_splits": isc["splits"]}
