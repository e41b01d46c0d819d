"""`harness score RUN`: FID, Inception Score, precision/recall/F1, KID and the organisers' 2024 metric.

Standard metrics are torch-fidelity's: its extractor modules produce the features (harness/features.py, cached by
content hash) and its feature->metric functions turn them into numbers, with calculate_metrics' defaults
(generated = input1, real = input2; FID on Inception pool3 "2048"; IS on "logits_unbiased", 10 splits, shuffled
with seed 2020; precision/recall with k = 3 on VGG16 "fc2_relu" at 224 px, the layer torch-fidelity picks for prc).
No metric maths is re-implemented here; F1 = 2PR / (P + R) is the only formula.

The real set is, by default, the validation side of the run's split (no image the model trained on); `all` is the
whole dev set (the seed paper's protocol, which leaks training images - labelled so); or any folder.

Every number is stored with N_gen / N_real; a metric whose weights are missing is stored as "not computed" with the
reason, never as a number from an untrained network. Results: RUN/metrics.json (atomic).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

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
    default_layer,
    extract_features,
    resolve_weights,
)
from harness.io import read_json, write_json
from harness.runs import Run

METRICS_FORMAT = "harness-metrics/1"
ALL_METRICS = ("fid", "is", "prc", "kid", "imageclef2024")
DEFAULT_METRICS = ("fid", "is", "prc", "imageclef2024")
MIN_N = 2048  # below this FID is biased and the 2048-d covariance is rank-deficient
NOT_COMPUTED = "not computed"
INCEPTION = "inception-v3-compat"
INCEPTION_LAYERS = ("2048", "logits_unbiased")  # pool3 for FID/KID(/PRC), logits for IS: one pass, one cache entry


@dataclass
class ScoreConfig:
    real: str = "val"  # "val" | "all" | a folder of images
    split: Path | None = None  # SPLIT.json (default: the one named in the run's config)
    data: Path | None = None  # dev-set dir (default: the one named in the run's config)
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    prc_features: Literal["vgg16", "inception"] = "vgg16"
    inception_weights: Path | None = None
    vgg_weights: Path | None = None
    imageclef_weights: Path | None = None
    batch_size: int = 64
    device: str = "auto"
    isc_splits: int = 10
    prc_neighborhood: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # lowered to min(N_gen, N_real) when the sets are smaller (recorded)
    rng_seed: int = 2020  # torch-fidelity's default seed (IS shuffle, KID subsets)
    use_cache: bool = True
    # Reuse a metric value computed before from the very same cached features and parameters (the FID eigvals of a
    # 2048x2048 matrix and the 1000x1000 sqrtm cost seconds on CPU, the rest of a re-score milliseconds).
    reuse_metric_values: bool = True
    allow_download: bool = True
    # Test-only: accept weights whose sha256 is not the published one (randomly initialised extractors). Results are
    # labelled "unverified weights" and the leaderboard leaves them out.
    allow_unverified_weights: bool = False

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown or not self.metrics:
            raise UserError(f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {','.join(ALL_METRICS)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.isc_splits < 1 or self.prc_neighborhood < 1 or self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise UserError("isc_splits, prc_neighborhood and kid_subsets must be >= 1, kid_subset_size >= 2")


def parse_metrics(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    names = ["is" if m in ("isc", "inception-score") else m for m in names]
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------------ the sets


@dataclass
class RealSet:
    images: ImageSet
    kind: str  # "val" | "all" | "dir"
    label: str  # short, shown on the leaderboard
    info: dict[str, Any]
    official: list[Path]  # the same set under the organisers' listing rule


def _find_key(d: Any, names: tuple[str, ...], accept: Callable[[str], bool] = bool) -> str | None:
    """First string value under any of `names` that `accept`s, searching nested dicts (trainer configs nest their
    data options; a key such as "split" may also hold a side name, hence the predicate)."""
    if isinstance(d, dict):
        for n in names:
            if isinstance(d.get(n), str) and accept(d[n]):
                return d[n]
        for v in d.values():
            found = _find_key(v, names, accept)
            if found:
                return found
    return None


def generated_set(run: Run) -> tuple[ImageSet, dict[str, Any]]:
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
    return ImageSet(f"{run.id}/images", paths), generation


def resolve_real_set(run: Run | None, cfg: ScoreConfig) -> RealSet:
    from harness.imageclef2024 import list_images, official_name

    if cfg.real not in ("val", "all"):
        folder = Path(cfg.real)
        if not folder.is_dir():
            raise UserError("--real must be 'val', 'all' or an existing folder of images", folder)
        # torch-fidelity's folder rule: direct children, extension png/jpg/jpeg in any case, sorted.
        paths = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not paths:
            raise UserError("no .png/.jpg/.jpeg images in the real-image folder", folder)
        images = ImageSet(f"dir:{folder.name}", paths)
        return RealSet(images, "dir", f"dir:{folder.name}", {"dir": str(folder.resolve())}, list_images(folder))

    from harness.data import load_devset

    config = run.config() if run else {}
    data_dir = cfg.data or _find_key(config, ("data_dir", "data"), lambda v: Path(v).is_dir())
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

        split_path = cfg.split or _find_key(config, ("split_path", "split"), lambda v: v.endswith(".json"))
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
    return RealSet(images, cfg.real, label, info, [p for p in paths if official_name(p.name)])


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
        if m.get("imageclef2024", {}).get("status") == "ok":
            parts.append(f"2024-FD {m['imageclef2024']['fd']:.4f}")
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
    import torch
    import torch_fidelity
    import torchvision

    return {"harness": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_fidelity": torch_fidelity.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "pillow": PIL.__version__}


# --------------------------------------------------------------------------------------------------------- score


def score_run(run: Run, cfg: ScoreConfig | None = None, *, log: Callable[[str], None] | None = None) -> ScoreResult:
    """Score RUN/images against the real set; writes RUN/metrics.json and returns its content."""
    from harness.progress import progress

    cfg = cfg or ScoreConfig()
    cfg.validate()
    log = log or (lambda s: None)
    gen, generation = generated_set(run)
    real = resolve_real_set(run, cfg)
    device = pick_device(cfg.device)
    want = set(cfg.metrics)
    n_gen, n_real = len(gen), len(real.images)

    # Which extractor serves which metric, and which sides each must see.
    prc_extractor = "vgg16" if cfg.prc_features == "vgg16" else INCEPTION
    plan: dict[str, dict[str, Any]] = {}
    if want & {"fid", "kid", "is"} or (("prc" in want) and prc_extractor == INCEPTION):
        plan[INCEPTION] = {"layers": INCEPTION_LAYERS, "real": bool(want & {"fid", "kid"}) or
                           ("prc" in want and prc_extractor == INCEPTION), "explicit": cfg.inception_weights}
    if "prc" in want and prc_extractor == "vgg16":
        plan["vgg16"] = {"layers": (default_layer("vgg16", "prc"),), "real": True, "explicit": cfg.vgg_weights}
    if "imageclef2024" in want:
        plan["imageclef2024"] = {"layers": ("softmax",), "real": True, "explicit": cfg.imageclef_weights}

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

    official_gen: ImageSet | None = None
    official_real: ImageSet | None = None
    if "imageclef2024" in weights:
        from harness.imageclef2024 import list_images

        listed = list_images(run.images_dir)
        if listed and real.official:
            official_gen = ImageSet(f"{run.id}/images (organisers' listing)", listed)
            official_real = ImageSet(f"{real.label} (organisers' listing)", real.official)
        else:
            why = "no image name ends in png/jpg/jpeg (the organisers' case-sensitive listing rule)"
            missing["imageclef2024"] = (why, f"{why}: {'generated' if not listed else 'real'} set")
            del weights["imageclef2024"]

    # Feature extraction (cached); extractors are only built on a cache miss.
    feats: dict[tuple[str, str], CachedFeatures] = {}
    jobs = []
    for name in plan:
        if name not in weights:
            continue
        sides = [("gen", official_gen if name == "imageclef2024" else gen)]
        if plan[name]["real"]:
            sides.append(("real", official_real if name == "imageclef2024" else real.images))
        for side, image_set in sides:
            jobs.append((name, side, image_set))

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

    with progress() as bar:
        for i, (name, side, image_set) in enumerate(jobs):
            task = bar.add_task(f"{name} {side}", total=len(image_set))
            identity = _identity(name, plan[name]["layers"], weights[name])
            feats[(name, side)] = extract_features(
                image_set, identity, maker(name), batch_size=cfg.batch_size, use_cache=cfg.use_cache,
                on_progress=lambda k, t=task: bar.advance(t, k))
            if i + 1 == len(jobs) or jobs[i + 1][0] != name:
                built.pop(name, None)  # free this network (GPU memory) before the next one is built
    cache = {f"{n}/{s}": {"hit": f.hit, "key": f.key} for (n, s), f in feats.items()}

    metrics: dict[str, Any] = {}
    for m in cfg.metrics:
        metrics[m] = _compute_memo(m, cfg, feats, weights, missing, prc_extractor, n_gen, n_real)

    warnings: list[str] = []
    computed = {k for k, v in metrics.items() if v.get("status") == "ok"}
    if min(n_gen, n_real) < MIN_N and computed & {"fid", "kid", "prc", "imageclef2024"}:
        warnings.append(f"N_gen={n_gen}, N_real={n_real} < {MIN_N}: FID is biased upward and the 2048-d covariance "
                        "is rank-deficient; compare only numbers computed at the same N")
    if real.info.get("leaks_training_images"):
        warnings.append("real set = all dev images, which include the training images (seed paper's protocol)")
    unverified = sorted(n for n, w in weights.items() if not w.verified)
    if unverified:
        warnings.append(f"UNVERIFIED weights for {', '.join(unverified)}: not a real score, kept off the leaderboard")

    config = run.config()
    data = {
        "format": METRICS_FORMAT,
        "run_id": run.id,
        "family": config.get("family"),
        "scored": _dt.datetime.now().isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "seed": {"rng_seed": cfg.rng_seed, "generation_base_seed": generation.get("base_seed")},
        "summary": config.get("summary", {}),
        "generated": {"dir": str(run.images_dir.resolve()), "n": n_gen, "sha256": gen.sha256,
                      "generation": generation, "data": run.data_hashes()},
        "real": {"kind": real.kind, "label": real.label, "n": n_real, "sha256": real.images.sha256, **real.info},
        "extractors": {n: {"layers": list(plan[n]["layers"]), "weights": w.to_dict()} for n, w in weights.items()},
        "unavailable_extractors": {n: detail for n, (_, detail) in missing.items()},
        "device": str(device),
        "feature_cache": cache,
        "libraries": _versions(),
        "unverified_weights": bool(unverified),
        "metrics": metrics,
        "warnings": warnings,
    }
    write_json(run.metrics_path, data)
    run.log(f"score: {', '.join(f'{k}={_short(v)}' for k, v in metrics.items())} (N_gen={n_gen}, N_real={n_real}, "
            f"real={real.label})")
    return ScoreResult(run.metrics_path, data)


def _metric_memo_key(metric: str, cfg: ScoreConfig, feats: dict, extractor: str) -> str | None:
    """Content key of one metric value: the feature-cache keys it reads, its parameters, the library versions."""
    import scipy
    import torch_fidelity

    from harness.io import dumps_json, sha256_bytes

    sides = {s: feats[(extractor, s)].key for s in ("gen", "real") if (extractor, s) in feats}
    if "gen" not in sides:
        return None
    params = {k: getattr(cfg, k) for k in ("isc_splits", "prc_neighborhood", "kid_subsets", "kid_subset_size",
                                           "rng_seed", "prc_features")}
    material = {"metric": metric, "features": sides, "params": params, "torch_fidelity": torch_fidelity.__version__,
                "numpy": np.__version__, "scipy": scipy.__version__, "format": METRICS_FORMAT}
    return sha256_bytes(dumps_json(material).encode("utf-8"))


def _compute_memo(metric: str, cfg: ScoreConfig, feats, weights, missing, prc_extractor, n_gen, n_real):
    import json

    from harness.features import cache_root

    extractor = {"prc": prc_extractor, "imageclef2024": "imageclef2024"}.get(metric, INCEPTION)
    key = None if extractor in missing else _metric_memo_key(metric, cfg, feats, extractor)
    path = cache_root() / "metrics" / f"{key}.json" if key else None
    if path is not None and cfg.use_cache and cfg.reuse_metric_values and path.is_file():
        try:
            return {**json.loads(path.read_text(encoding="utf-8")), "reused": True}
        except ValueError:
            pass  # damaged memo: recompute below
    out = _compute(metric, cfg, feats, weights, missing, prc_extractor, n_gen, n_real)
    if path is not None and cfg.use_cache and out.get("status") == "ok":
        write_json(path, out)
    return {**out, "reused": False} if out.get("status") == "ok" else out


def _identity(name: str, layers: tuple[str, ...], weights: ResolvedWeights) -> dict[str, Any]:
    import torch_fidelity

    if name == "imageclef2024":
        from harness.imageclef2024 import OrganisersInception

        preprocess = OrganisersInception.preprocess_id
    else:
        preprocess = TorchFidelityExtractor.preprocess_id
    return {"extractor": name, "layers": sorted(layers), "weights_sha256": weights.sha256, "preprocess": preprocess,
            "torch_fidelity": torch_fidelity.__version__, "dtype": "float32"}


def _short(v: dict[str, Any]) -> str:
    if v.get("status") != "ok":
        return NOT_COMPUTED
    for k in ("value", "mean", "f1", "fd"):
        if k in v:
            return f"{v[k]:.4g}"
    return "ok"


def _compute(metric: str, cfg: ScoreConfig, feats, weights, missing, prc_extractor, n_gen, n_real) -> dict[str, Any]:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    extractor = {"fid": INCEPTION, "is": INCEPTION, "kid": INCEPTION, "prc": prc_extractor,
                 "imageclef2024": "imageclef2024"}[metric]
    if extractor in missing:
        reason, detail = missing[extractor]
        return {**_not_computed(reason), "detail": detail}
    w = weights[extractor]
    base = {"status": "ok", "extractor": extractor, "weights_sha256": w.sha256, "weights_verified": w.verified,
            "n_gen": n_gen, "n_real": n_real}
    gen = feats[(extractor, "gen")].features
    real = feats.get((extractor, "real"))
    real = real.features if real else None

    if metric == "fid":
        if min(n_gen, n_real) < 2:
            return _not_computed("FID needs at least 2 images on each side")
        out = fid_statistics_to_metric(fid_features_to_statistics(gen["2048"]),
                                       fid_features_to_statistics(real["2048"]), verbose=False)
        return {**base, "layer": "2048", "value": out["frechet_inception_distance"]}
    if metric == "is":
        if n_gen < cfg.isc_splits:
            return _not_computed(f"IS over {cfg.isc_splits} splits needs at least {cfg.isc_splits} generated images")
        out = isc_features_to_metric(gen["logits_unbiased"], cfg.isc_splits, True, cfg.rng_seed)
        return {**base, "n_real": None, "layer": "logits_unbiased", "splits": cfg.isc_splits,
                "mean": out["inception_score_mean"], "std": out["inception_score_std"]}
    if metric == "kid":
        size = min(cfg.kid_subset_size, n_gen, n_real)
        if size < 2:
            return _not_computed("KID needs at least 2 images on each side")
        out = kid_features_to_metric(gen["2048"], real["2048"], kid_subsets=cfg.kid_subsets, kid_subset_size=size,
                                     rng_seed=cfg.rng_seed, verbose=False)
        return {**base, "layer": "2048", "subsets": cfg.kid_subsets, "subset_size": size,
                "mean": out["kernel_inception_distance_mean"], "std": out["kernel_inception_distance_std"]}
    if metric == "prc":
        k = cfg.prc_neighborhood
        if min(n_gen, n_real) <= k:
            return _not_computed(f"precision/recall with k={k} needs more than {k} images on each side")
        layer = next(iter(gen))
        out = prc_features_to_metric(gen[layer], real[layer], prc_neighborhood=k, verbose=False)
        p, r = out["precision"], out["recall"]
        return {**base, "layer": layer, "k": k, "features": f"{extractor} {layer}" +
                ("" if extractor == "vgg16" else " (Inception features, not the paper's VGG16)"),
                "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0}
    # imageclef2024
    from harness.imageclef2024 import IS_SPLITS, LABEL, frechet_distance, inception_score

    g, rl = gen["softmax"].numpy(), real["softmax"].numpy()
    if len(g) < IS_SPLITS or len(rl) < 2:
        return _not_computed(f"the 2024 metric needs >= {IS_SPLITS} generated and >= 2 real images")
    isc = inception_score(g)
    return {**base, "n_gen": len(g), "n_real": len(rl), "label": LABEL, "fd": frechet_distance(rl, g),
            "is_mean": isc["mean"], "is_std": isc["std"], "is_median": isc["median"], "is_splits": isc["splits"]}
