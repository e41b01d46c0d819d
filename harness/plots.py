"""Leaderboard figures (matplotlib, Agg backend, PNG, written atomically).

- `sweep_plot`: FID / precision / recall / F1 against LoRA rank for the runs of one sweep - the shape of the seed
  paper's Tables 1-2 (rank on a log2 axis, since the grid is 4, 8, 16, ..., 64, 128);
- `sample_grid`: the first 16 images of a run with their prompts, to see what a number means.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display, same output everywhere

import matplotlib.pyplot as plt  # noqa: E402

from harness.io import atomic_path  # noqa: E402

SWEEP_PANELS = (("fid", "FID (lower is better)"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1"))
PNG_META = {"Software": None}  # no matplotlib version stamp: the same data gives the same bytes


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=PNG_META)
    plt.close(fig)
    return path


def sweep_plot(points: Sequence[dict], out: Path, title: str, xlabel: str = "LoRA rank", log2: bool = True,
               tick_labels: dict | None = None) -> Path:
    """`points`: dicts with `rank` (the x value), `series` (a line label, e.g. the family) and any of
    fid/precision/recall/f1; optional `<metric>_low` / `<metric>_high` (a confidence interval) are drawn as error
    bars. Other swept axes: `xlabel`, `log2=False` for a linear axis, `tick_labels` {x: label} for cells that are
    not numbers (x = the cell's position)."""
    fig, axes = plt.subplots(1, len(SWEEP_PANELS), figsize=(4 * len(SWEEP_PANELS), 3.4), constrained_layout=True)
    series = sorted({p["series"] for p in points})
    ranks = sorted({p["rank"] for p in points})
    for ax, (key, label) in zip(axes, SWEEP_PANELS):
        for s in series:
            pts = sorted((p["rank"], p[key], p.get(f"{key}_low"), p.get(f"{key}_high")) for p in points
                         if p["series"] == s and p.get(key) is not None)
            if pts:
                # cells of a multi-axis grid are not an ordered axis: points, no line between them
                line = ax.plot([r for r, *_ in pts], [v for _, v, *_ in pts], marker="o", label=s,
                               linestyle="none" if tick_labels else "-")[0]
                bars = [(r, v, lo, hi) for r, v, lo, hi in pts if lo is not None and hi is not None]
                if bars:
                    ax.errorbar([b[0] for b in bars], [b[1] for b in bars],
                                yerr=[[max(0.0, b[1] - b[2]) for b in bars], [max(0.0, b[3] - b[1]) for b in bars]], fmt="none",
                                ecolor=line.get_color(), capsize=3)
        if log2:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str((tick_labels or {}).get(r, r)) for r in ranks],
                      rotation=30 if tick_labels else 0, fontsize=8 if tick_labels else None,
                      ha="right" if tick_labels else "center")
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    if len(series) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def sample_grid(images: Sequence[Path], prompts: Sequence[str], out: Path, title: str = "", cols: int = 4) -> Path:
    """Up to 16 images in a `cols`-wide grid, each with its prompt wrapped underneath."""
    from PIL import Image

    images, prompts = list(images)[:16], list(prompts)[:16]
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.6 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        with Image.open(images[k]) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title("\n".join(textwrap.wrap(prompts[k], 42)[:4]), fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
