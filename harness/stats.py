"""Bootstrap 95 % intervals and paired run-vs-run comparisons for FID, KID and precision/recall/F1.

Numpy feature arrays in (rows = images), small dataclasses out. The point estimates are torch-fidelity 0.4's own
functions (`fid_features_to_statistics` + `fid_statistics_to_metric`, `kid_features_to_metric`,
`prc_features_to_metric` with its `f_score`), called with `calculate_metrics`' defaults, so a value here equals the
value in metrics.json. A bootstrap replicate resamples the generated and the real rows with replacement (seeded;
`np.random.default_rng(seed)`) and re-evaluates the same quantity from quantities computed once per call:

- FID: Tr sqrt(S1 S2) is the sum of the singular values of A Bᵀ (A, B = centred rows / sqrt(n-1)), the same number
  torch-fidelity's `eigvals(S1 S2)` gives (a test checks 1e-6 relative), but from an n×n matrix instead of a
  2048×2048 non-symmetric eigenproblem: 200 replicates cost seconds, not 20 minutes. Means and traces use the
  same formulas as `np.cov`.
- KID: the unbiased MMD² of torch-fidelity's `mmd2` (its cubic polynomial kernel, `kernel_poly`) over the whole
  resampled sets; pairs of draws of the same image are treated as the diagonal (not as two distinct images).
- precision/recall: torch-fidelity's k-NN balls (k-th nearest other image, `torch.cdist`), a draw's neighbours being
  the draws of *other* images (copies of itself would shrink its ball to 0); F1 is torch-fidelity's f_score formula.

Resampling with duplicates shifts FID/KID replicates upward by a roughly constant amount; intervals are the
percentile interval of the replicates minus that bootstrap bias estimate (mean(replicates) - point; Efron &
Tibshirani 1993, ch. 10), so they are centred on the reported value. `compare` resamples the real rows once per
replicate for both runs, and the generated rows with the same indices when both runs have the same number of
images (image i of each run comes from prompt i: a paired design); the difference's interval containing 0 means
"indistinguishable" at that level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

DEFAULT_BOOTSTRAP = 200  # replicates; the percentile end points of a 95 % interval are stable to ~1e-2 relative
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 2020  # torch-fidelity's rng_seed default


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    value: float
    low: float
    high: float
    level: float
    n_boot: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "level": self.level, "n_boot": self.n_boot, "seed": self.seed,
                "method": "bootstrap percentile, bias-corrected"}


@dataclass(frozen=True)
class Comparison:
    """value(A) - value(B) for one metric, with the paired bootstrap interval of the difference."""

    metric: str
    a: float
    b: float
    diff: float
    low: float
    high: float
    level: float
    n_boot: int
    seed: int
    paired: bool  # generated rows resampled with the same indices for A and B

    @property
    def indistinguishable(self) -> bool:
        return self.low <= 0.0 <= self.high

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "a": self.a, "b": self.b, "diff": self.diff, "low": self.low,
                "high": self.high, "level": self.level, "n_boot": self.n_boot, "seed": self.seed,
                "paired": self.paired, "indistinguishable": self.indistinguishable}


class Estimator(Protocol):
    names: tuple[str, ...]

    def point(self, gen: np.ndarray, real: np.ndarray) -> dict[str, float]: ...

    def prepare(self, gen: np.ndarray, real: np.ndarray) -> Any: ...

    def replicate(self, state: Any, w_gen: np.ndarray, w_real: np.ndarray) -> dict[str, float]: ...


def _f64(x: Any) -> np.ndarray:
    a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if a.ndim != 2 or len(a) < 2:
        raise ValueError(f"features must be a 2-D array with at least 2 rows, got shape {a.shape}")
    return a.astype(np.float64, copy=False)


# ------------------------------------------------------------------------------------------------------------ FID


class FID:
    """Fréchet distance between Gaussian fits (torch-fidelity's `frechet_inception_distance`)."""

    names = ("fid",)

    def point(self, gen, real):
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        out = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(_f64(gen))),
                                       fid_features_to_statistics(torch.from_numpy(_f64(real))), verbose=False)
        return {"fid": out["frechet_inception_distance"]}

    def prepare(self, gen, real):
        g, r = _f64(gen), _f64(real)
        return {"g": g, "r": r, "gram": g @ r.T, "g2": np.einsum("ij,ij->i", g, g), "r2": np.einsum("ij,ij->i", r, r)}

    def replicate(self, s, wg, wr):
        return {"fid": fid_weighted(s, wg, wr)}


def fid_weighted(s: dict[str, np.ndarray], wg: np.ndarray, wr: np.ndarray) -> float:
    """FID of the sets where row i of s["g"] appears wg[i] times (and likewise for real); weights of ones give
    torch-fidelity's FID (np.cov's (n-1) normalisation)."""
    g, r = s["g"], s["r"]
    ng, nr = wg.sum(), wr.sum()
    mg, mr = wg @ g / ng, wr @ r / nr
    tr_g = (wg @ s["g2"] - ng * mg @ mg) / (ng - 1)
    tr_r = (wr @ s["r2"] - nr * mr @ mr) / (nr - 1)
    ig, ir = np.flatnonzero(wg), np.flatnonzero(wr)
    d = g.shape[1]
    if min(len(ig), len(ir)) <= d:
        # A Bᵀ with A = sqrt(w)(x - m)/sqrt(n-1): expand the centring around the precomputed Gram matrix.
        c = s["gram"][np.ix_(ig, ir)] - (g[ig] @ mr)[:, None] - (r[ir] @ mg)[None, :] + mg @ mr
        c *= np.sqrt(wg[ig])[:, None] * np.sqrt(wr[ir])[None, :] / np.sqrt((ng - 1) * (nr - 1))
        tr_covmean = np.linalg.svd(c, compute_uv=False).sum()
    else:
        # More images than dimensions: eigenvalues of S1 S2 = those of the symmetric sqrt(S1) S2 sqrt(S1).
        gc, rc = g[ig] - mg, r[ir] - mr
        s1 = (gc * wg[ig, None]).T @ gc / (ng - 1)
        s2 = (rc * wr[ir, None]).T @ rc / (nr - 1)
        lam, v = np.linalg.eigh(s1)
        root = (v * np.sqrt(np.clip(lam, 0, None))) @ v.T
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    diff = mg - mr
    return float(diff @ diff + tr_g + tr_r - 2 * tr_covmean)


# ------------------------------------------------------------------------------------------------------------ KID


@dataclass(frozen=True)
class KID:
    """Kernel inception distance (torch-fidelity's mean over `subsets` random subsets of `subset_size`, lowered to
    the smaller set's size as harness.score does); replicates use the whole resampled sets."""

    subsets: int = 100
    subset_size: int = 1000
    rng_seed: int = DEFAULT_SEED
    names = ("kid",)

    def _kwargs(self) -> dict[str, Any]:
        from torch_fidelity.defaults import DEFAULTS

        return {k: DEFAULTS[k] for k in ("kid_kernel", "kid_kernel_poly_degree", "kid_kernel_poly_gamma",
                                         "kid_kernel_poly_coef0")}

    def point(self, gen, real):
        from torch_fidelity.metric_kid import kid_features_to_metric

        g, r = _f64(gen), _f64(real)
        size = min(self.subset_size, len(g), len(r))
        out = kid_features_to_metric(torch.from_numpy(g), torch.from_numpy(r), kid_subsets=self.subsets,
                                     kid_subset_size=size, rng_seed=self.rng_seed, verbose=False, **self._kwargs())
        return {"kid": out["kernel_inception_distance_mean"]}

    def prepare(self, gen, real):
        from torch_fidelity.metric_kid import kernel_poly

        g, r, kw = _f64(gen), _f64(real), self._kwargs()
        return {"gg": kernel_poly(g, g, **kw), "rr": kernel_poly(r, r, **kw), "gr": kernel_poly(g, r, **kw)}

    def replicate(self, s, wg, wr):
        return {"kid": mmd2_weighted(s["gg"], s["gr"], s["rr"], wg, wr)}


def mmd2_weighted(k_gg: np.ndarray, k_gr: np.ndarray, k_rr: np.ndarray, wg: np.ndarray, wr: np.ndarray) -> float:
    """Unbiased MMD² (torch-fidelity's `mmd2`, mmd_est="unbiased") of multisets given by counts; two draws of the
    same image count as the diagonal. With all counts 1 and equal sizes this is `mmd2(k_gg, k_gr, k_rr)`."""
    def within(k, w):
        n = w.sum()
        return (w @ k @ w - (w * w) @ np.diagonal(k)) / (n * n - (w * w).sum())

    return float(within(k_gg, wg) + within(k_rr, wr) - 2 * (wg @ k_gr @ wr) / (wg.sum() * wr.sum()))


# ---------------------------------------------------------------------------------------- precision / recall / F1


def f_score(precision: float, recall: float) -> float:
    """torch-fidelity's `f_score` (metric_prc.prc_features_to_metric): 2PR / max(1e-5, P + R)."""
    return 2 * precision * recall / max(1e-5, precision + recall)


@dataclass(frozen=True)
class PRC:
    """Improved precision/recall (Kynkäänniemi et al. 2019) as torch-fidelity computes it, and its F-score."""

    k: int = 3
    names = ("precision", "recall", "f1")

    def point(self, gen, real):
        from torch_fidelity.metric_prc import prc_features_to_metric

        out = prc_features_to_metric(torch.from_numpy(_f64(gen)).float(), torch.from_numpy(_f64(real)).float(),
                                     prc_neighborhood=self.k, prc_batch_size=10000, save_cpu_ram=False,
                                     verbose=False)
        return {"precision": out["precision"], "recall": out["recall"], "f1": out["f_score"]}

    def prepare(self, gen, real):
        # float32 like torch-fidelity (its extractor outputs are float32)
        g = torch.from_numpy(_f64(gen)).float()
        r = torch.from_numpy(_f64(real)).float()
        return {"gg": torch.cdist(g, g).numpy(), "rr": torch.cdist(r, r).numpy(), "gr": torch.cdist(g, r).numpy()}

    def _radii(self, d: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Distance from each drawn image to its k-th nearest draw of another image (draws counted with weight)."""
        sub = d[np.ix_(idx, idx)].astype(np.float64)
        np.fill_diagonal(sub, np.inf)
        m = min(self.k, len(idx) - 1)
        order = np.argpartition(sub, m - 1, axis=1)[:, :m]
        near = np.take_along_axis(sub, order, axis=1)
        srt = np.argsort(near, axis=1)
        near = np.take_along_axis(near, srt, axis=1)
        cum = np.cumsum(w[idx][order][np.arange(len(idx))[:, None], srt], axis=1)
        first = np.argmax(cum >= self.k, axis=1)  # k nearest distinct images always cover weight >= k
        return near[np.arange(len(idx)), first]

    def replicate(self, s, wg, wr):
        ig, ir = np.flatnonzero(wg), np.flatnonzero(wr)
        if min(len(ig), len(ir)) <= self.k:
            return {"precision": np.nan, "recall": np.nan, "f1": np.nan}
        rad_g, rad_r = self._radii(s["gg"], ig, wg), self._radii(s["rr"], ir, wr)
        gr = s["gr"][np.ix_(ig, ir)]
        precision = float(wg[ig] @ (gr <= rad_r[None, :]).any(axis=1) / wg.sum())
        recall = float(wr[ir] @ (gr <= rad_g[:, None]).any(axis=0) / wr.sum())
        return {"precision": precision, "recall": recall, "f1": f_score(precision, recall)}


# ------------------------------------------------------------------------------------------------------ bootstrap


def _counts(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)


def _interval(point: float, reps: np.ndarray, level: float) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if len(reps) == 0:
        return float("nan"), float("nan")
    shifted = reps - (reps.mean() - point)
    alpha = (1 - level) / 2
    return float(np.quantile(shifted, alpha)), float(np.quantile(shifted, 1 - alpha))


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def bootstrap(estimator: Estimator, gen: Any, real: Any, *, n_boot: int = DEFAULT_BOOTSTRAP,
              seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL,
              point: dict[str, float] | None = None) -> dict[str, Interval]:
    """Point estimate and bootstrap interval of each of the estimator's metrics (resampling both sides). `point`:
    the estimator's values when already computed (torch-fidelity's FID at 2048-d costs seconds)."""
    _check(n_boot, level)
    gen, real = _f64(gen), _f64(real)
    point = point or estimator.point(gen, real)
    state = estimator.prepare(gen, real)
    rng = np.random.default_rng(seed)
    reps = {name: np.empty(n_boot) for name in estimator.names}
    for b in range(n_boot):
        out = estimator.replicate(state, _counts(rng, len(gen)), _counts(rng, len(real)))
        for name in estimator.names:
            reps[name][b] = out[name]
    return {name: Interval(float(point[name]), *_interval(point[name], reps[name], level), level=level,
                           n_boot=n_boot, seed=seed) for name in estimator.names}


def compare(estimator: Estimator, gen_a: Any, gen_b: Any, real: Any, *, n_boot: int = DEFAULT_BOOTSTRAP,
            seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL,
            points: tuple[dict[str, float], dict[str, float]] | None = None) -> dict[str, Comparison]:
    """value(A) - value(B) per metric against the same real features, with a paired bootstrap interval. `points`:
    the values of A and B when already computed (e.g. read from metrics.json)."""
    _check(n_boot, level)
    gen_a, gen_b, real = _f64(gen_a), _f64(gen_b), _f64(real)
    if gen_a.shape[1] != gen_b.shape[1] or gen_a.shape[1] != real.shape[1]:
        raise ValueError("A, B and the real features must have the same dimension")
    paired = len(gen_a) == len(gen_b)
    pa, pb = points or (estimator.point(gen_a, real), estimator.point(gen_b, real))
    sa, sb = estimator.prepare(gen_a, real), estimator.prepare(gen_b, real)
    rng = np.random.default_rng(seed)
    reps = {name: np.empty(n_boot) for name in estimator.names}
    for b in range(n_boot):
        wa = _counts(rng, len(gen_a))
        wb = wa if paired else _counts(rng, len(gen_b))
        wr = _counts(rng, len(real))
        oa, ob = estimator.replicate(sa, wa, wr), estimator.replicate(sb, wb, wr)
        for name in estimator.names:
            reps[name][b] = oa[name] - ob[name]
    out = {}
    for name in estimator.names:
        diff = float(pa[name] - pb[name])
        low, high = _interval(diff, reps[name], level)
        out[name] = Comparison(name, float(pa[name]), float(pb[name]), diff, low, high, level, n_boot, seed, paired)
    return out

