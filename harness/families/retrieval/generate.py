"""The retrieval generator: for each prompt, a training image whose caption asks for the same attributes.

Matching (by the attribute signatures of harness/families/retrieval/index.py):
  1. exact: the training images with a caption whose signature equals the prompt's;
  2. otherwise best overlap: the images with a caption of the highest Jaccard overlap |P ∩ S| / |P ∪ S| between the
     prompt's signature P and the caption's S (ties: all of them); no overlap at all: any training image.
Among the candidates (sorted by name) image k takes the one `numpy.random.default_rng(seeds[k])` draws, so the
choice depends only on (prompt, seed, index) and is the same for any batch size or number of processes. The image is
written as the training transform shows it (`harness.dataset.training_view`: pad/crop to square, antialiased
bicubic resize) at the generation size, so `harness score --real-preprocess match` compares it pixel for pixel with
the training image it copies. `image_records` tells `harness generate` which image each index got (images/records.csv).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from harness.errors import UserError
from harness.generate import Generator
from harness.runs import Run

# `harness generate` options with no meaning for a copy of a training image: refused, never ignored.
NO_SAMPLER = {"steps": "--steps", "guidance": "--guidance", "dtype": "--dtype"}


class RetrievalIndex:
    """Signature -> training images, plus the caption that carries the signature (for the records)."""

    def __init__(self, doc: dict[str, Any]):
        by_sig: dict[tuple[str, ...], set[str]] = {}
        caption_of: dict[tuple[str, ...], str] = {}
        self.sha256: dict[str, str] = {}
        for entry in doc["images"]:
            self.sha256[entry["image"]] = entry["sha256"]
            for c in entry["captions"]:
                sig = tuple(c["signature"])
                by_sig.setdefault(sig, set()).add(entry["image"])
                caption_of[sig] = min(caption_of.get(sig, c["caption"]), c["caption"])
        if not self.sha256:
            raise UserError("the retrieval index holds no training image")
        self.by_sig = {s: sorted(v) for s, v in by_sig.items()}
        self.caption_of = caption_of
        self.all_images = sorted(self.sha256)
        self._sets = {s: frozenset(s) for s in self.by_sig}

    @lru_cache(maxsize=None)
    def candidates(self, prompt: str) -> tuple[tuple[str, ...], str, float, str]:
        """(candidate images, match kind "exact" | "overlap" | "none", overlap, a caption that matched)."""
        from harness.families.retrieval.index import signature

        sig = signature(prompt)
        if sig in self.by_sig:
            return tuple(self.by_sig[sig]), "exact", 1.0, self.caption_of[sig]
        p = frozenset(sig)
        best, sigs = 0.0, []
        for s, members in self._sets.items():
            union = len(p | members)
            score = len(p & members) / union if union else 0.0
            if score > best + 1e-12:
                best, sigs = score, [s]
            elif abs(score - best) <= 1e-12 and score > 0:
                sigs.append(s)
        if not sigs:
            return tuple(self.all_images), "none", 0.0, ""
        images = sorted({i for s in sigs for i in self.by_sig[s]})
        return tuple(images), "overlap", best, min(self.caption_of[s] for s in sigs)

    def choose(self, prompt: str, seed: int) -> dict[str, Any]:
        images, kind, overlap, caption = self.candidates(prompt)
        pick = images[int(np.random.default_rng(seed).integers(len(images)))]
        return {"training_image": pick, "match": kind, "overlap": round(overlap, 4), "candidates": len(images),
                "matched_caption": caption}


class RetrievalGenerator(Generator):
    def __init__(self, index: RetrievalIndex, images_dir: Path, size: int, fit: str, index_sha256: str):
        self.index, self.images_dir, self.size, self.fit, self.index_sha256 = index, images_dir, size, fit, index_sha256

    def _load(self, name: str) -> np.ndarray:
        from harness.dataset import training_view
        from harness.io import sha256_file

        path = self.images_dir / name
        if not path.is_file():
            raise UserError(f"training image {name} of the retrieval index is missing", path)
        if sha256_file(path) != self.index.sha256[name]:
            raise UserError(f"training image {name} changed since it was indexed; run `harness train retrieval` "
                            "again", path)
        return np.asarray(training_view(path, self.size, self.fit), dtype=np.uint8).copy()

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        return [self._load(self.index.choose(p, s)["training_image"]) for p, s in zip(prompts, seeds)]

    def image_records(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
        """Which training image each prompt got and why (harness generate writes them to images/records.csv)."""
        return [self.index.choose(p, s) for p, s in zip(prompts, seeds)]

    def info(self) -> dict[str, Any]:
        return {"family": "retrieval", "index_sha256": self.index_sha256, "size": self.size, "fit": self.fit,
                "matching": "exact attribute signature, else best Jaccard overlap; candidate drawn by the image seed"}


def load_generator(run: Run, overrides: dict[str, Any]) -> Generator:
    from harness.data import IMAGES_DIR
    from harness.families.retrieval.index import load_index

    for key, option in NO_SAMPLER.items():
        if overrides.get(key) is not None:
            raise UserError(f"{option} does not apply to the retrieval family: it copies training images (no "
                            "sampler, no network)", run.dir)
    cfg = run.config()
    height, width = overrides.get("height"), overrides.get("width")
    if height is not None and width is not None and height != width:
        raise UserError(f"--height {height} --width {width}: the retrieval family writes square images (the "
                        "training transform pads or crops to a square); give one size", run.dir)
    size = int(height or width or cfg.get("size", 256))
    data_dir = Path(run.resolve_recorded(cfg["data_dir"], "dev-set directory"))
    doc = load_index(run)
    return RetrievalGenerator(RetrievalIndex(doc), data_dir / IMAGES_DIR, size, str(cfg.get("fit", "pad")),
                              str(cfg.get("index_sha256", "")))
