"""`harness score`, `harness compare`, `harness leaderboard` and `harness cache`."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import FiniteFloatRange, check_output_file, existing_dir, existing_file


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(score)
    cli.add_command(compare)
    cli.add_command(leaderboard)
    cli.add_command(cache)


@click.command()
@click.argument("target", metavar="RUN|DIR", type=existing_dir)
@click.option("--real", default="val", show_default=True,
              help="Real images: 'val' (the split's validation images), 'all' (all dev images - includes training "
                   "images) or a folder.")
@click.option("--real-preprocess", type=click.Choice(["match", "native", "center-crop"]), default="match",
              show_default=True,
              help="match: the training transform (harness/dataset.py: pad to square, antialiased bicubic resize) to "
                   "the generated size, so both sides reach the network alike; native: real files at their own size "
                   "(what torch-fidelity on two folders does); center-crop: shorter side to the generated size, "
                   "centre crop.")
@click.option("--split", "split_path", type=existing_file, default=None,
              help="SPLIT.json for --real val (default: the split named in the run's config).")
@click.option("--data", "data_dir", type=existing_dir, default=None,
              help="Dev-set dir for --real val/all (default: the one named in the run's config).")
@click.option("--metrics", "metrics_text", default="fid,is,prc,kid,imageclef2024", show_default=True,
              help="Comma list from fid,is,prc,kid,imageclef2024,fd-dinov2,fd-clip,memorisation,adherence (fd-*: "
                   "Frechet distance on DINOv2 ViT-L/14 / CLIP ViT-L/14 features, torch-fidelity's extractors; "
                   "memorisation: fraction of generated images closer to a training image than the 1st-percentile "
                   "held-out validation image is, harness/memorisation.py; adherence: does each image show what its "
                   "prompt asks, by the --classifier's attribute predictions, harness/adherence.py).")
@click.option("--prc-features", type=click.Choice(["vgg16", "inception"]), default="vgg16", show_default=True,
              help="Features for precision/recall: VGG16 fc2_relu (torch-fidelity's) or Inception pool3 (labelled).")
@click.option("--inception-weights", type=existing_file, default=None,
              help="Local weights-inception-2015-12-05-6726825d.pth (FID, IS, KID).")
@click.option("--vgg-weights", type=existing_file, default=None, help="Local vgg16-397923af.pth (precision/recall).")
@click.option("--imageclef-weights", type=existing_file, default=None,
              help="imageclef2024 network: Keras' inception_v3_weights_tf_dim_ordering_tf_kernels.h5 (the "
                   "organisers' weights, preferred) or torchvision's inception_v3_google-0cc3c7bd.pth (labelled an "
                   "approximation); the file's content decides.")
@click.option("--clip-weights", type=existing_file, default=None,
              help="Local OpenAI CLIP ViT-L-14.pt TorchScript file (fd-clip).")
@click.option("--bootstrap", type=click.IntRange(min=0), default=200, show_default=True,
              help="Bootstrap replicates for the 95 % intervals of FID, KID, precision, recall, F1 (0 = none); "
                   "seeded with torch-fidelity's rng_seed 2020. 200 keeps the interval ends stable to ~1e-2.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=1000, show_default=True,
              help="KID subset size (torch-fidelity's default; lowered to the smaller set's N when needed, shown).")
@click.option("--no-strata", is_flag=True, help="Skip the per-stratum (procedure x finding) KID.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Metrics file (default RUN/metrics.json or DIR/metrics.json).")
@click.option("--no-cache", is_flag=True, help="Recompute features even when cached (the cache is not updated).")
@click.option("--no-download", is_flag=True, help="Never download weights (also implied by HARNESS_OFFLINE=1).")
@click.option("--leaderboard", "leaderboard_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Leaderboard file to rebuild afterwards [default: leaderboard.md beside the runs folder the run "
                   "is in].")
@click.option("--no-leaderboard", is_flag=True, help="Do not update the leaderboard.")
@click.option("--allow-unverified-weights", is_flag=True,
              help="TESTS ONLY: accept weights whose sha256 is not the published one (randomly initialised "
                   "extractors); results are labelled and kept off the board unless --include-unverified.")
@click.option("--classifier", "classifier", type=existing_dir, default=None, metavar="CLF_RUN",
              help="Attribute classifier run (`harness train attributes`): adherence reads its attribute "
                   "predictions (required for --metrics adherence); memorisation measures distances in its "
                   "embedding.")
@click.option("--memorisation-space", type=click.Choice(["auto", "classifier", "inception", "pixels"]), default="auto",
              show_default=True,
              help="Feature space of memorisation; auto = the classifier's embedding with --classifier, else Inception "
                   "pool3 when its weights are found (as for FID), else 32x32 standardised pixels (the order issue "
                   "#16 asks for). The space used is recorded; likely copy = closer than the 1st-percentile held-out "
                   "validation image (the issue's definition).")
@click.option("--challenge", default=None,
              help="A challenge's official metric: imageclef2025-task2 = fidelity, agreement, diversity, FBD on "
                   "BiomedCLIP (needs --prompts, and --data = the real set in prompt-gt.csv layout); the 2024 "
                   "profile's metric (imageclef2024) is this command's own, so it scores as without --challenge.")
@click.option("--prompts", "prompts_path", type=existing_file, default=None, help="--challenge: the prompt file.")
@click.option("--organiser-quirks", is_flag=True,
              help="--challenge imageclef2025-task2: reproduce the public script's loop (first half of the pairs "
                   "only); the default is the intended metric over every pair. The result says which.")
@click.option("--biomedclip", default="ikim-uk-essen/BiomedCLIP_ViT_patch16_224", show_default=True,
              help="--challenge imageclef2025-task2: BiomedCLIP vision tower, hub id (the organisers') or folder.")
@click.option("--real-mapping", type=existing_file, default=None,
              help="--challenge imageclef2025-task2: the organisers' real_mapping JSON (pair's first prompt number -> "
                   "img_ids of --data); default: the real images captioned with either prompt of the pair.")
def score(target: Path, real: str, real_preprocess: str, split_path, data_dir, metrics_text: str, prc_features: str,
          inception_weights, vgg_weights, imageclef_weights, clip_weights, bootstrap: int, batch_size: int,
          device: str, kid_subset_size: int, no_strata: bool, out_path, no_cache: bool, no_download: bool,
          leaderboard_path, no_leaderboard: bool, allow_unverified_weights: bool, challenge, prompts_path,
          organiser_quirks: bool, biomedclip: str, real_mapping, classifier, memorisation_space: str) -> None:
    """Score RUN/images or any folder of images: FID, IS, precision/recall/F1 (torch-fidelity), KID (also per
    stratum), FD on DINOv2/CLIP, and the organisers' 2024 metric, with bootstrap 95 % intervals.

    Features are cached per image by content hash, so scoring the same images again is fast and a changed image
    costs one extraction. Results are merged into the metrics file per real set (and per metric: a re-score with
    fewer metrics keeps the others) with N_gen / N_real, the real-set hash and preprocessing, extractor weight hashes
    and library versions; missing weights make a metric "not computed" (with the file name and where to put it),
    never a number.

    \b
    Examples:
      harness score runs/msdm-unet-20261122-1532
      harness score runs/<run> --real all --metrics fid,prc
      harness score runs/<run> --metrics memorisation --classifier runs/<attributes-run>   # copies of training images?
      harness score path/to/other-model-images --real val --split SPLIT.json --data DATA --out other.json
      harness score runs/<run> --real path/to/folder --inception-weights weights/weights-inception-2015-12-05-6726825d.pth \\
          --vgg-weights weights/vgg16-397923af.pth --imageclef-weights weights/inception_v3_google-0cc3c7bd.pth
    """
    from rich.console import Console

    from harness.config import from_dict
    from harness.runs import open_run
    from harness.score import ScoreConfig, parse_metrics, score_folder, score_run

    # Output paths are checked before any feature is extracted (a bad one used to fail after the work, naming a
    # temp file).
    for path, option in ((out_path, "--out"), (leaderboard_path, "--leaderboard")):
        if path is not None:
            check_output_file(path, option)
    err = Console(stderr=True, highlight=False)
    if challenge:
        from harness.cli.challenges import score_challenge

        if score_challenge(target, challenge, prompts_path, data_dir, organiser_quirks, biomedclip, device,
                           batch_size, out_path, real_mapping):
            return
    cfg = from_dict(ScoreConfig, {
        "real": real, "split": split_path, "data": data_dir, "metrics": parse_metrics(metrics_text),
        "real_preprocess": real_preprocess, "prc_features": prc_features, "inception_weights": inception_weights,
        "vgg_weights": vgg_weights, "imageclef_weights": imageclef_weights, "clip_weights": clip_weights,
        "batch_size": batch_size, "device": device, "kid_subset_size": kid_subset_size, "bootstrap": bootstrap,
        "strata": not no_strata, "out": out_path, "use_cache": not no_cache, "allow_download": not no_download,
        "allow_unverified_weights": allow_unverified_weights, "classifier": classifier,
        "memorisation_space": memorisation_space,
    })
    is_run = (Path(target) / "config.json").is_file()
    run = open_run(target) if is_run else None
    result = score_run(run, cfg, log=err.print) if run else score_folder(Path(target), cfg, log=err.print)
    print_result(result)
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    click.echo(f"wrote {result.path}")
    if run is not None and not no_leaderboard:
        from harness.leaderboard import write_leaderboard

        root = run.dir.parent
        out, _ = write_leaderboard(leaderboard_path or root.parent / "leaderboard.md", root)
        click.echo(f"updated {out}")


def _console():
    """stdout console; piped output (files, CI logs) gets a wide fixed width instead of rich's 80-column wrap."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _iv(d, digits: int) -> str:
    if not isinstance(d, dict) or "low" not in d:
        return ""
    return f" [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def print_result(result) -> None:
    from rich.console import Console
    from rich.table import Table

    data = result.data
    prep = (data["real"].get("preprocess") or {}).get("label", "native")
    table = Table(title=f"{data.get('run_id') or data['generated']['dir']} vs {data['real']['label']} "
                        f"(real preprocessing: {prep})")
    for col in ("metric", "value [95 % interval]", "N_gen", "N_real", "features"):
        table.add_column(col, justify="right" if col.startswith("N") else "left")
    for name, m in result.metrics.items():
        if m.get("status") != "ok":
            table.add_row(name, f"[yellow]not computed[/]: {m.get('reason', '')}", "—", "—", "—")
            continue
        if name == "fid" or name.startswith("fd-"):
            value = f"{m['value']:.4f}{_iv(m.get('interval'), 3)}"
        elif name == "is":
            value = f"{m['mean']:.4f} ± {m['std']:.4f}"
        elif name == "kid":
            value = f"{m['mean']:.5f} ± {m['std']:.5f}{_iv(m.get('interval'), 5)}"
            lowered = m["subset_size"] < m.get("subset_size_requested", m["subset_size"])
            value += (f"\n[yellow]subsets of {m['subset_size']} (LOWERED from {m['subset_size_requested']})[/]"
                      if lowered else f"\nsubsets of {m['subset_size']}")
        elif name == "prc":
            ivs = m.get("intervals") or {}
            value = (f"P {m['precision']:.4f}{_iv(ivs.get('precision'), 3)}  R {m['recall']:.4f}"
                     f"{_iv(ivs.get('recall'), 3)}  F1 {m['f1']:.4f}{_iv(ivs.get('f1'), 3)}")
        elif name == "adherence":
            value = (f"macro AUROC {m['value']:.4f}{_iv(m.get('interval'), 3)}  macro F1 "
                     f"{m['macro_f1'] if m['macro_f1'] is None else round(m['macro_f1'], 4)}  all asked shown "
                     f"{'—' if m['all_asked'] is None else round(m['all_asked'], 4)}"
                     f"{_iv(m.get('all_asked_interval'), 3)}")
        elif name == "memorisation":
            ratio = f"; ratio median {m['ratio']['median']:.3g}" if m.get("ratio") else ""
            value = (f"{m['value']:.1%} likely copies{_iv(m.get('interval'), 3)} ({m['likely_copies']}{ratio}; "
                     f"train N {m['n_train']}; {m['space']} space)\ngrid: {m['grid']}")
            for w in [m.get("space_note"), *m.get("warnings", [])]:
                value += f"\n[yellow]{w}[/]" if w else ""
        else:
            value = f"FD {m['fd']:.5f}  IS {m['is_mean']:.4f} ± {m['is_std']:.4f} (median {m['is_median']:.4f})"
        if m.get("kept_from"):
            value += f"\n(kept from {m['kept_from']})"
        feats = m.get("features") or f"{m['extractor']} {m.get('layer', 'softmax')}"
        if not m.get("weights_verified", True):
            feats += " [red](UNVERIFIED weights)[/]"
        table.add_row(name, value, str(m["n_gen"]), str(m["n_real"] if m["n_real"] is not None else "—"), feats)
        if name == "kid":
            strata = m.get("strata") or {}
            for stratum, s in strata.items():
                if s.get("status") == "ok":
                    table.add_row(f"  kid {stratum}", f"{s['mean']:.5f} ± {s['std']:.5f} (subsets of "
                                  f"{s['subset_size']})", str(s["n_gen"]), str(s["n_real"]), "")
            few = sorted(k for k, s in strata.items() if s.get("status") != "ok")
            if few:
                table.add_row("  kid strata", f"[dim]{len(few)} with < 2 images on a side: {', '.join(few)}[/]",
                              "", "", "")
    prompts = data.get("prompts") or {}
    if prompts.get("matches") is False:
        table.caption = f"[bold yellow]⚠ {prompts['warning']}[/]"
    _console().print(table)
    if "imageclef2024" in result.metrics and result.metrics["imageclef2024"].get("status") == "ok":
        Console(stderr=True, highlight=False).print("imageclef2024 " + result.metrics["imageclef2024"]["label"])


@click.command()
@click.argument("targets", metavar="A B [...]", nargs=-1, required=True,
                type=click.Path(exists=False, path_type=Path))
@click.option("--metrics", "metrics_text", default="fid,kid,prc", show_default=True,
              help="Comma list from fid,kid,prc (the runs' cached features are reused).")
@click.option("--bootstrap", type=click.IntRange(min=1), default=200, show_default=True,
              help="Paired bootstrap replicates (seeded).")
@click.option("--seed", type=click.IntRange(min=0), default=2020, show_default=True,
              help="Bootstrap seed (torch-fidelity's default rng_seed).")
@click.option("--real", "real_key", default=None,
              help="Which real set's result to compare (e.g. 'val:1a2b3c4d'; default: each one's latest scoring).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the comparisons as JSON.")
def compare(targets, metrics_text: str, bootstrap: int, seed: int, real_key, out_path) -> None:
    """Compare scored runs, scored image folders or metrics files (score --out): A against each of B, C, ... on
    the same real features.

    Paired bootstrap (generated images of both runs resampled with the same indices when they share the prompt
    list; real images resampled once per replicate for both): prints A - B with its 95 % interval, and
    "indistinguishable" when the interval contains 0.

    \b
    Examples:
      harness compare runs/kandinsky-r32-... runs/kandinsky-r64-...
      harness compare runs/best runs/r4 runs/r8 runs/r16 --metrics fid --out ranks.json
    """
    from rich.table import Table

    from harness.compare import compare_scored
    from harness.io import write_json

    if out_path is not None:
        check_output_file(out_path, "--out")
    names = tuple(m.strip() for m in metrics_text.split(",") if m.strip())
    bad = [m for m in names if m not in ("fid", "kid", "prc")]
    if bad or not names:
        raise click.BadParameter(f"choose from fid,kid,prc (got {metrics_text!r})", param_hint="--metrics")
    rows = compare_scored(list(targets), metrics=names, n_boot=bootstrap, seed=seed, real_key=real_key)
    table = Table(title=f"A = {rows[0]['a_label']}: A - B, paired bootstrap {rows[0]['level']:.0%} interval "
                        f"({bootstrap} replicates, seed {seed})")
    for col in ("B", "metric", "A", "B value", "A - B", "interval", "verdict"):
        table.add_column(col, justify="right" if col in ("A", "B value", "A - B") else "left")
    for r in rows:
        lower_better = r["metric"] in ("fid", "kid")
        if r["indistinguishable"]:
            verdict = "indistinguishable"
        else:
            better = (r["diff"] < 0) == lower_better
            verdict = "[green]A better[/]" if better else "[red]B better[/]"
        digits = 5 if r["metric"] == "kid" else 4
        table.add_row(r["b_label"], r["metric"], f"{r['a']:.{digits}f}", f"{r['b']:.{digits}f}",
                      f"{r['diff']:+.{digits}f}", f"[{r['low']:+.{digits}f}, {r['high']:+.{digits}f}]", verdict)
    _console().print(table)
    if out_path:
        write_json(out_path, {"format": "harness-compare/1", "targets": [str(t) for t in targets], "rows": rows})
        click.echo(f"wrote {out_path}")


@click.command()
@click.option("--format", "fmt", type=click.Choice(["md", "rich"]), default="md", show_default=True,
              help="md: (re)write the markdown file; rich: print the tables in the terminal.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("leaderboard.md"),
              show_default=True, help="Markdown file to write (plots go to leaderboard_plots/ beside it).")
@click.option("--runs-dir", type=existing_dir, default=None, help="Runs root (default $HARNESS_RUNS_DIR or ./runs).")
@click.option("--no-plots", is_flag=True, help="Skip the sweep plots and sample grids.")
@click.option("--include-unverified", is_flag=True,
              help="Also list rows scored with unverified (test) weights, labelled, e.g. to exercise the whole "
                   "path offline.")
def leaderboard(fmt: str, out: Path, runs_dir: Path | None, no_plots: bool, include_unverified: bool) -> None:
    """Rebuild the local leaderboard from every runs/*/metrics.json, one table per comparable real set,
    preprocessing and N; rows whose images changed since scoring are listed as stale.

    \b
    Examples:
      harness leaderboard                      # writes ./leaderboard.md + leaderboard_plots/
      harness leaderboard --format rich        # print the same tables in the terminal
      harness leaderboard --out docs/leaderboard.md --runs-dir /data/runs
      harness leaderboard --include-unverified # also the rows scored with test weights (labelled)
    """
    from harness.leaderboard import collect, print_rich, write_leaderboard

    if fmt == "md":
        check_output_file(out, "--out")
    if fmt == "rich":
        print_rich(collect(runs_dir, include_unverified=include_unverified))
        return
    path, got = write_leaderboard(out, runs_dir, plots=not no_plots, include_unverified=include_unverified)
    click.echo(f"wrote {path} ({len(got.rows)} scored run(s))")


@click.group()
def cache() -> None:
    """Inspect or trim the feature cache ($HARNESS_CACHE_DIR or <runs root>/.cache)."""


@cache.command("info")
def cache_info_cmd() -> None:
    """Files, size and age of the per-set features, per-image features and reused metric values.

    \b
    Examples:
      harness cache info
    """
    from rich.table import Table

    from harness.features import cache_info

    info = cache_info()
    table = Table(title=f"feature cache: {info['root']}")
    for col in ("kind", "files", "MB", "oldest (days)"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for kind in ("sets", "images", "metrics"):
        d = info[kind]
        table.add_row(kind, str(d["files"]), f"{d['bytes'] / 1e6:.1f}", f"{d['oldest_days']:.1f}")
    _console().print(table)


@cache.command("prune")
@click.option("--older-than", "older_than", type=FiniteFloatRange(min=0), default=None,
              help="Only entries not used for this many days (default: everything).")
def cache_prune_cmd(older_than) -> None:
    """Delete cache entries (all, or those unused for --older-than days); the next score recomputes them.

    \b
    Examples:
      harness cache prune --older-than 30
      harness cache prune
    """
    from harness.features import prune_cache

    files, n_bytes = prune_cache(older_than)
    click.echo(f"removed {files} file(s), {n_bytes / 1e6:.1f} MB")
