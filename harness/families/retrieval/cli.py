"""`harness train retrieval`: the retrieval reference baseline (index the training split; no model)."""

from __future__ import annotations

import click

from harness.cli.common import stored_dir, stored_file

SIZE_HELP = ("Side of the generated images in pixels (default 256: the dev-256 images' side and the training "
             "transform's default resolution). Use the generation size of the runs it is a reference for: "
             "scores compare only at equal size; `harness generate --height/--width` override it per call.")
FIT_HELP = "How a training image becomes square: the training transform's pad (default, harness.dataset) or crop."


def register(cli: click.Group, train: click.Group, sweep: click.Group, models: click.Group) -> None:
    train.add_command(train_retrieval)


@click.command("retrieval")
@click.option("--split", "split_path", type=stored_file, required=True, help="SPLIT.json from `harness split`.")
@click.option("--data", "data_dir", type=stored_dir, required=True, help="Dev set dir: prompt-gt.csv + images/.")
@click.option("--size", type=click.IntRange(8, 4096), default=256, show_default=True, help=SIZE_HELP)
@click.option("--fit", type=click.Choice(["pad", "crop"]), default="pad", show_default=True, help=FIT_HELP)
@click.option("--run-id", type=str, default=None, help="Name of the new run (default: readable + timestamp).")
def train_retrieval(split_path, data_dir, size, fit, run_id) -> None:
    """Index the training side of SPLIT for the retrieval reference baseline (seconds, no model, no GPU).

    Every training caption is parsed into the attributes it asks for (harness.captions.extract_attributes); the
    run keeps the index (RUN/index.json: image names, sha256, captions, attribute signatures). `harness generate
    RUN` then answers each prompt with a training image whose caption asks for the same attributes (exact match
    first, then the best overlap; the candidate is drawn by the image's seed) and writes it at the generation size,
    recording which training image it used in RUN/images/records.csv.

    It is a reference, not an entry: the FID / adherence a pure copy of the training data achieves, and what the
    memorisation metric must flag (~100 % likely copies). Scored like any run, it appears on the leaderboard as a
    reference row.

    \b
    Example:
      harness train retrieval --split split.json --data DATA --size 256
      harness generate runs/retrieval-... --prompts split:val
      harness score runs/retrieval-... --metrics fid,kid,memorisation
    """
    from harness.families.retrieval.index import RetrievalConfig, train
    from harness.progress import console

    run, stats = train(RetrievalConfig(data_dir=str(data_dir), split_path=str(split_path), size=size, fit=fit),
                       run_id=run_id)
    console.print(f"[green]{run.dir}[/]: {stats['n_images']} training images, {stats['n_captions']} captions, "
                  f"{stats['n_signatures']} distinct attribute signatures ({stats['seconds']:.1f}s)",
                  highlight=False)
