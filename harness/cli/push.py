"""`harness push RUN --repo USER/NAME`: the run's final weights and a model card on the Hugging Face hub
(harness/push.py). `--push-to-hub REPO` of the train commands calls the same code when training ends."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import existing_dir


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(push)


@click.command()
@click.argument("run_dir", metavar="RUN", type=existing_dir)
@click.option("--repo", required=True, metavar="USER/NAME", help="The hub model repo (created if it does not exist).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--dry-run", is_flag=True,
              help="Write the staged folder (model card README.md + the files) to --out and upload nothing.")
@click.option("--out", type=existing_dir, default=None,
              help="--dry-run: where the staged folder goes (default RUN/hub-push).")
def push(run_dir: Path, repo: str, private: bool, dry_run: bool, out: Path | None) -> None:
    """Upload RUN/final (the adapter or model, in the layout plain diffusers loads) to the hub with a model card:
    base model and revision, method and rank, training config and data hashes, the data licence (CC BY-NC 4.0) and
    its attribution, the metrics with N and 95 % intervals (when scored), a sample grid, the loading snippet.

    The token is huggingface_hub's own (HF_TOKEN or `hf auth login`); it is never printed or written. Offline
    (HF_HUB_OFFLINE=1) or with the hub unreachable, nothing is uploaded: one line names the repo and every file
    with its size, exit code 2.

    \b
    Examples:
      harness push runs/kandinsky-prior-r32-20261122-1532 --repo me/kvasir-prior-r32 --private
      harness push runs/sd-lora-r16-20261122-1532 --repo me/sd-polyps --dry-run   # inspect RUN/hub-push first
    """
    from rich.console import Console

    from harness.push import push as do_push
    from harness.runs import open_run

    if out is not None and not dry_run:
        from harness.errors import UserError

        raise UserError("--out applies to --dry-run")
    res = do_push(open_run(run_dir), repo, private=private, dry_run=dry_run, out=out)
    console = Console(highlight=False)
    if dry_run:
        console.print(f"staged {len(res.files)} files for {repo} in {res.folder} (nothing uploaded)")
    else:
        console.print(f"[green]pushed[/] {len(res.files)} files to {repo}: {res.url}")
