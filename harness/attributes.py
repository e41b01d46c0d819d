"""The attribute classifier: labels from captions, training through the shared loop, evaluation, and loading.

    harness train attributes --split S --data D [--backbone resnet18 --weights auto --image-size 128 --min-count 20]
        -> runs/attributes-.../final/classifier/ (models.attributes.AttributeClassifier, save_pretrained)
           runs/attributes-.../classifier_metrics.json (per-label AUROC / F1 on the validation images: the ceiling)

Labels. `harness.captions.extract_attributes` gives each caption's positive attributes; they are flattened to
"<kind>=<value>" labels (`labels_for_caption`): procedure=, finding=, generic= (category nouns: finding, landmark,
instrument), instrument=, count= (the numbers a caption commits to), size=, paris=, colour=, location=. Negations
and out-of-vocabulary words are not labels. An image has 7-14 captions, each from a template about ONE aspect
("containing a polyp", "with 2 findings", "located in the upper-left"), so a caption that does not mention an
attribute is no evidence that the image lacks it: an image's labels are the UNION of its captions' labels (a
consensus would keep almost nothing). Where captions contradict ("no polyps" beside "a polyp of size 11-20mm") the
positive claim wins, as in `captions.image_strata`. The label set is every label carried by at least `min_count`
training images and absent from at least `min_count` (a label on (nearly) every image carries no signal).

A generated image's label is its own prompt's labels (one caption): positives are the attributes the prompt asks
for; an attribute it does not mention counts as not asked (see harness/adherence.py for what that implies).

Images reach the classifier as training sees them (`harness.dataset.training_view`: decode, resize the longer side,
pad to a square) at the classifier's `image_size`, with no augmentation: a horizontal flip would swap the "left" /
"right" location labels, and the text / box overlays sit at fixed places.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from harness.config import from_dict, to_dict
from harness.dataset import to_model_pixels
from harness.errors import UserError
from harness.io import read_json, write_json
from harness.runs import Run, create_run, open_run
from harness.trainer import LoopConfig, TrainTask, unwrap

FAMILY = "attributes"
FINAL_SUBDIR = "classifier"
METRICS_FILE = "classifier_metrics.json"
THRESHOLD = 0.5  # F1 and "predicted" use p >= 0.5 (plain BCE: the sigmoid estimates P(label | image))

# extract_attributes() key -> label prefix. Left out: negations, unknown_terms (not things an image shows).
LABEL_KINDS = {"procedure": "procedure", "findings": "finding", "generic": "generic", "instruments": "instrument",
               "numbers": "count", "sizes": "size", "paris": "paris", "colours": "colour", "locations": "location"}

# Training budget of `harness train attributes` (loop defaults; every one can be overridden). Chosen here, no paper
# prescribes it: AdamW lr 1e-3 / weight decay 1e-4 / batch 32 is the usual from-scratch ResNet setting for small
# data; 600 steps = ~10 epochs of the 1,800 training images, measured 0.75 s/step for resnet18 at 128 px on 2 idle
# CPU cores (benchmarks/p8_attributes_cpu.py: 7.5 minutes), seconds on a GPU; 150 steps already reach a frequent-label
# macro AUROC of 0.93 on the validation images (tests/test_attributes_slow.py). Images are decoded once into memory,
# so no DataLoader workers.
DEFAULT_LOOP: dict[str, Any] = {"max_steps": 600, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4,
                                "checkpoint_every": 200, "val_every": 100, "val_batches": 8, "num_workers": 0}


# ------------------------------------------------------------------------------------------------------ labels


def labels_for_caption(text: str) -> set[str]:
    """The "<kind>=<value>" labels one caption (or any prompt) asks for."""
    from harness.captions import extract_attributes

    attrs = extract_attributes(text)
    return {f"{prefix}={v}" for key, prefix in LABEL_KINDS.items() for v in attrs[key]}


def labels_for_captions(captions: Iterable[str]) -> set[str]:
    """An image's labels: the union over its captions (module docstring)."""
    out: set[str] = set()
    for c in captions:
        out |= labels_for_caption(c)
    return out


def label_vector(text: str | set[str], labels: Sequence[str]) -> torch.Tensor:
    """float [L]: 1 where the caption (or a ready label set) asks for label l."""
    have = labels_for_caption(text) if isinstance(text, str) else text
    return torch.tensor([1.0 if lab in have else 0.0 for lab in labels])


def label_matrix(label_sets: Sequence[set[str]], labels: Sequence[str]) -> torch.Tensor:
    return torch.stack([label_vector(s, labels) for s in label_sets]) if label_sets else torch.zeros(0, len(labels))


def choose_labels(label_sets: Sequence[set[str]], min_count: int) -> tuple[list[str], dict[str, int]]:
    """(labels carried by >= min_count images and missing from >= min_count, most frequent first; every label's
    image count)."""
    freq = Counter(lab for s in label_sets for lab in s)
    n = len(label_sets)
    kept = [lab for lab, c in freq.items() if c >= min_count and n - c >= min_count]
    kept.sort(key=lambda lab: (-freq[lab], lab))
    return kept, dict(sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])))


# ------------------------------------------------------------------------------------------------------ image sets


@dataclass
class LabelledImages:
    """Images (paths) with the label set of each; `name` says what they are (for messages and records)."""

    name: str
    paths: list[Path]
    label_sets: list[set[str]]

    def __len__(self) -> int:
        return len(self.paths)


def real_side(data_dir: str | Path, split_path: str | Path, side: str) -> tuple[LabelledImages, dict[str, Any]]:
    """The split side's images labelled by the union of their captions; plus the data hashes a run records."""
    from harness.data import load_devset
    from harness.split import check_split_matches, load_split

    devset = load_devset(data_dir)
    split = load_split(split_path)
    check_split_matches(split, devset)
    ids = sorted(split.side(side))
    if not ids:
        raise UserError(f"the split has no {side} images", split.path)
    by_image = devset.captions_by_image()
    paths = [devset.image_path(i) for i in ids]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the {side} side are missing, e.g. {missing[0].name}",
                        devset.images_dir)
    hashes = {"csv_sha256": devset.csv_sha256, "split_sha256": split.sha256, "side": side, "n_images": len(ids),
              "split_seed": split.seed}
    return LabelledImages(f"{side} images", paths, [labels_for_captions(by_image[i]) for i in ids]), hashes


def load_images(paths: Sequence[Path], size: int, fit: str = "pad", what: str = "images") -> torch.Tensor:
    """uint8 [N, 3, size, size]: each image as training sees it (`training_view`), decoded once."""
    from harness.dataset import training_view
    from harness.progress import progress

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    with progress(transient=True) as bar:
        task = bar.add_task(f"decode {what}", total=len(paths))
        for i, p in enumerate(paths):
            out[i] = torch.from_numpy(np.asarray(training_view(Path(p), size, fit), dtype=np.uint8).copy()
                                      ).permute(2, 0, 1)
            bar.advance(task)
    return out


class ImageLabels(torch.utils.data.Dataset):
    """Items {"pixels": uint8 [3,S,S], "target": float [L]} from images already in memory (uint8 like every
    training dataset: a quarter of the bytes between loader workers; `to_model_pixels` on the device)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        if len(images) != len(targets):
            raise ValueError("images and targets differ in length")
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.images[i], "target": self.targets[i]}


# ------------------------------------------------------------------------------------------------------ config


@dataclass
class AttributeConfig:
    """`harness train attributes` (and each classifier `harness fter` trains). `resolved_weights` and `labels` are
    filled in when training starts (what the backbone started from; the label set chosen from the training side)."""

    data_dir: str
    split_path: str
    backbone: str = "resnet18"
    weights: str = "auto"  # auto = ImageNet when the torchvision file is in the torch hub cache, else from scratch
    weights_file: str | None = None
    image_size: int = 128
    fit: str = "pad"
    min_count: int = 20
    dropout: float = 0.0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(**DEFAULT_LOOP))
    resolved_weights: str = ""
    labels: list[str] = field(default_factory=list)

    def validate(self) -> None:
        from models.attributes import BACKBONES

        if self.backbone not in BACKBONES:
            raise UserError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.weights not in ("auto", "imagenet", "none"):
            raise UserError(f"weights must be auto, imagenet or none, got {self.weights!r}")
        if self.weights == "none" and self.weights_file:
            raise UserError("--weights-file with --weights none: the file would not be used; drop one of them")
        if not 16 <= self.image_size <= 1024:
            raise UserError(f"image_size must be in [16, 1024], got {self.image_size}")
        if self.fit not in ("pad", "crop"):
            raise UserError(f"fit must be pad or crop, got {self.fit!r}")
        if self.min_count < 1:
            raise UserError(f"min_count must be >= 1, got {self.min_count}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")


def attribute_config(data_dir: str | Path, split_path: str | Path, overrides: dict[str, Any] | None = None
                     ) -> AttributeConfig:
    """Defaults (DEFAULT_LOOP for the loop) <- overrides (a --config file, then the CLI options)."""
    over = dict(overrides or {})
    loop = {**DEFAULT_LOOP, **(over.pop("loop", None) or {})}
    over.pop("data_dir", None), over.pop("split_path", None)
    return from_dict(AttributeConfig, {"data_dir": str(data_dir), "split_path": str(split_path), **over,
                                       "loop": loop})


def hub_weights_path(backbone: str) -> Path:
    from models.attributes import BACKBONES

    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return home / "hub" / "checkpoints" / BACKBONES[backbone][0]


def resolve_weights(cfg: AttributeConfig) -> tuple[Path | None, str]:
    """(ImageNet weights file or None, what the run records). Local files only: nothing is downloaded, so an
    offline machine never hangs on a download; `auto` falls back to from-scratch and says so."""
    if cfg.weights == "none":
        return None, "none (from scratch: --weights none)"
    if cfg.weights_file:
        p = Path(cfg.weights_file)
        if not p.is_file():
            raise UserError("--weights-file not found", p)
        return p, f"imagenet ({p.resolve()})"
    p = hub_weights_path(cfg.backbone)
    if p.is_file():
        return p, f"imagenet ({p})"
    if cfg.weights == "imagenet":
        raise UserError(f"ImageNet weights for {cfg.backbone} not found (torchvision's file is looked up in the torch "
                        "hub cache, nothing is downloaded); put it there, pass --weights-file, or train from scratch "
                        "with --weights none", p)
    return None, f"none (from scratch: no ImageNet weights at {p}; nothing is downloaded)"


def build_model(cfg: AttributeConfig, labels: Sequence[str]):
    """The classifier, initialised from ImageNet weights when `resolve_weights` finds them; (model, note)."""
    from models.attributes import AttributeClassifier

    path, note = resolve_weights(cfg)
    torch.manual_seed(cfg.loop.seed)  # head (and from-scratch backbone) init
    model = AttributeClassifier(labels=tuple(labels), backbone=cfg.backbone, image_size=cfg.image_size,
                                dropout=cfg.dropout)
    if path is not None:
        try:
            model.load_backbone_state(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"not torchvision {cfg.backbone} weights ({e})", path) from None
    return model, note


# ------------------------------------------------------------------------------------------------------ training


class AttributeTask(TrainTask):
    """Mean binary cross-entropy over labels and images (multi-label, one sigmoid per label)."""

    def __init__(self, model, train_ds: ImageLabels, val_ds: ImageLabels | None, record: dict[str, Any]):
        self.model = model
        self._train, self._val = train_ds, val_ds
        self.record = record  # written beside the weights (labels, frequencies, image size)

    def trainable_parameters(self):
        return list(self.model.parameters())

    def modules(self):
        return {"model": self.model}

    def train_dataset(self):
        return self._train

    def val_dataset(self):
        return self._val

    def loss(self, batch, generator):
        logits = self.model(to_model_pixels(batch["pixels"]))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["target"])

    def export(self, out_dir: Path) -> None:
        unwrap(self.model).save_pretrained(out_dir / FINAL_SUBDIR)
        write_json(out_dir / "labels.json", self.record)


def _record(labels: Sequence[str], freq: dict[str, int], n_train: int, cfg: AttributeConfig) -> dict[str, Any]:
    """What the exported classifier carries beside its weights (final/labels.json)."""
    return {"labels": list(labels), "train_frequency": {lab: freq.get(lab, 0) for lab in labels},
            "n_train_images": n_train, "image_size": cfg.image_size, "fit": cfg.fit,
            "all_label_frequencies": freq, "label_rule": "union of the image's captions' labels"}


def _write_evaluation(run: Run, model, val_set: LabelledImages, val_ds: ImageLabels, labels: Sequence[str],
                      cfg: AttributeConfig, hashes: dict, record: dict[str, Any]) -> None:
    probs = predict(unwrap(model).eval(), val_ds.images)
    write_json(run.dir / METRICS_FILE, {"evaluated_on": val_set.name, "n_images": len(val_set),
                                        "threshold": THRESHOLD, "seed": cfg.loop.seed, "data": hashes,
                                        "weights": cfg.resolved_weights, "train_frequency": record["train_frequency"],
                                        **evaluate(probs, val_ds.targets, labels)})


def fit(cfg: AttributeConfig, train_set: LabelledImages, val_set: LabelledImages | None, data_hashes: dict,
        labels: Sequence[str] | None = None, *, root: Path | None = None, run_id: str | None = None, tag: str = "",
        extra: dict[str, Any] | None = None) -> Run:
    """Train a classifier on `train_set` (labels chosen from it with cfg.min_count unless given) into a new run,
    then evaluate it on `val_set` (classifier_metrics.json). `extra` goes into config.json beside the config."""
    from harness.trainer import run_training

    cfg.validate()
    freq_labels, freq = choose_labels(train_set.label_sets, cfg.min_count)
    labels = list(labels) if labels is not None else freq_labels
    if not labels:
        raise UserError(f"no label occurs in at least {cfg.min_count} of the {len(train_set)} {train_set.name} "
                        "(and is missing from as many); lower --min-count")
    model, note = build_model(cfg, labels)
    cfg = dataclasses.replace(cfg, resolved_weights=note, labels=list(labels))
    images = load_images(train_set.paths, cfg.image_size, cfg.fit, train_set.name)
    train_ds = ImageLabels(images, label_matrix(train_set.label_sets, labels))
    val_ds = val_images = None
    if val_set is not None:
        val_images = load_images(val_set.paths, cfg.image_size, cfg.fit, val_set.name)
        val_ds = ImageLabels(val_images, label_matrix(val_set.label_sets, labels))
    record = _record(labels, freq, len(train_set), cfg)
    config = {**to_dict(cfg), **(extra or {}),
              "summary": {"steps": cfg.loop.max_steps, "preset": f"{cfg.backbone}@{cfg.image_size}"},
              "label_frequencies": record["train_frequency"]}
    run = create_run(FAMILY, config, data_hashes, tag=tag or cfg.backbone, root=root, run_id=run_id)
    run.log(f"labels ({len(labels)}): " + ", ".join(f"{lab} ({freq.get(lab, 0)})" for lab in labels))
    run.log(f"backbone {cfg.backbone} weights: {note}")
    task = AttributeTask(model, train_ds, val_ds, record)
    run_training(task, cfg.loop, run)
    if val_set is not None:
        _write_evaluation(run, task.model, val_set, val_ds, labels, cfg, data_hashes, record)
    return run


def train(cfg: AttributeConfig, run_id: str | None = None, tag: str = "") -> Run:
    """`harness train attributes`: train on the split's training images, evaluate on its validation images."""
    cfg.validate()
    train_set, hashes = real_side(cfg.data_dir, cfg.split_path, "train")
    try:
        val_set, _ = real_side(cfg.data_dir, cfg.split_path, "val")
    except UserError as e:
        if "no val images" not in str(e):
            raise
        val_set = None
    return fit(cfg, train_set, val_set, hashes, run_id=run_id, tag=tag)


def resolved_config(cfg: AttributeConfig) -> dict[str, Any]:
    """--print-config: the config, the label set the training side gives (captions only, no image decoded), where
    the backbone weights would come from, and the loop with its derived numbers."""
    from harness.trainer import loop_description, resolve_loop

    train_set, hashes = real_side(cfg.data_dir, cfg.split_path, "train")
    labels, freq = choose_labels(train_set.label_sets, cfg.min_count)
    loop, plan = resolve_loop(cfg.loop, len(train_set))
    _, note = resolve_weights(cfg)
    return {"family": FAMILY, **{k: v for k, v in to_dict(cfg).items() if k not in ("loop", "labels",
                                                                                   "resolved_weights")},
            "weights_resolved": note, "loop": loop_description(loop, plan),
            "label_frequencies": {lab: freq[lab] for lab in labels}, "data": hashes}


# ------------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu",
            features: bool = False) -> torch.Tensor:
    """Sigmoid probabilities [N, L] (or penultimate features [N, D]) of uint8 images [N,3,S,S]."""
    model = model.to(device).eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = to_model_pixels(images[s:s + batch_size], device)
        out.append((model.features(x) if features else torch.sigmoid(model(x))).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def per_label(probs: torch.Tensor, targets: torch.Tensor, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{label: positives, negatives, AUROC (None without both classes), F1 at THRESHOLD, precision, recall}."""
    from torchmetrics.functional.classification import binary_auroc, binary_f1_score

    out = {}
    for j, lab in enumerate(labels):
        t = targets[:, j].long()
        pos = int(t.sum())
        neg = len(t) - pos
        pred = probs[:, j] >= THRESHOLD
        tp = int((pred & (t == 1)).sum())
        out[lab] = {"positives": pos, "negatives": neg,
                    "auroc": float(binary_auroc(probs[:, j], t)) if pos and neg else None,
                    "f1": float(binary_f1_score(probs[:, j], t, threshold=THRESHOLD)) if pos else None,
                    "precision": tp / int(pred.sum()) if int(pred.sum()) else None,
                    "recall": tp / pos if pos else None}
    return out


def macro(rows: dict[str, dict[str, Any]], key: str, only: Iterable[str] | None = None) -> float | None:
    vals = [r[key] for lab, r in rows.items() if r[key] is not None and (only is None or lab in only)]
    return float(np.mean(vals)) if vals else None


def evaluate(probs: torch.Tensor, targets: torch.Tensor, labels: Sequence[str], frequent: int = 20
             ) -> dict[str, Any]:
    """Per-label and macro AUROC / F1; `frequent_*` averages only labels with >= `frequent` positives AND
    negatives in this evaluation set (a label with 2 positives has an AUROC that moves by 0.5 with one image)."""
    rows = per_label(probs, targets, labels)
    freq = [lab for lab, r in rows.items() if r["positives"] >= frequent and r["negatives"] >= frequent]
    return {"labels": rows, "macro_auroc": macro(rows, "auroc"), "macro_f1": macro(rows, "f1"),
            "n_labels_with_auroc": sum(r["auroc"] is not None for r in rows.values()),
            "frequent_min": frequent, "frequent_labels": freq, "frequent_macro_auroc": macro(rows, "auroc", freq),
            "frequent_macro_f1": macro(rows, "f1", freq),
            "prediction_spread": float(probs.std()) if probs.numel() > 1 else 0.0}


def label_table(title: str, rows: dict[str, dict[str, Any]], train_frequency: dict[str, int] | None = None):
    """rich Table: one row per label (positives/negatives, AUROC, F1, precision, recall)."""
    from rich.table import Table

    def f(v):
        return "—" if v is None else f"{v:.3f}"

    table = Table(title=title)
    cols = ["label"] + (["train imgs"] if train_frequency else []) + ["pos", "neg", "AUROC", "F1", "precision",
                                                                       "recall"]
    for c in cols:
        table.add_column(c, justify="left" if c == "label" else "right")
    for lab, r in rows.items():
        table.add_row(lab, *([str(train_frequency.get(lab, 0))] if train_frequency else []), str(r["positives"]),
                      str(r["negatives"]), f(r["auroc"]), f(r["f1"]), f(r["precision"]), f(r["recall"]))
    return table


# ------------------------------------------------------------------------------------------------------ loading


class AttributeClassifierRun:
    """A trained classifier read back from its run: labels, image size, probabilities and embeddings of images."""

    def __init__(self, run: Run, model, device: str | torch.device = "cpu"):
        self.run, self.model, self.device = run, model.eval(), torch.device(device)
        self.model.to(self.device)
        cfg = run.config()
        self.fit = cfg.get("fit", "pad")

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    def _sized(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] at the classifier's size. Images should come from `load_images(paths, image_size)` (the
        training transform); others are resized here (bicubic, antialiased) - close, not bit-identical."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        s = self.image_size
        if images.shape[-2:] == (s, s):
            return images
        x = torch.nn.functional.interpolate(images.float(), size=(s, s), mode="bicubic", antialias=True,
                                            align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8)

    def predict_proba(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """float [N, L]: P(label | image) for uint8 images [N,3,H,W]."""
        return predict(self.model, self._sized(images), batch_size, self.device)

    def embed(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """float [N, D]: penultimate (pooled backbone) features."""
        return predict(self.model, self._sized(images), batch_size, self.device, features=True)

    def load(self, paths: Sequence[Path], what: str = "images") -> torch.Tensor:
        """uint8 images at this classifier's size, through the transform it was trained with."""
        return load_images(paths, self.image_size, self.fit, what)

    def identity(self) -> dict[str, Any]:
        """What a score computed with this classifier records: run, weights hash, labels."""
        from harness.io import sha256_file
        from models.attributes import WEIGHTS_NAME

        weights = self.run.dir / "final" / FINAL_SUBDIR / WEIGHTS_NAME
        return {"run": str(self.run.dir.resolve()), "run_id": self.run.id,
                "weights_sha256": sha256_file(weights) if weights.is_file() else None,
                "labels": self.labels, "image_size": self.image_size,
                "backbone": self.model.config.backbone,
                "backbone_weights": self.run.config().get("resolved_weights", "")}


def load_classifier(run_dir: str | Path, device: str | torch.device = "cpu") -> AttributeClassifierRun:
    """The classifier of a `harness train attributes` run; a path that is not one is a UserError naming it."""
    from models.attributes import AttributeClassifier

    path = Path(run_dir)
    if not path.is_dir():
        raise UserError("--classifier: not a folder (expected a run of `harness train attributes`)", path)
    try:
        run = open_run(path)
        family = run.family
    except UserError:
        raise UserError("--classifier: not a run directory (no config.json); expected a run of `harness train "
                        "attributes`", path) from None
    if family != FAMILY:
        raise UserError(f"--classifier: a {family!r} run, not a run of `harness train attributes`", path)
    final = run.dir / "final" / FINAL_SUBDIR
    if not (final / "config.json").is_file() or not (final / "model.safetensors").is_file():
        raise UserError("--classifier: the run has no trained classifier (final/classifier missing: training did "
                        "not finish)", path)
    try:
        model = AttributeClassifier.from_pretrained(final)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"--classifier: the saved classifier does not load ({e})", final) from None
    return AttributeClassifierRun(run, model, device)


def config_from_run(run: Run) -> AttributeConfig:
    """The typed config a run trained with (run bookkeeping keys dropped)."""
    raw = {k: v for k, v in run.config().items() if k in {f.name for f in dataclasses.fields(AttributeConfig)}}
    return from_dict(AttributeConfig, raw)


def resume(run_dir: str | Path, loop_overrides: dict | None = None) -> Run:
    """Continue a killed `harness train attributes` run exactly from its last checkpoint (same labels, same data)."""
    from harness.trainer import check_resumable, extend_run, run_training

    run = open_run(run_dir)
    if run.family != FAMILY:
        raise UserError(f"not an attributes run (family {run.family!r})", run.config_path)
    check_resumable(run)
    cfg = config_from_run(run)
    over = dict(loop_overrides or {})
    for key in ("seed", "batch_size", "grad_accum"):
        if key in over and over[key] != getattr(cfg.loop, key):
            raise UserError(f"cannot resume exactly with another {key} (the run has {getattr(cfg.loop, key)})",
                            run.config_path)
    extend_run(run, cfg.loop, over.get("max_steps"))
    train_set, hashes = real_side(cfg.data_dir, cfg.split_path, "train")
    labels = cfg.labels
    model, _ = build_model(dataclasses.replace(cfg, weights="none"), labels)  # weights come from the checkpoint
    images = load_images(train_set.paths, cfg.image_size, cfg.fit, train_set.name)
    try:
        val_set, _ = real_side(cfg.data_dir, cfg.split_path, "val")
        val_images = load_images(val_set.paths, cfg.image_size, cfg.fit, val_set.name)
        val_ds = ImageLabels(val_images, label_matrix(val_set.label_sets, labels))
    except UserError:
        val_set = val_ds = None
    _, freq = choose_labels(train_set.label_sets, cfg.min_count)
    record = _record(labels, freq, len(train_set), cfg)
    task = AttributeTask(model, ImageLabels(images, label_matrix(train_set.label_sets, labels)), val_ds, record)
    run_training(task, cfg.loop, run, resume=True)
    if val_set is not None:
        _write_evaluation(run, task.model, val_set, val_ds, labels, cfg, hashes, record)
    return run


def read_metrics(run: Run) -> dict[str, Any] | None:
    p = run.dir / METRICS_FILE
    return read_json(p) if p.is_file() else None


# ------------------------------------------------------------------------------------------------------ bootstrap


def label_aurocs(probs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """AUROC of each label column (torchmetrics' binary_auroc); nan where the column lacks a class."""
    from torchmetrics.functional.classification import binary_auroc

    out = np.full(probs.shape[1], np.nan)
    for j in range(probs.shape[1]):
        t = targets[:, j].long()
        pos = int(t.sum())
        if 0 < pos < len(t):
            out[j] = float(binary_auroc(probs[:, j], t))
    return out


def macro_auroc(probs: torch.Tensor, targets: torch.Tensor, columns: Sequence[int] | None = None) -> float:
    """Mean AUROC over the label columns (or `columns`) that have both classes; nan when none has."""
    a = label_aurocs(probs, targets)
    if columns is not None:
        a = a[list(columns)]
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")


def resampler(n: int, groups: Sequence[Any] | None, rng: np.random.Generator):
    """A function drawing one bootstrap resample of indices 0..n-1: images with replacement, or with `groups`
    (one key per image, e.g. its prompt) whole groups with replacement (a cluster bootstrap: images generated from
    the same prompt are not independent - the test pattern's are identical in colour - so resampling them one by
    one gives intervals that are far too narrow)."""
    if groups is None:
        return lambda: rng.integers(0, n, n)
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    blocks = [np.asarray(v) for v in members.values()]
    return lambda: np.concatenate([blocks[k] for k in rng.integers(0, len(blocks), len(blocks))])


def bootstrap(statistic, n: int, point: float, n_boot: int, seed: int, level: float = 0.95,
              groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Bootstrap interval of `statistic(indices)` over n images resampled with replacement (by `groups` when
    given, see `resampler`; seeded), in the form `harness.stats` writes (percentile interval, bias-corrected, so it
    is centred on the point value)."""
    from harness.stats import Interval, _interval

    draw = resampler(n, groups, np.random.default_rng(seed))
    reps = np.array([statistic(draw()) for _ in range(n_boot)], dtype=np.float64)
    low, high = _interval(point, reps, level)
    return {**Interval(point, low, high, level, n_boot, seed).to_dict(),
            "resampled": "images" if groups is None else "prompts (all images of a drawn prompt)"}
