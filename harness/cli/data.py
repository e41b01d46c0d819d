"""`harness data check`, `harness split`, `harness prompts check|make`."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import check_output_file
from harness.cli.common import SEED, existing_dir, existing_file

out_file = click.Path(dir_okay=False, path_type=Path)


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(data)
    cli.add_command(split)
    cli.add_command(prompts)


def _console():
    import sys

    from rich.console import Console

    # A fixed width when piped (logs, tests) keeps tables readable and stable; a terminal uses its own width.
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 120)


@click.group()
def data() -> None:
    """Inspect a dev-set directory (prompt-gt.csv beside images/)."""


@data.command("fetch")
@click.argument("name", metavar="NAME")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Empty folder for prompt-gt.csv + images/.")
@click.option("--split", "split_name", default=None, help="Dataset split (default: its first, e.g. Kvasir-VQA's raw).")
@click.option("--image-column", default="image", show_default=True, help="Column holding the images.")
@click.option("--prompt-template", default=None,
              help="Prompt of a row, formatted with its columns (default: its prompt/caption/text column, else "
                   "'{question} {answer}', Kvasir-VQA's columns).")
@click.option("--id-column", default=None,
              help="Column naming the image, so rows of one image share a file (default: img_id, image_id, id, "
                   "filename or file_name, the first present; else one file per row).")
@click.option("--test", "test_files", is_flag=True,
              help="NAME is a challenge: fetch its scoring material instead - the real reference set (OUT/real/), "
                   "the test prompts (OUT/prompts.json) and the real mapping (OUT/real_mapping.json).")
def data_fetch(name: str, out_dir: Path, split_name, image_column: str, prompt_template, id_column,
               test_files: bool) -> None:
    """Convert a Hugging Face dataset to prompt-gt.csv + images/ (the layout every harness command reads).

    NAME: a challenge (imageclef2025-task2 -> SimulaMet-HOST/Kvasir-VQA), a hub dataset id, a `save_to_disk`
    folder or a parquet file. Image bytes are copied verbatim. Offline, one line says what to download and where.

    \b
    Examples:
      harness data fetch imageclef2025-task2 --out data/kvasir-vqa
      harness data fetch ./kvasir-vqa-saved --out data/kvasir-vqa
      harness data fetch imageclef2025-task2 --test --out data/kvasir-vqa-test   # prompts, real set, mapping
    """
    from harness.challenges.hub_data import fetch_dataset, fetch_test_files

    if test_files:
        got = fetch_test_files(name, out_dir)
        _console().print(f"[green]{got['out']}[/]: {', '.join(got['files'])}"
                         + (f", real/ ({got['real']['images']} images)" if got["real"] else ""))
        return
    res = fetch_dataset(name, out_dir, split=split_name, image_column=image_column,
                        prompt_template=prompt_template, id_column=id_column)
    _console().print(f"[green]{res['out']}[/]: {res['rows']} rows, {res['images']} images from {res['source']} "
                     f"(prompt = {res['prompt_template']!r})")


@data.command("check")
@click.argument("data_dir", metavar="DIR", type=existing_dir)
@click.option("--json", "json_out", type=out_file, default=None, help="Write the full report (every problem) here.")
@click.option("--show", type=click.IntRange(min=0), default=10, show_default=True,
              help="Problems listed per kind (0 = all).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Threads decoding images (default: min(8, cpus)).")
def data_check(data_dir: Path, json_out: Path | None, show: int, workers: int | None) -> None:
    """Check prompt-gt.csv and every image: counts, sizes and every problem found.

    Problems (wrong field counts, duplicate rows, missing / undecodable / non-RGB / mislabelled images, images
    without captions, contradictory captions) are listed in red. Exit code 2 when the CSV cannot be read at all
    (missing, empty, not UTF-8, wrong header or separator; nothing is written) or when defects are found (the full
    report is still printed and written); caption contradictions and blank lines are warnings only, since the
    official dev set has them (exit 0).

    \b
    Examples:
      harness data check ../shared/data/imageclef2024/dev-256
      harness data check DATA_DIR --json data-report.json --show 0
    """
    from rich.markup import escape
    from rich.table import Table

    from harness.data import PROBLEM_KINDS, WARNING_KINDS, check_devset
    from harness.errors import UserError
    from harness.images import IMAGE_EXTENSIONS
    from harness.io import write_json
    from harness.progress import progress

    if json_out:
        check_output_file(json_out, "--json")  # before minutes of decoding, not after
    con = _console()
    images_dir = data_dir / "images"
    n_files = sum(1 for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith(".")) if images_dir.is_dir() else 0
    with progress(transient=True) as bar:
        task = bar.add_task("decode images", total=n_files)
        report = check_devset(data_dir, workers=workers, on_image=lambda: bar.advance(task))

    t = Table(title=f"{data_dir}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    cpi = report.captions_per_image
    for k, v in [
        ("rows", f"{report.rows:,}"),
        ("unique prompts", f"{report.unique_prompts:,}"),
        ("unique images (CSV)", f"{report.unique_images:,}"),
        ("files in images/", f"{report.files_in_images_dir:,}"),
        ("captions per image", f"min {cpi['min']} / mean {cpi['mean']:.2f} / max {cpi['max']}"),
        ("distinct image sizes", f"{report.distinct_sizes}"),
        ("formats / modes", ", ".join(f"{k} {v}" for k, v in report.formats.items()) + " / "
         + ", ".join(f"{k} {v}" for k, v in report.modes.items())),
        ("csv", f"{report.csv_bytes:,} bytes, {report.line_endings} line ends"
         + (", UTF-8 BOM" if report.bom else ", no BOM")),
        ("csv sha256", report.csv_sha256),
    ]:
        t.add_row(k, v)
    con.print(t)

    if report.size_histogram:
        h = Table(title="image size (longer side)", title_justify="left")
        h.add_column("bucket")
        h.add_column("images", justify="right")
        h.add_column("")
        top = max(report.size_histogram.values())
        for b, n in report.size_histogram.items():
            h.add_row(b, f"{n:,}", "█" * max(1, round(30 * n / top)))
        con.print(h)

    if not report.problems:
        con.print("[bold green]no problems found[/]")
    else:
        counts = report.problem_counts
        p = Table(title="problems", title_justify="left", title_style="bold red")
        p.add_column("kind", style="red")
        p.add_column("where", overflow="fold")
        p.add_column("what", overflow="fold")
        for kind in PROBLEM_KINDS:
            items = [x for x in report.problems if x.kind == kind]
            for x in items[: show or None]:
                p.add_row(kind, escape(_short(x.where(), data_dir)), escape(x.message))
            if show and len(items) > show:
                p.add_row(kind, "", f"... and {len(items) - show} more (--show 0 or --json lists all)")
        con.print(p)
        summary = ", ".join(f"{n} {PROBLEM_KINDS.get(k, k)}" for k, n in counts.items())
        con.print(f"[bold red]{len(report.problems)} problem(s):[/] [red]{summary}[/]")
    if json_out:
        write_json(json_out, report.to_dict())
        con.print(f"report -> {json_out}")
    defects = [x for x in report.problems if x.kind not in WARNING_KINDS]
    if defects:
        first = defects[0]
        raise UserError(f"{len(defects)} defect(s) to fix before training; first: {_short(first.where(), data_dir)}: "
                        f"{first.message}", data_dir)


@click.command()
@click.argument("data_dir", metavar="DIR", type=existing_dir)
@click.option("--val-images", type=click.IntRange(min=1), default=200, show_default=True,
              help="Images on the validation side (the seed paper: 200 of 2,000).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Shuffle seed within each stratum.")
@click.option("--out", "out_path", type=out_file, required=True, help="SPLIT.json to write.")
def split(data_dir: Path, val_images: int, seed: int, out_path: Path) -> None:
    """Split the dev set BY IMAGE into train / val, stratified by procedure and main finding.

    Every caption row of an image goes to the side of its image. Each stratum with >= 2 images is on both sides.
    Same inputs and seed give a byte-identical SPLIT.json (ids, seed, prompt-gt.csv sha256, counts, strata).

    \b
    Examples:
      harness split ../shared/data/imageclef2024/dev-256 --out split.json            # 1,800 / 200
      harness split DATA_DIR --val-images 8 --seed 1 --out split-small.json
    """
    from rich.table import Table

    from harness.io import sha256_file
    from harness.split import write_split

    check_output_file(out_path, "--out")
    con = _console()
    d = write_split(data_dir, out_path, val_images=val_images, seed=seed)
    t = Table(title=f"split of {data_dir} (seed {seed})", title_justify="left")
    t.add_column("stratum")
    t.add_column("train", justify="right")
    t.add_column("val", justify="right")
    for name, c in d["strata"].items():
        t.add_row(name, str(c["train"]), str(c["val"]))
    ct = d["counts"]
    t.add_row("[bold]images", f"[bold]{ct['train']['images']}", f"[bold]{ct['val']['images']}")
    t.add_row("[bold]rows", f"[bold]{ct['train']['rows']}", f"[bold]{ct['val']['rows']}")
    con.print(t)
    con.print(f"[green]{out_path}[/] sha256 {sha256_file(out_path)}")


@click.group()
def prompts() -> None:
    """Prompt files (one prompt per line, the test-file format)."""


@prompts.command("check")
@click.argument("prompt_file", metavar="FILE", type=existing_file)
@click.option("--data", "data_dir", type=existing_dir, default=None,
              help="Dev set to compare with (default: the shipped list of 483 dev captions).")
@click.option("--json", "json_out", type=out_file, default=None, help="Write the report here.")
@click.option("--show", type=click.IntRange(min=0), default=20, show_default=True,
              help="Prompts not in the dev set to list (0 = all).")
def prompts_check(prompt_file: Path, data_dir: Path | None, json_out: Path | None, show: int) -> None:
    """Count, unique count, longest prompt, blank lines, and prompts that never occur in the dev captions.

    Prompt k (1-based among non-blank lines) is the prompt of image k; only the line ending is stripped.

    \b
    Examples:
      harness prompts check test-prompts.txt
      harness prompts check test-prompts.txt --data ../shared/data/imageclef2024/dev-256 --json check.json
    """
    from rich.markup import escape
    from rich.table import Table

    from harness.io import write_json
    from harness.prompts import check_prompts, dev_captions, read_prompt_file

    if json_out:
        check_output_file(json_out, "--json")
    con = _console()
    pf = read_prompt_file(prompt_file)
    captions, label = dev_captions(data_dir)
    r = check_prompts(pf, captions, label)
    t = Table(title=str(prompt_file), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("prompts", f"{r.count:,}")
    t.add_row("unique", f"{r.unique:,}")
    t.add_row("longest", f"#{r.longest['index']}: {r.longest['chars']} chars, {r.longest['words']} words")
    t.add_row("blank lines", (f"{len(r.blank_lines)} (lines {_ranges(r.blank_lines)})" if r.blank_lines else "none"))
    t.add_row("sha256", r.sha256 + (" (UTF-8 BOM)" if r.bom else ""))
    t.add_row("compared with", r.reference)
    n_unique_missing = len({m["prompt"] for m in r.not_in_dev})
    t.add_row("not in dev captions", f"{len(r.not_in_dev)} line(s), {n_unique_missing} unique")
    con.print(t)
    if r.whitespace_edges:
        con.print(f"[yellow]{len(r.whitespace_edges)} prompt(s) have leading/trailing whitespace (kept verbatim): "
                  f"#{_ranges(r.whitespace_edges)}[/]")
    if r.not_in_dev:
        m = Table(title="prompts never seen in the dev captions", title_justify="left", title_style="yellow")
        m.add_column("#", justify="right")
        m.add_column("prompt", overflow="fold")
        m.add_column("closest dev caption", overflow="fold")
        for x in r.not_in_dev[: show or None]:
            m.add_row(str(x["index"]), escape(x["prompt"]), escape(x["closest"] or "-"))
        if show and len(r.not_in_dev) > show:
            m.add_row("", f"... and {len(r.not_in_dev) - show} more", "")
        con.print(m)
    else:
        con.print("[green]every prompt is a dev caption[/]")
    if json_out:
        write_json(json_out, r.to_dict())
        con.print(f"report -> {json_out}")


@prompts.command("make")
@click.argument("prompt_file", metavar="FILE", type=out_file)
@click.option("--n", "n", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Lines (prompts) to write (the 2024 test file has 5,000).")
@click.option("--unique", "n_unique", type=click.IntRange(min=1), default=260, show_default=True,
              help="Distinct prompts among them (the 2024 test file has 260).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the draw.")
@click.option("--data", "data_dir", type=existing_dir, default=None,
              help="Draw from this dev set, weighted by caption frequency (default: shipped list, uniform).")
@click.option("--overwrite", is_flag=True, help="Replace FILE if it exists.")
def prompts_make(prompt_file: Path, n: int, n_unique: int, seed: int, data_dir: Path | None, overwrite: bool) -> None:
    """Write a stand-in for the unpublished test prompt file: N lines over UNIQUE dev captions.

    The real test file has 5,000 lines and 260 unique prompts, all of them dev captions.

    \b
    Examples:
      harness prompts make test-prompts.txt                       # 5,000 lines, 260 unique
      harness prompts make small.txt --n 16 --unique 8 --data ../shared/data/imageclef2024/dev-256
    """
    from harness.errors import UserError
    from harness.io import sha256_file, write_text
    from harness.prompts import dev_captions, format_prompt_file, synthesize_test_prompts

    if prompt_file.exists() and not overwrite:
        raise UserError("file exists (use --overwrite to replace it)", prompt_file)
    check_output_file(prompt_file)
    captions, label = dev_captions(data_dir)
    lines = synthesize_test_prompts(captions, n=n, n_unique=n_unique, seed=seed)
    write_text(prompt_file, format_prompt_file(lines))
    _console().print(f"[green]{prompt_file}[/]: {len(lines):,} prompts, {len(set(lines))} unique, from {label}; "
                     f"sha256 {sha256_file(prompt_file)}")


def _short(where: str, root: Path) -> str:
    """A path inside DIR shown relative to it (the table is narrow); the JSON report keeps full paths."""
    prefix = str(root).rstrip("/") + "/"
    return where[len(prefix):] if where.startswith(prefix) else where


def _ranges(nums: list[int], limit: int = 12) -> str:
    """[1,2,3,7] -> '1-3, 7' (first `limit` ranges)."""
    out: list[str] = []
    start = prev = None
    for x in nums:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = x
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(out[:limit]) + (f", ... ({len(out) - limit} more)" if len(out) > limit else "")
