"""`harness train test-pattern`: a run of the test-pattern family (harness.generate.TestPatternGenerator: seeded
colour fields, no model) that records a split and dev set, so it is generated from `--prompts split:val` and scored
against `--real val` like any run: the other end of the reference rows (nothing learned, nothing copied)."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import stored_dir, stored_file


def create_test_pattern_run(data_dir: Path, split_path: Path, size: int, run_id: str | None = None):
    from harness.families.retrieval.index import data_hashes, load_data
    from harness.runs import create_run

    devset, split = load_data(Path(data_dir), Path(split_path))
    train = set(split.train)
    rows = sum(1 for r in devset.rows if r.filename in train)
    return create_run("test-pattern", {"size": size, "data_dir": str(data_dir), "split_path": str(split_path)},
                      data_hashes(devset, split, rows), run_id=run_id)


def register(cli: click.Group, train: click.Group, sweep: click.Group, models: click.Group) -> None:
    train.add_command(train_test_pattern)


@click.command("test-pattern")
@click.option("--split", "split_path", type=stored_file, required=True, help="SPLIT.json from `harness split`.")
@click.option("--data", "data_dir", type=stored_dir, required=True, help="Dev set dir: prompt-gt.csv + images/.")
@click.option("--size", type=click.IntRange(8, 4096), default=256, show_default=True,
              help="Side of the generated images (default 256: the dev-256 images' side; use the generation size of "
                   "the runs it is a reference for).")
@click.option("--run-id", type=str, default=None, help="Name of the new run (default: readable + timestamp).")
def train_test_pattern(split_path, data_dir, size, run_id) -> None:
    """Create a test-pattern reference run (no training: seeded colour fields whose colour depends on the prompt).

    The lower reference of the leaderboard: what a model that learned nothing scores (FID, adherence) and what the
    memorisation metric must not flag. The run records SPLIT and DATA, so `--prompts split:val` and `score --real
    val` work as for a trained run; scored, it appears on the leaderboard as a reference row.

    \b
    Example:
      harness train test-pattern --split split.json --data DATA --size 256
      harness generate runs/test-pattern-... --prompts split:val
      harness score runs/test-pattern-...
    """
    from harness.progress import console

    run = create_test_pattern_run(data_dir, split_path, size, run_id)
    console.print(f"[green]{run.dir}[/]: test-pattern reference run ({size} px)", highlight=False)
