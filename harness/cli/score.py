"""`harness score` and `harness leaderboard`."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import existing_dir, existing_file


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(score)
    cli.add_command(leaderboard)


@click.command()
@click.argument("run_dir", metavar="RUN", type=existing_dir)
@click.option("--real", default="val", show_default=True,
              help="Real images: 'val' (the split's validation images), 'all' (all dev images - includes training "
                   "images) or a folder.")
@click.option("--split", "split_path", type=existing_file, default=None,
              help="SPLIT.json for --real val (default: the split named in the run's config).")
@click.option("--data", "data_dir", type=existing_dir, default=None,
              help="Dev-set dir for --real val/all (default: the one named in the run's config).")
@click.option("--metrics", "metrics_text", default="fid,is,prc,imageclef2024", show_default=True,
              help="Comma list from fid,is,prc,kid,imageclef2024.")
@click.option("--prc-features", type=click.Choice(["vgg16", "inception"]), default="vgg16", show_default=True,
              help="Features for precision/recall: VGG16 fc2_relu (torch-fidelity's) or Inception pool3 (labelled).")
@click.option("--inception-weights", type=existing_file, default=None,
              help="Local weights-inception-2015-12-05-6726825d.pth (FID, IS, KID).")
@click.option("--vgg-weights", type=existing_file, default=None, help="Local vgg16-397923af.pth (precision/recall).")
@click.option("--imageclef-weights", type=existing_file, default=None,
              help="Local inception_v3_google-0cc3c7bd.pth (torchvision ImageNet InceptionV3, imageclef2024).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--kid-subset-size", type=int, default=1000, show_default=True,
              help="KID subset size (lowered to the smaller set's N when needed).")
@click.option("--no-cache", is_flag=True, help="Recompute features even when cached (the cache is not updated).")
@click.option("--no-download", is_flag=True, help="Never download weights (also implied by HARNESS_OFFLINE=1).")
@click.option("--leaderboard", "leaderboard_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("leaderboard.md"), show_default=True, help="Leaderboard file to update afterwards.")
@click.option("--no-leaderboard", is_flag=True, help="Do not update the leaderboard.")
@click.option("--allow-unverified-weights", is_flag=True, hidden=True,
              help="TESTS ONLY: accept weights whose sha256 is not the published one (results kept off the board).")
def score(run_dir: Path, real: str, split_path, data_dir, metrics_text: str, prc_features: str, inception_weights,
          vgg_weights, imageclef_weights, batch_size: int, device: str, kid_subset_size: int, no_cache: bool,
          no_download: bool, leaderboard_path: Path, no_leaderboard: bool, allow_unverified_weights: bool) -> None:
    """Score RUN/images: FID, IS, precision/recall/F1 (torch-fidelity), KID, and the organisers' 2024 metric.

    Features are cached by content hash, so scoring the same images again is fast. Results go to RUN/metrics.json
    with N_gen / N_real, the real-set hash, extractor weight hashes and library versions; missing weights make a
    metric "not computed" (with the file name and where to put it), never a number.

    \b
    Examples:
      harness score runs/msdm-unet-20261122-1532
      harness score runs/<run> --real all --metrics fid,prc
      harness score runs/<run> --real path/to/folder --inception-weights weights/weights-inception-2015-12-05-6726825d.pth \\
          --vgg-weights weights/vgg16-397923af.pth --imageclef-weights weights/inception_v3_google-0cc3c7bd.pth
    """
    from rich.console import Console
    from rich.table import Table

    from harness.config import from_dict
    from harness.runs import open_run
    from harness.score import ScoreConfig, parse_metrics, score_run

    err = Console(stderr=True, highlight=False)
    cfg = from_dict(ScoreConfig, {
        "real": real, "split": split_path, "data": data_dir, "metrics": parse_metrics(metrics_text),
        "prc_features": prc_features, "inception_weights": inception_weights, "vgg_weights": vgg_weights,
        "imageclef_weights": imageclef_weights, "batch_size": batch_size, "device": device,
        "kid_subset_size": kid_subset_size, "use_cache": not no_cache, "allow_download": not no_download,
        "allow_unverified_weights": allow_unverified_weights,
    })
    run = open_run(run_dir)
    result = score_run(run, cfg, log=err.print)

    table = Table(title=f"{run.id} vs {result.data['real']['label']}")
    for col in ("metric", "value", "N_gen", "N_real", "features"):
        table.add_column(col, justify="right" if col.startswith("N") else "left")
    for name, m in result.metrics.items():
        if m.get("status") != "ok":
            table.add_row(name, f"[yellow]not computed[/]: {m.get('reason', '')}", "—", "—", "—")
            continue
        if name == "fid":
            value = f"{m['value']:.4f}"
        elif name in ("is", "kid"):
            value = f"{m['mean']:.4f} ± {m['std']:.4f}"
        elif name == "prc":
            value = f"P {m['precision']:.4f}  R {m['recall']:.4f}  F1 {m['f1']:.4f}"
        else:
            value = f"FD {m['fd']:.5f}  IS {m['is_mean']:.4f} ± {m['is_std']:.4f} (median {m['is_median']:.4f})"
        feats = m.get("features") or f"{m['extractor']} {m.get('layer', 'softmax')}"
        if not m.get("weights_verified", True):
            feats += " [red](UNVERIFIED weights)[/]"
        table.add_row(name, value, str(m["n_gen"]), str(m["n_real"] if m["n_real"] is not None else "—"), feats)
    Console().print(table)
    if "imageclef2024" in result.metrics and result.metrics["imageclef2024"].get("status") == "ok":
        err.print("imageclef2024 " + result.metrics["imageclef2024"]["label"])
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    click.echo(f"wrote {result.path}")
    if not no_leaderboard:
        from harness.leaderboard import write_leaderboard

        out, _ = write_leaderboard(leaderboard_path)
        click.echo(f"updated {out}")


@click.command()
@click.option("--format", "fmt", type=click.Choice(["md", "rich"]), default="md", show_default=True,
              help="md: (re)write the markdown file; rich: print the tables in the terminal.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("leaderboard.md"),
              show_default=True, help="Markdown file to write (plots go to leaderboard_plots/ beside it).")
@click.option("--runs-dir", type=existing_dir, default=None, help="Runs root (default $HARNESS_RUNS_DIR or ./runs).")
@click.option("--no-plots", is_flag=True, help="Skip the sweep plots and sample grids.")
def leaderboard(fmt: str, out: Path, runs_dir: Path | None, no_plots: bool) -> None:
    """Rebuild the local leaderboard from every runs/*/metrics.json, grouped by comparable real set and N.

    \b
    Examples:
      harness leaderboard                      # writes ./leaderboard.md + leaderboard_plots/
      harness leaderboard --format rich        # print the same tables in the terminal
      harness leaderboard --out docs/leaderboard.md --runs-dir /data/runs
    """
    from harness.leaderboard import collect, print_rich, write_leaderboard

    if fmt == "rich":
        print_rich(collect(runs_dir))
        return
    path, got = write_leaderboard(out, runs_dir, plots=not no_plots)
    click.echo(f"wrote {path} ({len(got.rows)} scored run(s))")
