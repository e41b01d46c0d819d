"""Tiny synthetic reader studies for the `harness rate` tests: two test-pattern runs over the shipped sample's
captions, trained (in name) on a split of the sample, so `rate make` finds real validation images on its own."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from harness.data import load_devset
from harness.generate import TestPatternGenerator, generate_images
from harness.io import sha256_file
from harness.rating.study import CSV_COLUMNS
from harness.runs import create_run
from harness.split import write_split


def make_runs(tmp_path: Path, sample_dir: Path, n_runs: int = 2, n_images: int = 16, val_images: int = 12):
    split = tmp_path / "split.json"
    content = write_split(sample_dir, split, val_images=val_images, seed=0)
    ds = load_devset(sample_dir)
    # prompts: the captions of the split's validation images, cycling (normal and abnormal findings both occur)
    caps = [c for img in content["val"] for c in ds.captions_by_image()[img]]
    prompts = [caps[i % len(caps)] for i in range(n_images)]
    runs = []
    for k in range(n_runs):
        run = create_run("test-pattern", {"size": 24 + 8 * k, "data_dir": str(sample_dir), "split": str(split)},
                         data={"split_sha256": sha256_file(split)},
                         tag=f"model{k}")
        generate_images(TestPatternGenerator(size=24 + 8 * k), prompts, run.images_dir, base_seed=k)
        runs.append(run)
    return runs, split


def ratings_csv(key: dict, rater: str, likert, turing=None, order=None) -> str:
    """A CSV as the page exports it: every item, in `order` (default: key order), answers from callables/maps."""
    items = key["items"] if order is None else order
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for pos, it in enumerate(items, start=1):
        lik = likert(it) if callable(likert) else likert
        tur = (turing(it) if callable(turing) else turing) if turing is not None else ""
        w.writerow([key["study"], rater, it["id"], pos, "" if lik is None else lik, tur or "",
                    "2026-12-02T05:00:00.000Z" if lik is not None else ""])
    return buf.getvalue()
