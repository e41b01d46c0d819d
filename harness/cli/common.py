"""Click options shared by several commands, so every trainer spells them the same way."""

from __future__ import annotations

from pathlib import Path

import click

existing_file = click.Path(exists=False, dir_okay=False, path_type=Path)
existing_dir = click.Path(exists=False, file_okay=False, path_type=Path)
# Paths that end up in a run's config.json are made absolute, so `harness score RUN` and `--resume` find the data
# from any working directory. (Existence is checked by the stages, with their own one-line messages.)
stored_file = click.Path(exists=False, dir_okay=False, path_type=Path, resolve_path=True)
stored_dir = click.Path(exists=False, file_okay=False, path_type=Path, resolve_path=True)
# Seeds feed numpy's legacy RNG (random.seed / np.random.seed accept < 2**32) as well as torch: one range everywhere.
SEED = click.IntRange(0, 2**32 - 1)


def training_options(f):
    """Options common to every `harness train ...` command. Unset options are None: the typed config's
    default applies, so the defaults live in one place (the dataclass), not in the CLI."""
    opts = [
        click.option("--split", "split_path", type=stored_file, required=True, help="SPLIT.json from `harness split`."),
        click.option("--data", "data_dir", type=stored_dir, required=True, help="Dev set dir: prompt-gt.csv + images/."),
        click.option("--seed", type=int, default=None, help="Seed for init, data order, noise (default 0)."),
        click.option("--max-steps", type=int, default=None, help="Optimizer steps to train."),
        click.option("--batch-size", type=int, default=None, help="Per-process batch size."),
        click.option("--grad-accum", type=int, default=None, help="Gradient accumulation steps."),
        click.option("--lr", type=float, default=None, help="AdamW learning rate."),
        click.option("--max-grad-norm", type=float, default=None, help="Clip the trained parameters' grad norm (0 = off)."),
        click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default=None,
                     help="accelerate mixed precision."),
        click.option("--checkpoint-every", type=int, default=None, help="Save a checkpoint every N steps."),
        click.option("--keep-last", type=int, default=None, help="Keep the last K checkpoints."),
        click.option("--val-every", type=int, default=None, help="Validation loss every N steps (fixed seed)."),
        click.option("--sample-every", type=int, default=None, help="Sample grid PNG every N steps (0 = off)."),
        click.option("--config", "config_file", type=existing_file, default=None,
                     help="JSON config file (unknown keys are an error); CLI options override it."),
        click.option("--run-id", type=str, default=None, help="Name of the new run (default: readable + timestamp)."),
        click.option("--resume", "resume_run", type=existing_dir, default=None,
                     help="Continue RUN exactly from its last checkpoint."),
        click.option("--paraphrases", "paraphrases_path", type=stored_file, default=None,
                     help="Paraphrase JSONL from `harness paraphrase`."),
        click.option("--paraphrase-strategy", type=str, default=None,
                     help="add | replace:P | replace-all (needs --paraphrases)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


LOOP_KEYS = ("seed", "max_steps", "batch_size", "grad_accum", "lr", "max_grad_norm", "mixed_precision",
             "checkpoint_every", "keep_last", "val_every", "sample_every")


def pop_loop_overrides(kwargs: dict) -> dict:
    """Take the training-loop options out of a command's kwargs (None = not given)."""
    return {k: kwargs.pop(k) for k in LOOP_KEYS if k in kwargs}
