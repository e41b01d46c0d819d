"""`harness train attributes` (the attribute classifier) and `harness fter` (two-way train-on-synthetic test)."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import (FiniteFloatRange, existing_dir, existing_file, pop_loop_overrides, stored_file,
                                 training_options)
from harness.errors import UserError


def register(cli: click.Group, train: click.Group, **groups: click.Group) -> None:
    train.add_command(attributes)
    cli.add_command(fter)


def _backbones() -> list[str]:
    from models.attributes import BACKBONES

    return list(BACKBONES)


# What `--print-config` adds beside the AttributeConfig fields (harness.attributes.resolved_config).
PRINTED_KEYS = ("family", "weights_resolved", "label_frequencies", "data", "loop.derived")


def classifier_overrides(config_file, loop: dict, backbone, weights, weights_file, image_size, min_count,
                         dropout) -> dict:
    """--config file (AttributeConfig fields in JSON/TOML/YAML; what --print-config adds is dropped) <- the options
    given."""
    from harness.config import read_config_file

    over: dict = read_config_file(config_file, PRINTED_KEYS) if config_file else {}
    if loop:
        over["loop"] = {**(over.get("loop") or {}), **loop}
    for key, v in (("backbone", backbone), ("weights", weights),
                   ("weights_file", str(weights_file) if weights_file else None), ("image_size", image_size),
                   ("min_count", min_count), ("dropout", dropout)):
        if v is not None:
            over[key] = v
    return over


@click.command("attributes")
@training_options
@click.option("--backbone", type=click.Choice(_backbones()), default=None,
              help="torchvision network (head replaced by one logit per label). Default resnet18: the smallest "
                   "standard ResNet, trainable from scratch on CPU in minutes at 128 px.")
@click.option("--weights", type=click.Choice(["auto", "imagenet", "none"]), default=None,
              help="Backbone start: imagenet = torchvision's ImageNet file from the torch hub cache "
                   "($TORCH_HOME/hub/checkpoints, never downloaded; an error when absent); none = from scratch; "
                   "auto (default) = imagenet when that file is present, else from scratch. The run records which.")
@click.option("--weights-file", type=stored_file, default=None,
              help="A torchvision ImageNet weights file for the backbone (instead of the hub cache).")
@click.option("--image-size", type=click.IntRange(16, 1024), default=None,
              help="Square input size: images are resized and padded as training does (default 128: the "
                   "from-scratch variant trains in minutes on CPU at this size; attributes such as text overlays "
                   "and locations remain visible).")
@click.option("--min-count", type=click.IntRange(min=1), default=None,
              help="Keep labels carried by at least N training images and missing from at least N (default 20: "
                   "with the 1,800 / 200 split about 2 validation positives, the fewest for which a validation "
                   "AUROC exists).")
@click.option("--dropout", type=FiniteFloatRange(0, 1, max_open=True), default=None,
              help="Dropout before the label layer (default 0).")
def attributes(split_path, data_dir, config_file, run_id, resume_run, paraphrases_path, paraphrase_strategy,
               backbone, weights, weights_file, image_size, min_count, dropout, print_config, **kw):
    """Train the multi-label attribute classifier on the split's training images and report per-label AUROC / F1
    on its validation images (the ceiling adherence and FTER are read against).

    Labels are the caption attributes harness.captions extracts ("finding=polyp", "count=2", "location=upper-left",
    "instrument=tube", "finding=text", ...): an image carries the union of its captions' labels, and labels rarer
    than --min-count are dropped (the run lists the label set and frequencies). Training budget defaults (chosen
    here, no paper prescribes one; each overridable): 600 steps of batch 32, AdamW lr 1e-3, weight decay 1e-4.
    Writes RUN/final/classifier (save_pretrained), RUN/final/labels.json and RUN/classifier_metrics.json.

    \b
    Examples:
      harness train attributes --split split.json --data DATA
      harness train attributes --split split.json --data DATA --weights none --image-size 128 --max-steps 300
      harness train attributes --split split.json --data DATA --print-config
    """
    from harness.attributes import attribute_config, resume

    loop = pop_loop_overrides(kw)
    if paraphrases_path or paraphrase_strategy:
        raise UserError("the attribute classifier learns from images and caption attributes: --paraphrases / "
                        "--paraphrase-strategy do not apply")
    if resume_run:
        if print_config:
            raise UserError("--print-config prints a new run's config; a run's own is RUN/config.json")
        return _report(resume(resume_run, loop))
    over = classifier_overrides(config_file, loop, backbone, weights, weights_file, image_size, min_count, dropout)
    cfg = attribute_config(data_dir, split_path, over)
    if print_config:
        from harness.attributes import resolved_config
        from harness.cli.common import print_config as show

        return show(resolved_config(cfg))
    from harness.attributes import train

    _report(train(cfg, run_id=run_id))


def _console():
    """stdout; piped output (files, CI logs) gets a wide fixed width instead of rich's 80-column wrap."""
    import sys

    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _report(run) -> None:
    from harness.attributes import label_table, read_metrics

    console = _console()
    m = read_metrics(run)
    if m is not None:
        console.print(label_table(f"{run.id}: {m['evaluated_on']} (N={m['n_images']}, threshold {m['threshold']})",
                                  m["labels"], m.get("train_frequency")))

        def f(v):
            return "—" if v is None else f"{v:.3f}"

        console.print(f"macro AUROC {f(m['macro_auroc'])} over {m['n_labels_with_auroc']} labels; labels with >= "
                      f"{m['frequent_min']} positives and negatives: AUROC {f(m['frequent_macro_auroc'])}, "
                      f"F1 {f(m['frequent_macro_f1'])}")
        console.print(f"backbone weights: {m['weights']}")
    console.print(f"[green]trained[/] {run.dir}")


@click.command("fter")
@click.argument("run_dir", metavar="RUN", type=existing_dir)
@click.option("--classifier-config", type=existing_file, default=None,
              help="Config file (JSON, TOML or YAML; `--print-config` output reads back) of the classifier both "
                   "directions train (the fields of `harness train attributes --config`: backbone, weights, "
                   "image_size, min_count, loop{...}); default: that command's "
                   "defaults. Both directions use it unchanged: same budget, same seed.")
@click.option("--split", "split_path", type=existing_file, default=None,
              help="SPLIT.json (default: the split named in the run's config).")
@click.option("--data", "data_dir", type=existing_dir, default=None,
              help="Dev-set dir (default: the one named in the run's config).")
@click.option("--bootstrap", type=click.IntRange(min=0), default=200,
              help="Bootstrap replicates (test images resampled) for the 95 % intervals (0 = none); seed 2020 as "
                   "`harness score`.")
@click.option("--device", default="auto", help="auto, cpu, cuda ... (the classifiers' evaluation).")
def fter(run_dir: Path, classifier_config, split_path, data_dir, bootstrap: int, device: str) -> None:
    """Two-way usefulness of RUN's images as training data (Zhang 2024): train the attribute classifier on RUN's
    images labelled by their prompts and test it on the real validation images (syn->real); train it on the real
    training images and test it on RUN's images (real->syn); FTER = AUROC(syn->real) / AUROC(real->syn), 1 is
    best. The real->real AUROC (same classifier, validation images) is the reference.

    RUN's prompts must be training captions of the split (`harness generate RUN --prompts split:train`): labels
    come from the prompts, and a validation caption would let the synthetic side see the test set's captions.
    FTER is reported as not meaningful when real->syn is not above chance (the real classifier recognises
    nothing in the images; a ratio of two chance AUROCs is ~1, the "best" value). Writes metrics.json key "fter"
    (headline value = FTER) and the classifier runs under RUN/fter/.

    \b
    Example:
      harness generate runs/<run> --prompts split:train
      harness fter runs/<run> --classifier-config clf.json
    """
    from rich.console import Console

    from harness.fter import fter_table, run_fter
    from harness.config import read_config_file
    from harness.runs import open_run

    over = read_config_file(classifier_config, PRINTED_KEYS) if classifier_config else {}
    result = run_fter(open_run(run_dir), over, data_dir=data_dir, split_path=split_path, n_boot=bootstrap,
                      device=device)
    console = _console()
    console.print(fter_table(result))
    for w in result.get("warnings", []):
        Console(stderr=True).print(f"[yellow]warning:[/] {w}")
    click.echo(f"wrote {Path(run_dir) / 'metrics.json'}")
