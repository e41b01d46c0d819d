"""Click options shared by several commands, so every trainer spells them the same way."""

from __future__ import annotations

import math
import os
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


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and +-inf (a range alone lets nan through: every comparison with nan
    is false). `--guidance nan` used to produce all-black images."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def check_output_file(path: str | Path, option: str = "") -> Path:
    """`check_output_dir` for a file to write: its folder must be writable, and it must not be a folder itself."""
    from harness.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option + ' ' if option else ''}is a folder; name a file to write", path)
    check_output_dir(path.parent, option, name=path)
    return path


def check_output_dir(path: str | Path, option: str = "", name: str | Path | None = None) -> Path:
    """Fail before any work when `path` (a folder to write into, created if needed) cannot be written: a file
    where a folder must be, a read-only or pseudo file system (/proc, /sys), no permission. Probes by creating
    and removing a temporary folder in the nearest existing ancestor (root ignores mode bits, so `os.access` would
    say yes), which leaves nothing behind."""
    import tempfile

    from harness.errors import UserError

    path = Path(path)
    what = f"{option} " if option else ""
    anc = path.absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{what}cannot be created: {anc} is a file, not a folder", name or path)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".harness-write-test-", dir=anc))
    except OSError as e:
        raise UserError(f"{what}is not writable: cannot create anything in {anc} ({e.strerror})",
                        name or path) from None
    return path
