"""`harness rate summarize`: read the raters' CSVs against the study key and compute the reader-study statistics.

Per source and case type (and over all case types):
- realism: mean Likert score (1-5) with a 95 % bootstrap percentile interval, and the distribution of answers;
- visual Turing test (studies made with --turing): the share of a source's images called "real", and, for a run,
  the accuracy of telling its images from the real control images (the control's images of the same case types)
  with its interval, an exact two-sided binomial test against 50 % and whether the interval excludes 50 %;
- inter-rater agreement (>= 2 raters): Krippendorff's alpha, ordinal metric for the Likert scores, nominal for the
  real/synthetic answers (Krippendorff 2011, "Computing Krippendorff's alpha-reliability").

The bootstrap resamples images (within each source, so a two-source accuracy keeps its balance) and raters
independently, with replacement: answers of one rater, and answers on one image, are not independent, and a
resample of answers alone would give intervals that are too narrow. With one rater only images are resampled. The
binomial p-value treats every answer as independent (exact for one rater; read the interval when there are more).

Input is checked strictly before anything is written: a CSV from another study, a row naming an item the key does
not have, a duplicate answer (an item twice in one file, or one rater in two files), a value out of range and a
truncated file are each one error naming the file and row.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from harness import __version__
from harness.errors import UserError
from harness.io import read_json, sha256_file, write_json, write_text
from harness.rating.study import CSV_COLUMNS, REAL_SOURCE, load_key

RESULT_FORMAT = "harness-reader-study/1"
RUN_FILE = "reader_study.json"
DEFAULT_N_BOOT = 2000  # percentile intervals need ~1000-2000 replicates (Efron & Tibshirani 1993, ch. 19)
DEFAULT_LEVEL = 0.95
ALL = "all"


# ------------------------------------------------------------------------------------------------- reading CSVs


@dataclass
class RaterSheet:
    path: Path
    rater: str
    sha256: str
    likert: dict[str, int]  # item id -> 1..5 (answered items only)
    turing: dict[str, str]  # item id -> "real" | "synthetic"
    position: dict[str, int]  # item id -> position this rater saw it at
    answered_at: dict[str, str]


def read_sheet(path: str | Path, key: dict[str, Any]) -> RaterSheet:
    """One rater's exported CSV, checked row by row against the key (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("ratings file not found", path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start}): not a ratings file", path) from None
    lines = text.splitlines()
    if not text.strip():
        raise UserError("empty file (truncated download?)", path, 1)
    if list(next(csv.reader([lines[0]]))) != CSV_COLUMNS:
        raise UserError(f"not a ratings file from `harness rate make`: the header should be "
                        f"{','.join(CSV_COLUMNS)}", path, 1)
    if not text.endswith("\n"):
        raise UserError("the file ends in the middle of a row: truncated (export it again)", path, len(lines))
    ids = {it["id"] for it in key["items"]}
    n = len(ids)
    turing_study = bool(key["settings"].get("turing"))
    sheet = RaterSheet(path, "", sha256_file(path), {}, {}, {}, {})
    first_row: dict[str, int] = {}
    seen_pos: dict[int, int] = {}
    rows = list(csv.reader(io.StringIO(text)))
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(CSV_COLUMNS):
            raise UserError(f"row has {len(row)} fields, expected {len(CSV_COLUMNS)} (truncated or edited file)",
                            path, line)
        study, rater, item, position, likert, turing, answered_at = (v.strip() for v in row)
        if study != key["study"]:
            raise UserError(f"ratings from another study ({study!r}; this key is study {key['study']!r})", path, line)
        if not rater:
            raise UserError("no rater name", path, line)
        if sheet.rater and rater != sheet.rater:
            raise UserError(f"rater {rater!r} differs from {sheet.rater!r} above: one file per rater", path, line)
        sheet.rater = rater
        if item not in ids:
            raise UserError(f"item {item!r} is not in this study's key (ratings from another study?)", path, line)
        if item in first_row:
            raise UserError(f"item {item} answered twice (first on row {first_row[item]})", path, line)
        first_row[item] = line
        if not position.isdigit() or not 1 <= int(position) <= n:
            raise UserError(f"position {position!r} out of range 1..{n}", path, line)
        if int(position) in seen_pos:
            raise UserError(f"position {position} appears twice (first on row {seen_pos[int(position)]})", path, line)
        seen_pos[int(position)] = line
        sheet.position[item] = int(position)
        if likert:
            if likert not in ("1", "2", "3", "4", "5"):
                raise UserError(f"likert {likert!r} out of range: must be a whole number 1..5 (or empty)", path, line)
            sheet.likert[item] = int(likert)
        if turing:
            if not turing_study:
                raise UserError(f"a real/synthetic answer ({turing!r}) in a study made without --turing", path, line)
            if turing not in ("real", "synthetic"):
                raise UserError(f"turing {turing!r} must be 'real', 'synthetic' or empty", path, line)
            sheet.turing[item] = turing
        if answered_at:
            sheet.answered_at[item] = answered_at
    if len(first_row) < n:
        raise UserError(f"the file lists {len(first_row)} of the study's {n} images (the page exports every image, "
                        "rated or not): truncated", path, len(rows))
    return sheet


def read_sheets(paths: Iterable[str | Path], key: dict[str, Any]) -> list[RaterSheet]:
    sheets: list[RaterSheet] = []
    for p in paths:
        s = read_sheet(p, key)
        for o in sheets:
            if o.rater == s.rater:
                raise UserError(f"rater {s.rater!r} already answered in {o.path}: duplicate answers (give each "
                                "rater's file once)", s.path, 2)
            if o.sha256 == s.sha256:
                raise UserError(f"same content as {o.path}: duplicate answers", s.path)
        sheets.append(s)
    if not sheets:
        raise UserError("give at least one ratings CSV")
    return sheets


# --------------------------------------------------------------------------------------------------- statistics


def bootstrap_mean(x: np.ndarray, groups: list[np.ndarray], *, n_boot: int, seed: int,
                   level: float = DEFAULT_LEVEL) -> tuple[float, float, float]:
    """Mean of the non-missing cells of x (raters x images, NaN = no answer) and its percentile interval, resampling
    raters and, within each group of image columns, images with replacement."""
    mask = ~np.isnan(x)
    if not mask.any():
        return float("nan"), float("nan"), float("nan")
    x0 = np.where(mask, x, 0.0)
    m = mask.astype(np.float64)
    point = float(x0.sum() / m.sum())
    rng = np.random.default_rng(seed)
    n_r, n_i = x.shape
    reps = np.empty(n_boot)
    for b in range(n_boot):
        wr = np.bincount(rng.integers(0, n_r, n_r), minlength=n_r).astype(np.float64)
        wi = np.zeros(n_i)
        for g in groups:
            np.add.at(wi, g[rng.integers(0, len(g), len(g))], 1.0)
        den = wr @ m @ wi
        reps[b] = (wr @ x0 @ wi) / den if den > 0 else np.nan
    reps = reps[np.isfinite(reps)]
    a = (1 - level) / 2
    return point, float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def krippendorff_alpha(data: np.ndarray, metric: str = "ordinal") -> float:
    """Krippendorff's alpha of a raters x units matrix (NaN = missing), nominal, ordinal or interval metric, from the
    coincidence matrix (units with fewer than 2 values are not pairable and are left out)."""
    data = np.asarray(data, dtype=np.float64)
    values = np.unique(data[~np.isnan(data)])
    if len(values) == 0:
        return float("nan")
    index = {v: k for k, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for u in range(data.shape[1]):
        col = data[:, u][~np.isnan(data[:, u])]
        if len(col) < 2:
            continue
        cnt = np.zeros(len(values))
        for v in col:
            cnt[index[v]] += 1
        o += (np.outer(cnt, cnt) - np.diag(cnt)) / (len(col) - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n <= 1:
        return float("nan")
    if metric == "nominal":
        d = 1.0 - np.eye(len(values))
    elif metric == "interval":
        d = (values[:, None] - values[None, :]) ** 2
    elif metric == "ordinal":
        cum = np.concatenate([[0.0], np.cumsum(n_c)])
        lo = np.minimum.outer(np.arange(len(values)), np.arange(len(values)))
        hi = np.maximum.outer(np.arange(len(values)), np.arange(len(values)))
        d = (cum[hi + 1] - cum[lo] - (n_c[:, None] + n_c[None, :]) / 2) ** 2
    else:
        raise ValueError(f"unknown metric {metric!r}")
    d_o = (o * d).sum() / n
    d_e = (np.outer(n_c, n_c) * d).sum() / (n * (n - 1))
    return float(1.0 - d_o / d_e) if d_e > 0 else float("nan")


def binomial_p(successes: int, trials: int) -> float:
    """Exact two-sided binomial test against p = 0.5 (scipy's binomtest)."""
    from scipy.stats import binomtest

    return float(binomtest(successes, trials, 0.5).pvalue) if trials else float("nan")


# ------------------------------------------------------------------------------------------------------ summary


@dataclass
class Matrix:
    items: list[dict[str, Any]]
    raters: list[str]
    likert: np.ndarray  # raters x items
    correct: np.ndarray  # 1 = right real/synthetic call, NaN = no answer
    said_real: np.ndarray  # 1 = "real"


def build_matrix(key: dict[str, Any], sheets: list[RaterSheet]) -> Matrix:
    items = key["items"]
    shape = (len(sheets), len(items))
    lik, cor, real = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    for r, s in enumerate(sheets):
        for i, it in enumerate(items):
            if it["id"] in s.likert:
                lik[r, i] = s.likert[it["id"]]
            if it["id"] in s.turing:
                said = s.turing[it["id"]] == "real"
                real[r, i] = float(said)
                cor[r, i] = float(said == (it["source"] == REAL_SOURCE))
    return Matrix(items, [s.rater for s in sheets], lik, cor, real)


def _interval(point: float, low: float, high: float) -> dict[str, float]:
    return {"mean": point, "low": low, "high": high}


def cell_stats(mx: Matrix, cols: np.ndarray, real_cols: np.ndarray | None, turing: bool, *, n_boot: int,
               seed: int, level: float) -> dict[str, Any]:
    lik = mx.likert[:, cols]
    answered = lik[~np.isnan(lik)].astype(int)
    out: dict[str, Any] = {
        "images": int(len(cols)),
        "ratings": int(len(answered)),
        "raters": int((~np.isnan(lik)).any(axis=1).sum()),
        "likert": _interval(*bootstrap_mean(lik, [np.arange(len(cols))], n_boot=n_boot, seed=seed, level=level)),
        "distribution": {str(v): int((answered == v).sum()) for v in range(1, 6)},
    }
    if turing:
        said = mx.said_real[:, cols]
        out["rated_real"] = _interval(*bootstrap_mean(said, [np.arange(len(cols))], n_boot=n_boot, seed=seed,
                                                      level=level))
        out["turing_answers"] = int((~np.isnan(said)).sum())
        if real_cols is not None and len(real_cols):
            both = np.concatenate([cols, real_cols])
            cor = mx.correct[:, both]
            groups = [np.arange(len(cols)), np.arange(len(cols), len(both))]
            acc, lo, hi = bootstrap_mean(cor, groups, n_boot=n_boot, seed=seed, level=level)
            k = int(np.nansum(cor))
            t = int((~np.isnan(cor)).sum())
            out["turing_vs_real"] = {"accuracy": acc, "low": lo, "high": hi, "correct": k, "answers": t,
                                     "p_binomial": binomial_p(k, t),
                                     "distinguishable": bool(np.isfinite(lo) and (lo > 0.5 or hi < 0.5))}
    return out


def summarize(key: dict[str, Any], sheets: list[RaterSheet], *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    if n_boot < 1:
        raise UserError(f"--n-boot must be >= 1, got {n_boot}")
    mx = build_matrix(key, sheets)
    turing = bool(key["settings"].get("turing"))
    sources = [s["source"] for s in key["sources"]]
    src = np.array([it["source"] for it in mx.items])
    strat = np.array([it["stratum"] for it in mx.items])
    result: dict[str, Any] = {}
    for s in sources:
        strata = sorted(set(strat[src == s]))
        cells = {}
        for st in ([ALL] if len(strata) == 1 else [ALL] + strata):
            sel = (src == s) if st == ALL else (src == s) & (strat == st)
            cols = np.flatnonzero(sel)
            real_sel = (src == REAL_SOURCE) if st == ALL else (src == REAL_SOURCE) & (strat == st)
            real_cols = np.flatnonzero(real_sel) if s != REAL_SOURCE else None
            cells[st] = cell_stats(
                mx, cols, real_cols, turing, n_boot=n_boot, seed=seed, level=level)
        if len(strata) == 1 and strata[0] != ALL:
            cells[ALL]["stratum"] = strata[0]
        result[s] = cells
    overall: dict[str, Any] = {}
    if turing and REAL_SOURCE in sources:
        cor = mx.correct
        groups = [np.flatnonzero(src == s) for s in sources]
        acc, lo, hi = bootstrap_mean(cor, groups, n_boot=n_boot, seed=seed, level=level)
        k, t = int(np.nansum(cor)), int((~np.isnan(cor)).sum())
        overall["turing_accuracy"] = {"accuracy": acc, "low": lo, "high": hi, "correct": k, "answers": t,
                                      "p_binomial": binomial_p(k, t),
                                      "distinguishable": bool(np.isfinite(lo) and (lo > 0.5 or hi < 0.5))}
    agreement: dict[str, Any] = {}
    if len(sheets) >= 2:
        agreement["likert_alpha_ordinal"] = krippendorff_alpha(mx.likert, "ordinal")
        if turing:
            agreement["turing_alpha_nominal"] = krippendorff_alpha(mx.said_real, "nominal")
        agreement["images_rated_by_2_or_more"] = int(((~np.isnan(mx.likert)).sum(axis=0) >= 2).sum())
    return {
        "format": RESULT_FORMAT,
        "study": key["study"],
        "title": key.get("title", ""),
        "turing": turing,
        "by": key["settings"].get("by"),
        "harness_version": __version__,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level,
                      "method": "percentile; raters and images (within source) resampled with replacement"},
        "raters": [{"rater": s.rater, "file": str(s.path.resolve()), "sha256": s.sha256,
                    "likert_answers": len(s.likert), "turing_answers": len(s.turing),
                    "first_answer": min(s.answered_at.values(), default=None),
                    "last_answer": max(s.answered_at.values(), default=None)} for s in sheets],
        "sources": result,
        "overall": overall,
        "agreement": agreement,
    }


# ------------------------------------------------------------------------------------------------------ outputs


def _f(v: Any, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _ci(d: dict[str, Any] | None, key: str = "mean", digits: int = 2, pct: bool = False) -> str:
    if not d:
        return "–"
    k = 100.0 if pct else 1.0
    v, lo, hi = d.get(key), d.get("low"), d.get("high")
    if v is None or not np.isfinite(v):
        return "–"
    unit = " %" if pct else ""
    return f"{v * k:.{0 if pct else digits}f} [{lo * k:.{0 if pct else digits}f}, {hi * k:.{0 if pct else digits}f}]{unit}"


def _p(v: Any) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


TABLE_COLUMNS = ("Study", "Source", "Case type", "Images", "Raters", "Realism 1–5 [95 % CI]", "Answers 1/2/3/4/5",
                 "Called real [95 % CI]", "Turing accuracy vs real [95 % CI]", "p (vs 50 %)", "Rater α (ordinal)")


def table_rows(summary: dict[str, Any], only: Iterable[str] | None = None) -> list[list[str]]:
    """Rows of the reader-study table for the sources in `only` (default: every source) and the real control."""
    rows = []
    wanted = set(only) if only is not None else None
    alpha = _f(summary.get("agreement", {}).get("likert_alpha_ordinal"))
    for source, cells in summary["sources"].items():
        if wanted is not None and source not in wanted and source != REAL_SOURCE:
            continue
        for stratum, c in sorted(cells.items(), key=lambda kv: (kv[0] != ALL, kv[0])):
            name = "real (control)" if source == REAL_SOURCE else source
            case = c.get("stratum", stratum)
            dist = "/".join(str(c["distribution"][str(v)]) for v in range(1, 6))
            tv = c.get("turing_vs_real")
            rows.append([summary["study"], name, case, str(c["images"]), str(c["raters"]), _ci(c["likert"]), dist,
                         _ci(c.get("rated_real"), pct=True), _ci(tv, "accuracy", pct=True) if tv else "–",
                         _p(tv["p_binomial"]) if tv else "–", alpha])
    return rows


def _md_table(rows: list[list[str]]) -> list[str]:
    numeric = {"Images", "Raters"}
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---:" if c in numeric else "---" for c in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return lines


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Reader study {summary['study']}: {summary.get('title', '')}", "",
             f"{len(summary['raters'])} rater(s): " + ", ".join(
                 f"{r['rater']} ({r['likert_answers']} ratings)" for r in summary["raters"]), ""]
    lines += _md_table(table_rows(summary))
    ov = summary.get("overall", {}).get("turing_accuracy")
    if ov:
        lines += ["", f"Visual Turing test over all images: accuracy {_ci(ov, 'accuracy', pct=True)}, "
                      f"binomial p {_p(ov['p_binomial'])} "
                      f"({'distinguishable' if ov['distinguishable'] else 'not distinguishable'} from 50 %)."]
    ag = summary.get("agreement") or {}
    if ag:
        lines += ["", f"Inter-rater agreement (Krippendorff's alpha): Likert ordinal {_f(ag['likert_alpha_ordinal'])}"
                  + (f", real/synthetic nominal {_f(ag['turing_alpha_nominal'])}" if "turing_alpha_nominal" in ag
                     else "") + f" over {ag['images_rated_by_2_or_more']} images rated by 2 or more raters."]
    b = summary["bootstrap"]
    lines += ["", f"Intervals: {int(b['level'] * 100)} % bootstrap ({b['method']}), {b['n_boot']} replicates, "
                  f"seed {b['seed']}."]
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict[str, Any], out: Path) -> Path:
    """Mean Likert score per source (one bar per source, grouped by case type), with 95 % interval error bars."""
    import harness.plots  # noqa: F401  (selects the headless Agg backend)
    import matplotlib.pyplot as plt

    from harness.io import atomic_path
    from harness.plots import PNG_META

    sources = list(summary["sources"])
    strata = sorted({s for cells in summary["sources"].values() for s in cells if s != ALL})
    groups = [ALL] + strata
    width = 0.8 / len(sources)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.1 * len(groups) * len(sources) * 0.6), 3.6),
                           constrained_layout=True)
    for k, s in enumerate(sources):
        xs, ys, lo, hi = [], [], [], []
        for g, st in enumerate(groups):
            c = summary["sources"][s].get(st)
            if c is None or not np.isfinite(c["likert"]["mean"]):
                continue
            xs.append(g - 0.4 + width * (k + 0.5))
            ys.append(c["likert"]["mean"])
            lo.append(max(0.0, c["likert"]["mean"] - c["likert"]["low"]))
            hi.append(max(0.0, c["likert"]["high"] - c["likert"]["mean"]))
        label = "real (control)" if s == REAL_SOURCE else s
        ax.bar(xs, ys, width=width * 0.95, label=label, yerr=[lo, hi], capsize=3)
    ax.set_xticks(range(len(groups)), [("all images" if g == ALL else g) for g in groups], fontsize=8)
    ax.set_ylim(1, 5)
    ax.set_yticks([1, 2, 3, 4, 5], ["1 very\nunrealistic", "2", "3", "4", "5 very\nrealistic"], fontsize=7)
    ax.set_ylabel("mean realism (95 % CI)")
    ax.set_title(f"Reader study {summary['study']}: {len(summary['raters'])} rater(s)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=PNG_META)
    plt.close(fig)
    return out


def run_result(summary: dict[str, Any], source: str, key_path: Path, out_dir: Path) -> dict[str, Any]:
    """What one run keeps of a study: its own cells, the real control's, agreement, raters and provenance."""
    keep = {s: c for s, c in summary["sources"].items() if s in (source, REAL_SOURCE)}
    return {"source": source, "title": summary.get("title", ""), "turing": summary["turing"], "by": summary["by"],
            "sources": keep, "agreement": summary["agreement"], "raters": summary["raters"],
            "bootstrap": summary["bootstrap"], "key": str(key_path.resolve()),
            "key_sha256": sha256_file(key_path), "summary": str((out_dir / "summary.json").resolve()),
            "created": summary["created"], "harness_version": summary["harness_version"]}


@dataclass
class SummarizeResult:
    summary: dict[str, Any]
    out_dir: Path
    runs_updated: list[Path]
    runs_missing: list[str]


def summarize_study(key_path: str | Path, csv_paths: list[str | Path], out_dir: str | Path | None = None, *,
                    n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = DEFAULT_LEVEL, write_runs: bool = True,
                    log: Callable[[str], None] = lambda s: None) -> SummarizeResult:
    from harness.runs import open_run

    key_path = Path(key_path)
    key = load_key(key_path)
    sheets = read_sheets(csv_paths, key)  # every input checked before anything is written
    summary = summarize(key, sheets, n_boot=n_boot, seed=seed, level=level)
    out = Path(out_dir) if out_dir is not None else key_path.parent
    # Which runs to update, found before writing (a run folder that moved is looked for by id under the runs root).
    targets: list[tuple[Path, dict[str, Any]]] = []
    missing: list[str] = []
    if write_runs:
        for s in key["sources"]:
            if s.get("kind") != "run":
                continue
            try:
                run = open_run(s["run_dir"]) if Path(s["run_dir"]).is_dir() else open_run(s["source"])
            except UserError:
                missing.append(s["source"])
                log(f"[yellow]warning:[/] run {s['source']} not found at {s['run_dir']} nor under the runs root: "
                    f"its {RUN_FILE} was not updated")
                continue
            path = run.dir / RUN_FILE
            old = read_json(path) if path.is_file() else {}
            if not isinstance(old, dict) or old.get("format") != RESULT_FORMAT:
                old = {"format": RESULT_FORMAT, "studies": {}}
            studies = dict(old.get("studies", {}))
            studies[key["study"]] = run_result(summary, s["source"], key_path, out)
            targets.append((path, {"format": RESULT_FORMAT, "run_id": run.id, "studies": studies}))
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary))
    bar_chart(summary, out / "realism.png")
    for path, content in targets:
        write_json(path, content)
    return SummarizeResult(summary, out, [p for p, _ in targets], missing)


# -------------------------------------------------------------------------------------------------- leaderboard


def reader_study_markdown(root: Path | None = None) -> str:
    """The leaderboard's "Reader study" section from every run's reader_study.json ("" when there is none)."""
    from harness.runs import list_runs

    by_study: dict[str, tuple[dict[str, Any], set[str]]] = {}
    for run in list_runs(root):
        p = run.dir / RUN_FILE
        if not p.is_file():
            continue
        try:
            d = read_json(p)
        except UserError:
            continue
        for study, res in sorted((d.get("studies") or {}).items()):
            entry = by_study.setdefault(study, ({"study": study, "sources": {}, "agreement": res.get("agreement", {})},
                                                set()))
            entry[0]["sources"].update(res.get("sources", {}))
            entry[1].add(res.get("source", run.id))
    if not by_study:
        return ""
    rows: list[list[str]] = []
    for study in sorted(by_study):
        summary, runs = by_study[study]
        # control last, runs in name order
        ordered = {s: summary["sources"][s] for s in sorted(summary["sources"], key=lambda s: (s == REAL_SOURCE, s))}
        rows += table_rows({**summary, "sources": ordered}, only=runs)
    lines = ["## Reader study", "",
             "Blind realism ratings by clinicians (`harness rate make` / `harness rate summarize`): mean Likert score "
             "(1 very unrealistic - 5 very realistic), share of images called real, and the accuracy of telling a "
             "run's images from the real control images (50 % = indistinguishable). Intervals: bootstrap over raters "
             "and images.", ""]
    return "\n".join(lines + _md_table(rows)) + "\n"
