"""Prompt adherence: does each generated image show the attributes its own prompt asks for?

`harness score RUN --metrics adherence --classifier CLF_RUN`. The attribute classifier of CLF_RUN (`harness train
attributes`) gives each generated image P(label | image); the prompt recorded with that image (RUN/images/
manifest.csv) gives the labels it asks for (`harness.attributes.labels_for_caption`). Then, over the generated
images:

- per label: AUROC of the classifier's probability, positives = images whose prompt asks for the label, negatives =
  the others; F1 / precision / recall at p >= 0.5;
- macro AUROC (the headline `value`) and macro F1 over the labels with both classes among the prompts;
- `all_asked`: the fraction of images (among those whose prompt asks for at least one classifier label) for which
  every asked label is predicted (p >= 0.5) - the strict, per-image reading;
- a bootstrap 95 % interval for both (seed 2020 as `harness score`), resampling PROMPTS with all their images:
  images made from one prompt are not independent (K images per caption, captions repeated across images; the
  test pattern's images of a prompt even share their colour), and an image-level bootstrap was 3x too narrow.

A prompt is one caption, which commits to one aspect ("containing a polyp"), so an image whose prompt does not
mention an attribute is a negative even if the image may show it: AUROC here is lower than the classifier's
ceiling (classifier_metrics.json, labels = union of an image's captions) even for real images. Read the number
against the same computation on real images with their own captions - a folder of real images with a manifest,
or the retrieval baseline - not against the ceiling. Labels the classifier does not know (rarer than its
--min-count) are not scored; how often prompts asked for them is reported (`unscored_asks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import UserError

METRIC = "adherence"


def adherence(paths: list[Path], prompts: list[str], classifier_dir: str | Path, device: str = "cpu",
              n_boot: int = 200, seed: int = 2020) -> dict[str, Any]:
    """The adherence result (metrics.json entry) of images `paths` generated from `prompts`."""
    from collections import Counter

    from harness.attributes import (THRESHOLD, bootstrap, label_matrix, labels_for_caption, load_classifier,
                                    macro, per_label)

    if len(paths) != len(prompts):
        raise ValueError("one prompt per image")
    clf = load_classifier(classifier_dir, device)
    labels = clf.labels
    asked = [labels_for_caption(p) for p in prompts]
    unscored = Counter(lab for s in asked for lab in s if lab not in labels)
    probs = clf.predict_proba(clf.load(paths, "generated images"))
    targets = label_matrix(asked, labels)
    rows = per_label(probs, targets, labels)
    pred = probs >= THRESHOLD
    has_ask = targets.sum(1) > 0
    every = ((pred | (targets == 0)).all(1) & has_ask).float()
    n_ask = int(has_ask.sum())

    def macro_auc(idx) -> float:
        from harness.attributes import macro_auroc

        return macro_auroc(probs[idx], targets[idx])

    def all_asked(idx) -> float:
        m = has_ask[idx]
        return float(every[idx][m].sum() / m.sum()) if int(m.sum()) else float("nan")

    value = macro(rows, "auroc")
    frac = all_asked(np.arange(len(paths))) if n_ask else None
    out: dict[str, Any] = {
        "status": "ok", "value": value, "n_gen": len(paths), "n_real": None,
        "extractor": "attribute-classifier", "features": f"attribute classifier {clf.run.id}",
        "weights_sha256": clf.identity()["weights_sha256"], "weights_verified": True,
        "macro_auroc": value, "macro_f1": macro(rows, "f1"),
        "n_labels_scored": sum(r["auroc"] is not None for r in rows.values()),
        "all_asked": frac, "n_images_with_asks": n_ask, "threshold": THRESHOLD,
        "labels": rows, "unscored_asks": dict(unscored.most_common()),
        "prediction_spread": float(probs.std()) if probs.numel() > 1 else 0.0,
        "classifier": clf.identity(), "negatives": "images whose prompt does not ask for the label",
    }
    if value is None:
        return {"status": "not computed", "reason": "no classifier label has both asked and not-asked images among "
                                                    "the prompts", "n_gen": len(paths)}
    if n_boot:
        out["interval"] = bootstrap(macro_auc, len(paths), value, n_boot, seed, groups=prompts)
        if frac is not None:
            out["all_asked_interval"] = bootstrap(all_asked, len(paths), frac, n_boot, seed, groups=prompts)
    return out


def adherence_metric(gen, cfg) -> dict[str, Any]:
    """`harness score` hook: the adherence entry of a GeneratedSet under a ScoreConfig (cfg.classifier)."""
    from harness.distributed import pick_device

    if cfg.classifier is None:
        raise UserError("--metrics adherence needs --classifier CLF_RUN (a run of `harness train attributes`)")
    if gen.prompts is None:
        return {"status": "not computed", "reason": "the images have no manifest.csv: their prompts are unknown"}
    return adherence(list(gen.images.paths), list(gen.prompts), cfg.classifier, str(pick_device(cfg.device)),
                     cfg.bootstrap, cfg.rng_seed)
