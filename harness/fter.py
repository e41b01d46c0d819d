"""Two-way FTER: are a run's images useful as training data? (Zhang 2024, "Methods for Domain-Specific Fine-Tuning
for Generative Models": train on synthetic / test on real, and train on real / test on synthetic.)

    harness generate RUN --prompts split:train          # one image per training caption draw: labels from prompts
    harness fter RUN [--classifier-config clf.json]

Both classifiers are `harness train attributes` classifiers with the SAME config (budget, seed, backbone, image
size, label set):

- syn->real: trained on RUN's images, each labelled by its own prompt (`labels_for_caption`), tested on the real
  validation images;
- real->syn: trained on the real training images (labels = union of each image's captions), tested on RUN's images
  (labels = their prompts);
- real->real (reference): the real->syn classifier tested on the real validation images.

Both test sides are labelled alike: an image + ONE caption (RUN's images by their prompt, each validation image by
the caption `--prompts split:val` draws for it), so a perfect copy is not pushed above 1 by a richer label set on
one side (with the union of the validation captions, a copy of the training images measured FTER 1.06).

FTER = AUROC(syn->real) / AUROC(real->syn); 1 is best, > 1 means the synthetic set trains better than the real one
recognises it. Every AUROC is the macro mean over the same labels: those with positives and negatives in both
test sets. Intervals: seeded bootstrap (seed 2020 as `harness score`) of the validation images, and of RUN's prompts
with all their images (images of one prompt are not independent; an image bootstrap put the test pattern's
real->syn AUROC of 0.54 "above chance").

When AUROC(real->syn) is not above chance (the lower end of its interval <= 0.5), the real classifier recognises
none of the asked attributes in the images and the ratio of two chance-level AUROCs is ~1, the "best" value: FTER
is then reported as not meaningful (`value` null, the ratio kept as `ratio`), so a pure-noise generator can never
rank above a useful one. A pure copy of training images has real->syn measured on the real classifier's own
training images (optimistic), so its FTER is below 1 by the classifier's generalisation gap.

Prompts must be training captions of the split: the labels come from them, and validation captions would put the
test set's captions into the synthetic training side. The real classifier depends only on (config, data, labels):
it is trained once into `<runs>/fter-real-<key>` and reused by every run scored with the same config.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.config import to_dict
from harness.errors import UserError
from harness.io import dumps_json, read_json, sha256_bytes, write_json
from harness.runs import Run, runs_root

METRIC = "fter"


def training_captions(data_dir: str | Path, split_path: str | Path) -> set[str]:
    from harness.data import load_devset
    from harness.split import load_split

    devset, split = load_devset(data_dir), load_split(split_path)
    by_image = devset.captions_by_image()
    return {c for i in split.train for c in by_image.get(i, [])}


def check_prompts(prompts: list[str] | None, data_dir: str | Path, split_path: str | Path, where: Path) -> None:
    """Refuse a run whose prompts are not all training captions, or are the `split:val` draw (the caption templates
    are shared, so most validation captions are training captions too, but that draw mirrors the validation images'
    own attribute combinations)."""
    from harness.prompts import validation_prompts
    from harness.split import load_split

    if not prompts:
        raise UserError("the run's images have no prompts (manifest.csv); generate them with "
                        "`harness generate RUN --prompts split:train`", where)
    n_val = len(load_split(split_path).val)
    if n_val and len(prompts) % n_val == 0 and \
            validation_prompts(data_dir, split_path, len(prompts) // n_val) == list(prompts):
        raise UserError("the run's prompts are `--prompts split:val` (the validation images' captions), and FTER "
                        "tests on the validation images; generate with `harness generate RUN --prompts split:train`",
                        where)
    train_caps = training_captions(data_dir, split_path)
    bad = [p for p in prompts if p not in train_caps]
    if bad:
        raise UserError(f"{len(bad)} of {len(prompts)} prompts are not training captions of the split (e.g. "
                        f"{bad[0]!r}): FTER labels images by their prompts and tests on the validation images; "
                        "generate with `harness generate RUN --prompts split:train`", where)


def _real_classifier(cfg, train_set, hashes: dict, labels: list[str]) -> Run:
    """The real->syn / real->real classifier: trained once per (config, data, labels), then reused."""
    from harness.attributes import fit
    from harness.trainer import FINAL_DIR

    key = sha256_bytes(dumps_json({"config": to_dict(cfg), "data": hashes, "labels": labels}).encode())[:12]
    root = runs_root()
    run_dir = root / f"fter-real-{key}"
    if (run_dir / FINAL_DIR).is_dir() and (run_dir / "config.json").is_file():
        return Run(run_dir)
    if run_dir.exists():  # an interrupted earlier attempt: train it again from the start
        shutil.rmtree(run_dir)
    return fit(cfg, train_set, None, hashes, labels, root=root, run_id=run_dir.name,
               extra={"purpose": "fter: real training images -> classifier reused by every FTER with this config"})


def _model(run: Run):
    from harness.attributes import load_classifier

    return load_classifier(run.dir).model


def run_fter(run: Run, classifier_overrides: dict | None = None, *, data_dir: str | Path | None = None,
             split_path: str | Path | None = None, n_boot: int = 200, seed: int = 2020,
             device: str = "auto") -> dict[str, Any]:
    """Train both classifiers, evaluate the three directions, write metrics.json["fter"]; returns that entry."""
    from harness.attributes import (LabelledImages, attribute_config, choose_labels, fit, label_aurocs,
                                    label_matrix, labels_for_caption, load_images, predict, real_side)
    from harness.distributed import pick_device
    from harness.score import generated_set, recorded_data_paths

    dev = pick_device(device)
    gen = generated_set(run)
    if data_dir is None or split_path is None:
        rec_data, rec_split = recorded_data_paths(run, run.config())
        data_dir, split_path = data_dir or rec_data, split_path or rec_split
    if not data_dir or not split_path:
        raise UserError("the run's config names no split / dev-set directory: pass --split and --data", run.dir)
    cfg = attribute_config(data_dir, split_path, classifier_overrides)
    check_prompts(gen.prompts, data_dir, split_path, gen.dir / "manifest.csv")
    real_train, hashes = real_side(data_dir, split_path, "train")
    real_val, _ = real_side(data_dir, split_path, "val")
    from harness.prompts import validation_prompts

    val_caps = validation_prompts(data_dir, split_path, 1)  # one caption per validation image, sorted like real_val
    labels, _ = choose_labels(real_train.label_sets, cfg.min_count)
    if not labels:
        raise UserError(f"no label occurs in at least {cfg.min_count} training images; lower min_count")
    syn = LabelledImages("generated images", list(gen.images.paths), [labels_for_caption(p) for p in gen.prompts])

    real_run = _real_classifier(cfg, real_train, hashes, labels)
    syn_hashes = {**hashes, "side": "generated", "n_images": len(syn), "generated_sha256": gen.images.sha256,
                  "generated_run": run.id}
    syn_run = fit(cfg, syn, None, syn_hashes, labels, root=run.dir / METRIC, tag="syn",
                  extra={"purpose": f"fter: {run.id}'s images labelled by their prompts"})
    real_model, syn_model = _model(real_run), _model(syn_run)

    val_imgs = load_images(real_val.paths, cfg.image_size, cfg.fit, "validation images")
    syn_imgs = load_images(syn.paths, cfg.image_size, cfg.fit, "generated images")
    t_val = label_matrix([labels_for_caption(c) for c in val_caps], labels)
    t_syn = label_matrix(syn.label_sets, labels)
    p_sr = predict(syn_model, val_imgs, device=dev)
    p_rs = predict(real_model, syn_imgs, device=dev)
    p_rr = predict(real_model, val_imgs, device=dev)

    def both(t: torch.Tensor) -> set[int]:
        s = t.sum(0)
        return {j for j in range(len(labels)) if 0 < s[j] < len(t)}

    cols = sorted(both(t_val) & both(t_syn))
    warnings = []
    if not cols:
        raise UserError("no label has positives and negatives in both the validation images and the run's prompts "
                        "(too few images?)", run.dir)
    a_sr, a_rs, a_rr = label_aurocs(p_sr, t_val), label_aurocs(p_rs, t_syn), label_aurocs(p_rr, t_val)

    def mac(a: np.ndarray) -> float:
        return float(np.nanmean(a[cols]))

    sr, rs, rr = mac(a_sr), mac(a_rs), mac(a_rr)
    ratio = sr / rs if rs > 0 else float("nan")
    out: dict[str, Any] = {
        "auroc_syn_to_real": sr, "auroc_real_to_syn": rs, "auroc_real_to_real": rr, "ratio": ratio,
        "n_gen": len(syn), "n_real_train": len(real_train), "n_real_val": len(real_val),
        "labels_scored": [labels[j] for j in cols],
        "labels": {labels[j]: {"syn_to_real": _f(a_sr[j]), "real_to_syn": _f(a_rs[j]), "real_to_real": _f(a_rr[j]),
                               "val_positives": int(t_val[:, j].sum()), "gen_positives": int(t_syn[:, j].sum())}
                   for j in cols},
        "classifier_config": to_dict(dataclasses.replace(cfg, labels=labels)),
        "real_classifier": str(real_run.dir.resolve()), "syn_classifier": str(syn_run.dir.resolve()),
        "seed": {"classifier": cfg.loop.seed, "bootstrap": seed},
        "data": hashes, "generated_sha256": gen.images.sha256,
        "test_labels": "one caption per image: RUN's prompts; the split:val draw for the validation images",
        "prediction_spread": {"syn_to_real": float(p_sr.std()), "real_to_syn": float(p_rs.std())},
    }
    if n_boot:
        from harness.attributes import bootstrap, macro_auroc

        def boot(p, t, point, groups=None):
            return bootstrap(lambda idx: macro_auroc(p[idx], t[idx], cols), len(t), point, n_boot, seed, groups=groups)

        out["intervals"] = {"syn_to_real": boot(p_sr, t_val, sr), "real_to_syn": boot(p_rs, t_syn, rs, gen.prompts),
                            "real_to_real": boot(p_rr, t_val, rr)}
        out["ratio_interval"] = _ratio_interval(p_sr, t_val, p_rs, t_syn, gen.prompts, cols, ratio, n_boot, seed)
        meaningful = out["intervals"]["real_to_syn"]["low"] > 0.5
        why = "the lower end of AUROC(real->syn)'s 95 % interval"
    else:
        meaningful = rs > 0.5
        why = "AUROC(real->syn) (no bootstrap)"
    out["status"] = "ok" if meaningful else "not meaningful"
    out["value"] = ratio if meaningful else None
    if not meaningful:
        out["reason"] = (f"{why} is not above 0.5: the real classifier recognises none of the asked attributes in "
                         "these images, and a ratio of chance-level AUROCs says nothing")
        warnings.append(f"FTER not meaningful: {out['reason']}")
    if len(syn) < len(real_train):
        warnings.append(f"the synthetic training set has {len(syn)} images, the real one {len(real_train)}: same "
                        "steps and seed, but fewer distinct images (generate with --images-per-prompt K to match)")
    out["warnings"] = warnings
    _write(run, out)
    run.log(f"fter: syn->real {sr:.4f}, real->syn {rs:.4f}, real->real {rr:.4f}, FTER "
            f"{'n/a' if out['value'] is None else f'{ratio:.4f}'} ({len(cols)} labels)")
    return out


def _f(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def _ratio_interval(p_sr, t_val, p_rs, t_syn, prompts, cols, point, n_boot, seed) -> dict[str, Any]:
    """Bootstrap of the ratio: the validation images and RUN's prompts resampled independently in each replicate."""
    from harness.attributes import macro_auroc, resampler
    from harness.stats import Interval, _interval

    rng = np.random.default_rng(seed)
    draw_val, draw_syn = resampler(len(t_val), None, rng), resampler(len(t_syn), prompts, rng)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        iv, isyn = draw_val(), draw_syn()
        d = macro_auroc(p_rs[isyn], t_syn[isyn], cols)
        reps[b] = macro_auroc(p_sr[iv], t_val[iv], cols) / d if d > 0 else np.nan
    low, high = _interval(point, reps, 0.95)
    return Interval(point, low, high, 0.95, n_boot, seed).to_dict()


def _write(run: Run, entry: dict[str, Any]) -> None:
    """metrics.json["fter"] (the rest of the file untouched; `harness score` keeps the key when it re-scores)."""
    from harness.score import METRICS_FORMAT

    path = run.metrics_path
    doc = read_json(path) if path.is_file() else {"format": METRICS_FORMAT, "run_id": run.id}
    if not isinstance(doc, dict):
        raise UserError("metrics.json is not a JSON object", path)
    doc[METRIC] = entry
    write_json(path, doc)


def fter_table(result: dict[str, Any]):
    """rich Table: the three AUROCs with intervals, FTER, and per label."""
    from rich.table import Table

    ivs = result.get("intervals", {})

    def cell(v, iv=None):
        if v is None:
            return "—"
        s = f"{v:.3f}"
        if iv and np.isfinite(iv.get("low", np.nan)):
            s += f" [{iv['low']:.3f}, {iv['high']:.3f}]"
        return s

    t = Table(title=f"FTER over {len(result['labels_scored'])} labels (N_gen {result['n_gen']}, real train "
                    f"{result['n_real_train']}, real val {result['n_real_val']})")
    t.add_column("label")
    for c in ("syn→real", "real→syn", "real→real"):
        t.add_column(c, justify="right")
    for lab, r in result["labels"].items():
        t.add_row(lab, cell(r["syn_to_real"]), cell(r["real_to_syn"]), cell(r["real_to_real"]))
    t.add_row("[bold]macro AUROC[/]", cell(result["auroc_syn_to_real"], ivs.get("syn_to_real")),
              cell(result["auroc_real_to_syn"], ivs.get("real_to_syn")),
              cell(result["auroc_real_to_real"], ivs.get("real_to_real")))
    fter = (cell(result["value"], result.get("ratio_interval")) if result["value"] is not None
            else f"not meaningful (ratio {result['ratio']:.3f})")
    t.add_row("[bold]FTER = syn→real / real→syn[/]", fter, "", "")
    return t
