"""`harness compare A B [...]`: is run A better than run B, or is the difference within the noise?

A, B are scored runs or scored image folders (their metrics.json). Their features come from the feature cache (the
keys metrics.json records), so nothing is re-extracted; both must have been scored against the same real features
(same real set, preprocessing, extractor weights, library versions). For FID, KID and precision/recall/F1 the paired
bootstrap of harness.stats gives A - B with a 95 % interval; "indistinguishable" when it contains 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import UserError

COMPARABLE = ("fid", "kid", "prc")


@dataclass
class Scored:
    label: str
    path: Path  # its metrics.json
    doc: dict[str, Any]  # one result (one real set)


def load_scored(target: Path, real_key: str | None = None) -> Scored:
    """The result of a scored run / folder / metrics file (the latest one, or the one of `real_key`)."""
    from harness.io import read_json

    target = Path(target)
    path = target if target.is_file() else target / "metrics.json"
    if not path.is_file():
        raise UserError(f"not scored yet (no {path.name}); run `harness score {target}` first", target)
    try:
        data = read_json(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise UserError(f"unreadable metrics file ({e})", path) from None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("harness-metrics/"):
        raise UserError("not a harness metrics file", path)
    results = data.get("results") if isinstance(data.get("results"), dict) else {}
    if real_key is not None:
        matches = [k for k in results if k == real_key or k.split(" | ")[0] == real_key]
        if len(matches) != 1:
            raise UserError(f"no single result for real set {real_key!r}; it has: {', '.join(sorted(results))}", path)
        doc = results[matches[0]]
    else:
        doc = {k: v for k, v in data.items() if k != "results"}
    label = doc.get("run_id") or (target.name if target.is_dir() else target.parent.name)
    return Scored(label, path, doc)


def _features(s: Scored, extractor: str, side: str, layer: str) -> torch.Tensor:
    from harness.features import load_cached

    entry = (s.doc.get("feature_cache") or {}).get(f"{extractor}/{side}")
    blob = load_cached(entry["key"]) if entry else None
    if blob is None or layer not in blob["features"]:
        raise UserError(f"{s.label}: {extractor} features ({side}) are not in the feature cache; score it again "
                        f"(`harness score ...`) so they are", s.path)
    return blob["features"][layer]


def _source(s: Scored, metric: str) -> tuple[str, str] | None:
    m = (s.doc.get("metrics") or {}).get(metric)
    if not isinstance(m, dict) or m.get("status") != "ok":
        return None
    return m.get("extractor", ""), m.get("layer", "")


def _values(s: Scored, metric: str) -> dict[str, float]:
    m = s.doc["metrics"][metric]
    if metric == "fid":
        return {"fid": m["value"]}
    if metric == "kid":
        return {"kid": m["mean"]}
    return {k: m[k] for k in ("precision", "recall", "f1")}


def compare_scored(targets: list[Path], *, metrics: tuple[str, ...] = COMPARABLE, n_boot: int = 200,
                   seed: int = 2020, real_key: str | None = None) -> list[dict[str, Any]]:
    """A (the first target) against each other target; one dict per (B, metric) with harness.stats.Comparison's
    fields plus `b_label` / `a_label`."""
    from harness import stats

    if len(targets) < 2:
        raise UserError("compare needs at least two scored runs or folders: harness compare A B [...]")
    scored = [load_scored(t, real_key) for t in targets]
    a = scored[0]
    rows: list[dict[str, Any]] = []
    for b in scored[1:]:
        for metric in metrics:
            src_a, src_b = _source(a, metric), _source(b, metric)
            if src_a is None or src_b is None:
                continue
            if src_a != src_b:
                raise UserError(f"{metric}: {a.label} used {src_a[0]} {src_a[1]}, {b.label} used {src_b[0]} "
                                f"{src_b[1]}; score both with the same options", b.path)
            extractor, layer = src_a
            ka = (a.doc.get("feature_cache") or {}).get(f"{extractor}/real", {}).get("key")
            kb = (b.doc.get("feature_cache") or {}).get(f"{extractor}/real", {}).get("key")
            if not ka or ka != kb:
                ra, rb = a.doc.get("real", {}), b.doc.get("real", {})
                raise UserError(f"{a.label} and {b.label} were not scored against the same real features "
                                f"({ra.get('label')} / {(ra.get('preprocess') or {}).get('label')} vs "
                                f"{rb.get('label')} / {(rb.get('preprocess') or {}).get('label')}, or other "
                                "weights/versions); score both with the same --real and --real-preprocess", b.path)
            real = _features(a, extractor, "real", layer)
            ga, gb = _features(a, extractor, "gen", layer), _features(b, extractor, "gen", layer)
            if metric == "fid":
                est: Any = stats.FID()
            elif metric == "kid":
                m = a.doc["metrics"]["kid"]
                est = stats.KID(m.get("subsets", 100), min(m.get("subset_size", 1000), len(ga), len(gb), len(real)),
                                seed)
            else:
                est = stats.PRC(a.doc["metrics"]["prc"].get("k", 3))
            points = (_values(a, metric), _values(b, metric))  # the numbers metrics.json holds, not recomputed
            for c in stats.compare(est, ga, gb, real, n_boot=n_boot, seed=seed, points=points).values():
                rows.append({"a_label": a.label, "b_label": b.label, **c.to_dict()})
    if not rows:
        raise UserError("no metric the runs have in common among " + ", ".join(metrics) + " (score them with "
                        "--metrics fid,kid,prc)")
    return rows
