"""`harness score RUN --metrics memorisation`: is a generated image a copy of a training image?

For each generated image, its nearest training image (the training side of the run's split) in a feature space, and
the same for every real validation image (held out: never trained on; always the split's validation side, whatever
`--real` names). The validation images say how close an image the model never saw is to the training set, so

- `ratio` of a generated image = its nearest-training distance / the median nearest-training distance of the
  validation images (1: as close as a typical unseen real image; near 0: much closer than any);
- a generated image is a *likely copy* when it is closer to a training image than the 1st-percentile validation
  image is (numpy's "lower" quantile, an observed validation distance, so at most 1 % of the validation images
  themselves fall below it). The headline `value` is the fraction of likely copies, with a bootstrap interval
  (harness.stats: generated and validation images resampled, the threshold re-estimated in every replicate).

This is the nearest-neighbour test of the data-copying literature (Meehan et al. 2020, "A non-parametric test to
detect data-copying in generative models"; Carlini et al. 2023 and Somepalli et al. 2023 for diffusion models),
calibrated on held-out real images instead of a fixed distance.

Feature spaces (the one used is recorded; `--memorisation-space` picks one, `auto` the first available):
- `classifier`: the attribute classifier's embedding (`--classifier CLF_RUN`, harness.attributes), trained on this
  data, so it sees what the captions talk about;
- `inception`: torch-fidelity's Inception pool3 (2048-d, FID's space; cached with FID's features) when its weights
  are found as for FID;
- `pixels`: 32x32 RGB (area-averaged), each image standardised to zero mean and unit variance: always available,
  sensitive to near-exact copies only.
Distances are Euclidean. Real images reach every space through the scoring's real-image preprocessing (`match`: the
training transform to the generated size), so a generated image that copies a training image has distance 0.

A grid of the closest pairs (generated | nearest training image, with distance and ratio) and a CSV of every
generated image's nearest training image are written beside the metrics file (memorisation/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from harness.errors import UserError

if TYPE_CHECKING:
    import torch

    from harness.score import GeneratedSet, RealPreprocess, ScoreConfig

SPACES = ("auto", "classifier", "inception", "pixels")
PIXEL_SIDE = 32  # small enough that only near-exact copies are close (Carlini et al. 2023 compare at low resolution)
PERCENTILE = 1.0  # likely copy: closer than the 1st-percentile validation image (the definition)
GRID_PAIRS = 16
OUT_DIR = "memorisation"


@dataclass
class Space:
    name: str  # classifier | inception | pixels
    description: str
    extractor: str  # for the leaderboard's comparability check (metric -> extractor, weights sha256)
    weights_sha256: str = ""
    weights_verified: bool = True
    note: str = ""  # why auto did not pick an earlier space
    cache: dict[str, Any] | None = None  # feature-cache use per side (Inception: shared with FID)


# --------------------------------------------------------------------------------------------------- the images


@dataclass
class Sides:
    gen: list[Path]
    train: list[Path]
    val: list[Path]
    split: Any


def _sides(gen: "GeneratedSet", cfg: "ScoreConfig") -> Sides:
    """Training and validation images of the split the run was trained on (cfg.split / cfg.data override)."""
    from harness.data import load_devset
    from harness.score import recorded_data_paths
    from harness.split import check_split_matches, load_split

    run_data, run_split = recorded_data_paths(gen.run, gen.run.config() if gen.run else {})
    data_dir, split_path = cfg.data or run_data, cfg.split or run_split
    if not data_dir or not split_path:
        raise UserError("--metrics memorisation compares with the training images: the run's config names no "
                        "split / dev set; pass --split SPLIT.json --data DATA_DIR", gen.dir)
    devset = load_devset(Path(data_dir))
    split = load_split(Path(split_path))
    check_split_matches(split, devset)
    trained_on = (gen.run.data_hashes() if gen.run else {}).get("split_sha256")
    if trained_on and trained_on != split.sha256:
        raise UserError(f"the run was trained with another split (sha256 {trained_on[:12]}...): memorisation must "
                        "compare with its own training images; pass the run's own split", split.path)
    if len(split.val) < 2:
        raise UserError("--metrics memorisation needs at least 2 validation images (the held-out reference)",
                        split.path)
    return Sides(list(gen.images.paths), [devset.image_path(n) for n in sorted(split.train)],
                 [devset.image_path(n) for n in sorted(split.val)], split)


# ------------------------------------------------------------------------------------------------ feature spaces


def _uint8_batches(paths: list[Path], load: Callable[[Path], "torch.Tensor"], batch: int):
    for s in range(0, len(paths), batch):
        yield [load(p) for p in paths[s:s + batch]]


def pixel_features(paths: list[Path], load: Callable[[Path], "torch.Tensor"], side: int = PIXEL_SIDE,
                   batch: int = 64) -> np.ndarray:
    """(N, 3*side*side) float64: each image area-averaged to side x side, then standardised on its own."""
    import torch
    import torch.nn.functional as F

    out = []
    for imgs in _uint8_batches(paths, load, batch):
        small = [F.adaptive_avg_pool2d(x.unsqueeze(0).double(), (side, side)) for x in imgs]
        out.append(torch.cat(small).flatten(1).numpy())
    x = np.concatenate(out)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(x.std(axis=1, keepdims=True), 1e-8)  # a constant image stays all zeros


def classifier_features(clf: Any, paths: list[Path], load: Callable[[Path], "torch.Tensor"],
                        batch: int = 64) -> np.ndarray:
    """The classifier's embedding of uint8 images brought to its input size (antialiased bilinear)."""
    import torch
    import torch.nn.functional as F

    size = int(clf.image_size)
    out = []
    for imgs in _uint8_batches(paths, load, batch):
        x = []
        for img in imgs:
            if tuple(img.shape[1:]) != (size, size):
                img = F.interpolate(img.unsqueeze(0).float(), size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False).round().clamp(0, 255).to(torch.uint8)[0]
            x.append(img)
        with torch.no_grad():
            emb = clf.embed(torch.stack(x))
        out.append(np.asarray(emb.detach().cpu().double() if hasattr(emb, "detach") else emb, dtype=np.float64))
    return np.concatenate(out)


def _load_classifier(run_dir: Path, device: "torch.device") -> Any:
    """The attribute classifier of a `harness train attributes` run (harness.attributes, imported only here)."""
    from harness.runs import open_run

    open_run(run_dir)  # not a run folder: one line
    try:
        from harness.attributes import load_classifier
    except ImportError:
        raise UserError("--classifier needs the attribute classifier (harness.attributes, `harness train "
                        "attributes`), which this installation lacks", run_dir) from None
    return load_classifier(Path(run_dir), device)


def _inception(cfg: "ScoreConfig"):
    """Inception weights as FID resolves them, or (None, why not)."""
    from harness.features import MissingWeights, resolve_weights
    from harness.score import INCEPTION

    try:
        return resolve_weights(INCEPTION, cfg.inception_weights, allow_download=cfg.allow_download,
                               allow_unverified=cfg.allow_unverified_weights), ""
    except MissingWeights as e:
        return None, str(e)


def features(sides: Sides, prep: "RealPreprocess", cfg: "ScoreConfig", device: "torch.device",
             log: Callable[[str], None]) -> tuple[Space, np.ndarray, np.ndarray, np.ndarray] | tuple[Space, str]:
    """(space, gen, train, val features) in the configured space; or (space, reason) when it is not available."""
    from harness.features import uint8_chw

    want = cfg.memorisation_space
    real_load = prep.load
    note = ""
    if want == "classifier" or (want == "auto" and cfg.classifier is not None):
        if cfg.classifier is None:
            raise UserError("--memorisation-space classifier needs --classifier CLF_RUN")
        clf = _load_classifier(Path(cfg.classifier), device)
        space = Space("classifier", f"attribute classifier embedding ({Path(cfg.classifier).name}, "
                      f"{int(clf.image_size)} px)", f"classifier:{Path(cfg.classifier).name}",
                      str(getattr(clf, "sha256", "") or ""))
        return (space, *(classifier_features(clf, paths, load, cfg.batch_size) for paths, load in
                         ((sides.gen, uint8_chw), (sides.train, real_load), (sides.val, real_load))))
    if want in ("inception", "auto"):
        weights, why = _inception(cfg)
        if weights is not None:
            return _inception_features(sides, prep, cfg, device, weights)
        if want == "inception":
            return Space("inception", "Inception pool3", "inception-v3-compat"), why
        note = "Inception pool3 weights not found (see --inception-weights): pixel space"
        log(f"[yellow]warning:[/] memorisation: {why}; using pixel space")
    space = Space("pixels", f"{PIXEL_SIDE}x{PIXEL_SIDE} RGB, area-averaged, each image standardised",
                  f"pixels-{PIXEL_SIDE}", note=note)
    return (space, pixel_features(sides.gen, uint8_chw, batch=cfg.batch_size),
            pixel_features(sides.train, real_load, batch=cfg.batch_size),
            pixel_features(sides.val, real_load, batch=cfg.batch_size))


def _inception_features(sides: Sides, prep: "RealPreprocess", cfg: "ScoreConfig", device, weights):
    """pool3 through FID's own cached extraction (same identity: a scored run's features are reused)."""
    from harness.features import ImageSet, TorchFidelityExtractor, extract_features
    from harness.score import INCEPTION, INCEPTION_LAYERS, feature_identity

    built: dict[str, Any] = {}

    def make():
        if "x" not in built:
            built["x"] = TorchFidelityExtractor(INCEPTION, INCEPTION_LAYERS, weights, device)
        return built["x"]

    out, cache = [], {}
    for label, paths, real in (("gen", sides.gen, False), ("train", sides.train, True), ("val", sides.val, True)):
        custom = real and prep.mode != "native"
        identity = feature_identity(INCEPTION, INCEPTION_LAYERS, weights, device,
                                    prep.preprocess_id if real else None)
        got = extract_features(ImageSet(f"memorisation {label}", paths), identity, make, batch_size=cfg.batch_size,
                               use_cache=cfg.use_cache, load=prep.load if custom else None,
                               shape_key=prep.shape_key if custom else None)
        out.append(got.features["2048"].double().numpy())
        cache[label] = {"hit": got.hit, "extracted": got.meta.get("images_extracted", 0)}
    space = Space("inception", "Inception pool3 (torch-fidelity inception-v3-compat, 2048-d)", INCEPTION,
                  weights.sha256, weights.verified, cache=cache)
    return (space, *out)


# ------------------------------------------------------------------------------------------------------ distances


def nearest(queries: np.ndarray, refs: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query's nearest reference row, Euclidean, in float64 (|q|^2 + |r|^2 - 2 q.r: the
    cancellation error is ~1e-16 of the squared norms, so an exact copy gives 0 to ~1e-6)."""
    r2 = np.einsum("ij,ij->i", refs, refs)
    dist, idx = np.empty(len(queries)), np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] + r2[None, :] - 2.0 * q @ refs.T
        j = d2.argmin(axis=1)
        idx[s:s + chunk] = j
        dist[s:s + chunk] = np.sqrt(np.maximum(d2[np.arange(len(q)), j], 0.0))
    return dist, idx


def lower_quantile(values: np.ndarray, q: float, weights: np.ndarray | None = None) -> float:
    """numpy's method="lower" quantile, optionally of a sample given as (values, integer counts)."""
    if weights is None:
        return float(np.quantile(values, q, method="lower"))
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    k = int(np.floor(q * (cum[-1] - 1)))  # 0-based rank of the order statistic in the expanded sample
    return float(values[order][np.searchsorted(cum, k, side="right")])


class CopyFraction:
    """harness.stats estimator: fraction of generated distances below the validation distances' 1st percentile.
    Rows are single distances (gen: generated images' nearest-training distances; real: the validation images')."""

    names = ("copies",)

    def __init__(self, percentile: float = PERCENTILE):
        self.q = percentile / 100.0

    def point(self, gen, real):
        thr = lower_quantile(np.asarray(real)[:, 0], self.q)
        return {"copies": float(np.mean(np.asarray(gen)[:, 0] < thr))}

    def prepare(self, gen, real):
        return {"g": np.asarray(gen)[:, 0], "r": np.asarray(real)[:, 0]}

    def replicate(self, s, wg, wr):
        thr = lower_quantile(s["r"], self.q, wr)
        return {"copies": float(wg @ (s["g"] < thr) / wg.sum())}


# ---------------------------------------------------------------------------------------------------- the metric


def compute_memorisation(gen: "GeneratedSet", prep: "RealPreprocess", cfg: "ScoreConfig", device, out_dir: Path,
                         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The `memorisation` entry of metrics.json (see module docstring); grid and CSV go to out_dir/memorisation/."""
    from harness import stats

    log = log or (lambda s: None)
    sides = _sides(gen, cfg)
    got = features(sides, prep, cfg, device, log)
    if len(got) == 2:
        space, why = got
        return {"status": "not computed", "reason": f"{space.name} features not available", "detail": why}
    space, g, t, v = got
    d_gen, j_gen = nearest(g, t)
    d_val, _ = nearest(v, t)
    thr = lower_quantile(d_val, PERCENTILE / 100.0)
    ref = float(np.median(d_val))
    copies = d_gen < thr
    warnings = []
    if ref > 0:
        ratio = d_gen / ref
    else:  # most validation images duplicate a training image: no scale to divide by (JSON has no infinity)
        ratio = None
        warnings.append("the median validation image has an exact duplicate among the training images: the ratio "
                        "is undefined")
    if thr == 0:
        warnings.append("the 1st-percentile validation image has an exact duplicate among the training images: "
                        "nothing can be closer, so no generated image is flagged")
    if float(np.ptp(v, axis=0).max()) == 0.0:
        warnings.append("every validation image has the same features: the space separates nothing")
    res: dict[str, Any] = {
        "status": "ok", "value": float(copies.mean()), "likely_copies": int(copies.sum()),
        "n_gen": len(d_gen), "n_real": len(d_val), "n_train": len(t),
        "space": space.name, "features": f"memorisation: {space.description}", "extractor": space.extractor,
        "weights_sha256": space.weights_sha256, "weights_verified": space.weights_verified,
        "distance": "euclidean", "percentile": PERCENTILE,
        "threshold": thr, "reference_distance": ref,
        "reference": "validation images (held out) -> nearest training image: threshold = 1st percentile "
                     "(numpy 'lower'), ratio denominator = median",
        "val_nn_distance": _summary(d_val), "gen_nn_distance": _summary(d_gen),
        "ratio": _summary(ratio) if ratio is not None else None,
        "split_sha256": sides.split.sha256, "warnings": warnings,
    }
    if space.note:
        res["space_note"] = space.note
    if space.cache is not None:
        res["feature_cache"] = space.cache
    if cfg.bootstrap:
        iv = stats.bootstrap(CopyFraction(), d_gen[:, None], d_val[:, None], point={"copies": res["value"]},
                             n_boot=cfg.bootstrap, seed=cfg.rng_seed)["copies"]
        # the bias-corrected percentile interval can step outside [0, 1]; a fraction cannot
        res["interval"] = {**iv.to_dict(), "low": max(0.0, iv.low), "high": min(1.0, iv.high),
                           "clipped_to": [0.0, 1.0]}
    order = np.argsort(d_gen, kind="stable")
    res["closest"] = [{"generated": sides.gen[i].name, "training_image": sides.train[j_gen[i]].name,
                       "distance": float(d_gen[i]), "ratio": float(ratio[i]) if ratio is not None else None,
                       "likely_copy": bool(copies[i])} for i in order[:GRID_PAIRS]]
    folder = out_dir / OUT_DIR
    tag = f"{space.name}-{gen.images.sha256[:10]}"
    res["nearest_csv"] = str(_write_csv(folder / f"nearest-{tag}.csv", sides, d_gen, j_gen, ratio, copies))
    res["grid"] = str(closest_pairs_grid(folder / f"closest-pairs-{tag}.png", sides, order[:GRID_PAIRS], j_gen,
                                         d_gen, ratio, copies, prep, space))
    return res


def _summary(x: np.ndarray) -> dict[str, float]:
    return {"min": float(np.min(x)), "p01": lower_quantile(x, 0.01), "median": float(np.median(x)),
            "mean": float(np.mean(x)), "max": float(np.max(x))}


def _write_csv(path: Path, sides: Sides, d: np.ndarray, j: np.ndarray, ratio: np.ndarray | None,
               copies: np.ndarray) -> Path:
    import csv
    import io

    from harness.io import write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["generated", "nearest_training_image", "distance", "ratio", "likely_copy"])
    for i, p in enumerate(sides.gen):
        r = f"{ratio[i]:.6g}" if ratio is not None else ""
        w.writerow([p.name, sides.train[j[i]].name, f"{d[i]:.6g}", r, int(copies[i])])
    return write_text(path, buf.getvalue())


def closest_pairs_grid(path: Path, sides: Sides, picks: np.ndarray, j: np.ndarray, d: np.ndarray,
                       ratio: np.ndarray | None,
                       copies: np.ndarray, prep: "RealPreprocess", space: Space) -> Path:
    """Pairs (generated | its nearest training image as compared), closest first, for a person to judge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.features import uint8_chw
    from harness.plots import _save

    n = len(picks)
    cols = 4  # pairs per row
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.0 * 2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(picks):
        a, b = axes.flat[2 * k], axes.flat[2 * k + 1]
        a.imshow(uint8_chw(sides.gen[i]).permute(1, 2, 0).numpy())
        b.imshow(prep.load(sides.train[j[i]]).permute(1, 2, 0).numpy())
        mark = " COPY?" if copies[i] else ""
        r = f" r={ratio[i]:.2f}" if ratio is not None else ""
        a.set_title(f"{sides.gen[i].name}\nd={d[i]:.3g}{r}{mark}", fontsize=6.5,
                    color="red" if copies[i] else "black")
        b.set_title(f"train {sides.train[j[i]].name[:22]}", fontsize=6.5)
    fig.suptitle(f"closest pairs (generated | nearest training image), {space.description}; r = distance / median "
                 "validation distance", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
