"""`harness rate make` and `harness rate summarize`: blind realism rating of generated images by clinicians."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import POSITIVE, SEED, existing_dir, existing_file


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(rate)


@click.group()
def rate() -> None:
    """Blind realism rating by clinicians: a self-contained rating page, and its statistics.

    \b
    Examples:
      harness rate make runs/<a> runs/<b> --per-source 40 --by finding --turing --out study1
      (send study1/index.html to each rater; keep study1/key.json to yourself)
      harness rate summarize study1/key.json ratings-*.csv
    """


@rate.command("make")
@click.argument("runs", metavar="RUN [RUN ...]", nargs=-1, required=True, type=existing_dir)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Study folder: index.html (for the raters) and key.json (kept apart: it unblinds the study).")
@click.option("--per-source", type=POSITIVE, required=True,
              help="Images sampled from each source (each run, and the real control).")
@click.option("--real", type=click.Choice(["val", "none"]), default="val",
              help="Real control images: the validation side of the runs' split (no model trained on them), or none.")
@click.option("--by", type=click.Choice(["stratum", "finding", "procedure"]), default=None,
              help="Balance each source over case types from the captions: 'stratum' (procedure/main finding, as "
                   "the split uses), 'finding' (normal vs abnormal), 'procedure'. Default: a simple random sample.")
@click.option("--turing", is_flag=True, help="Also ask 'real or synthetic?' for every image (visual Turing test).")
@click.option("--seed", type=SEED, default=0, help="Seed of the sampling, the order and the neutral ids.")
@click.option("--split", "split_path", type=existing_file, default=None,
              help="SPLIT.json for --real val (default: the split named in each run's config).")
@click.option("--data", "data_dir", type=existing_dir, default=None,
              help="Dev-set dir for --real val (default: the one named in the run's config).")
@click.option("--size", type=click.IntRange(min=16), default=None,
              help="Side in pixels every image is cropped square and resized to. Default: the smallest side among "
                   "the sampled images, so no source is upscaled and all look alike in size.")
@click.option("--title", default="Image realism rating", help="Title shown on the page.")
@click.option("--overwrite", is_flag=True, help="Replace another study already in --out (its ratings would no "
                                                 "longer match).")
def make(runs, out: Path, per_source: int, real: str, by, turing: bool, seed: int, split_path, data_dir, size,
         title: str, overwrite: bool) -> None:
    """Sample images from each RUN (plus real validation images as a control), blind and shuffle them, and write
    OUT/index.html (one self-contained page that works offline from disk) and OUT/key.json.

    Every image is centre-cropped square, resized to one size and re-encoded as a metadata-free JPEG, so format,
    size, file names and PNG text chunks reveal nothing; the page knows images only by random ids, in a seeded
    random order that is reshuffled per rater. Raters rate realism 1-5 (and real/synthetic with --turing) with the
    mouse or the keys 1-5, R/S and the arrows; answers stay in the browser until they export ratings-<rater>.csv.
    """
    from rich.console import Console

    from harness.rating.study import MakeConfig, make_study

    err = Console(stderr=True, highlight=False)
    made = make_study(MakeConfig(runs=list(runs), out=out, per_source=per_source, real=real, by=by, seed=seed,
                                 turing=turing, split=split_path, data=data_dir, size=size, title=title,
                                 overwrite=overwrite), log=err.print)
    out_console = Console(highlight=False)
    out_console.print(f"study {made.study}: {made.n_items} images")
    for source, strata in sorted(made.per_source.items()):
        out_console.print(f"  {source}: " + ", ".join(f"{k} {v}" for k, v in sorted(strata.items())))
    out_console.print(f"send to raters: {made.page}\nkeep to yourself: {made.key}")


@rate.command("summarize")
@click.argument("key", type=existing_file)
@click.argument("csvs", metavar="RATINGS.csv [RATINGS.csv ...]", nargs=-1, required=True, type=existing_file)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for summary.json, summary.md and realism.png (default: the key's folder).")
@click.option("--n-boot", type=POSITIVE, default=2000,
              help="Bootstrap replicates (percentile intervals need 1000-2000: Efron & Tibshirani 1993, ch. 19).")
@click.option("--seed", type=SEED, default=0, help="Bootstrap seed.")
@click.option("--leaderboard", "leaderboard_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("leaderboard.md"), help="Leaderboard file to update afterwards.")
@click.option("--no-leaderboard", is_flag=True, help="Do not update the leaderboard.")
def summarize(key: Path, csvs, out, n_boot: int, seed: int, leaderboard_path: Path, no_leaderboard: bool) -> None:
    """Read the raters' exported CSVs against KEY: mean realism with 95 % bootstrap intervals and answer counts per
    source and case type, visual-Turing-test accuracy against 50 %, Krippendorff's alpha between raters. Writes
    summary.json/.md and realism.png, each run's RUN/reader_study.json, and the leaderboard's "Reader study" table.

    Any bad input (a file from another study, duplicate answers, values out of range, a truncated file) stops with
    one line naming the file and row, before anything is written.
    """
    from rich.console import Console

    from harness.rating.analysis import summarize_study, summary_markdown

    err = Console(stderr=True, highlight=False)
    res = summarize_study(key, list(csvs), out, n_boot=n_boot, seed=seed, log=err.print)
    console = Console(highlight=False, width=240)
    console.print(summary_markdown(res.summary), markup=False)
    console.print(f"wrote {res.out_dir / 'summary.json'}, summary.md, realism.png; "
                  f"{len(res.runs_updated)} run(s) updated")
    if not no_leaderboard:
        from harness.leaderboard import write_leaderboard

        path, _ = write_leaderboard(leaderboard_path)
        console.print(f"leaderboard: {path}")
