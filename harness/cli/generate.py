"""`harness generate`, `harness package`, `harness validate`, `harness quickstart`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from harness.cli.common import existing_dir, existing_file


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(generate)
    cli.add_command(package)
    cli.add_command(validate)
    cli.add_command(quickstart)


@click.command()
@click.argument("run_dir", metavar="RUN", type=existing_dir)
@click.option("--prompts", "prompts_path", type=existing_file, required=True, help="Prompt file, one per line.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Prompts per forward pass. Keep it fixed when resuming for bit-identical images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed; image i uses a seed derived from (seed, i).")
@click.option("--out", "out_dir", type=existing_dir, default=None, help="Images folder (default RUN/images).")
@click.option("--overwrite", is_flag=True, help="Regenerate every image, replacing what is there.")
@click.option("--steps", type=int, default=None, help="Sampling steps (family default if unset).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (family default if unset).")
@click.option("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Weights/activations dtype (family default fp32; bf16/fp16 on a GPU).")
@click.option("--num-processes", type=int, default=1, show_default=True,
              help="Shard prompts over N processes with `accelerate launch` (one per GPU; gloo on CPU).")
def generate(run_dir, prompts_path, batch_size, seed, out_dir, overwrite, steps, guidance, device, dtype,
             num_processes):
    """Generate one image per prompt line into RUN/images/00001.png ... plus manifest.csv.

    Resumable: images already written for the same prompt file, seed and model are kept; a killed run is simply
    started again. Image i depends only on (seed, i) and --batch-size: the same for any number of processes and any
    number of kills (batches are fixed index blocks); another batch size may move a pixel by one grey level, as
    floating-point sums run in another order.

    \b
    Examples:
      harness generate runs/msdm-unet-tiny-20261122-1532 --prompts test-prompts.txt
      harness generate runs/kandinsky-prior-r128-... --prompts test.txt --batch-size 16 --steps 50
      harness generate RUN --prompts test.txt --num-processes 4      # 4 GPUs, one process each
    """
    from harness.errors import UserError
    from harness.generate import check_images_dir, distributed_shard, generate_images, load_generator
    from harness.progress import console, progress
    from harness.prompts import read_prompt_file
    from harness.runs import open_run

    if num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _relaunch_distributed(num_processes)
        return
    run = open_run(run_dir)
    pf = read_prompt_file(prompts_path)
    rank, world = distributed_shard()
    overrides = {"steps": steps, "guidance": guidance, "dtype": dtype, "device": device or _default_device()}
    gen = load_generator(run, overrides)
    images_dir = Path(out_dir) if out_dir else run.images_dir
    n_blocks = -(-len(pf.prompts) // batch_size)
    share = sum(min(batch_size, len(pf.prompts) - b * batch_size) for b in range(rank, n_blocks, world))
    barrier = None
    if world > 1:
        from harness.distributed import state

        barrier = state().wait_for_everyone
    with progress() as bar:
        task = bar.add_task(f"generate[{rank}/{world}]" if world > 1 else "generate", total=share)
        report = generate_images(
            gen, pf.prompts, images_dir, base_seed=seed, batch_size=batch_size, prompts_sha256=pf.sha256,
            overwrite=overwrite, shard=(rank, world), on_batch=lambda n: bar.advance(task, n), barrier=barrier,
        )
        bar.update(task, completed=share)
    shard_note = f" on rank {rank}/{world}" if world > 1 else ""
    console.print(f"{report.generated} generated, {report.skipped} already there{shard_note} ({report.seconds:.1f}s)")
    if barrier is not None:
        barrier()
    if rank == 0:
        problems = check_images_dir(images_dir, pf.prompts)
        if problems:
            raise UserError(f"generation incomplete: {problems[0]} ({len(problems)} problem(s))", images_dir)
        run.log(f"generate: {report.total} images complete, prompts sha256 {pf.sha256}, seed {seed}, world {world}")
        console.print(f"[green]{report.total} prompts -> {images_dir}: complete[/]")


def _default_device() -> str:
    from harness.distributed import launched, state

    if launched():
        return str(state().device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _relaunch_distributed(n: int) -> None:
    """Re-run this exact command under `accelerate launch` with n processes (CPU: gloo; GPU: one per device)."""
    import torch

    from harness.errors import UserError

    args = [a for a in sys.argv[1:]]
    cleaned, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--num-processes":
            skip = True
            continue
        if a.startswith("--num-processes="):
            continue
        cleaned.append(a)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    # The torchrun launcher: one process per GPU with NCCL, or n CPU processes with gloo when there is no GPU
    # (accelerate's `--cpu` flag would start a single process).
    cmd += ["--multi_gpu"]
    if 0 < torch.cuda.device_count() < n:
        raise UserError(f"--num-processes {n} but only {torch.cuda.device_count()} GPU(s) are visible")
    cmd += ["-m", "harness", *cleaned]
    code = subprocess.call(cmd)
    if code:
        raise SystemExit(code)


@click.command()
@click.argument("run_dir", metavar="RUN", type=existing_dir)
@click.option("--prompts", "prompts_path", type=existing_file, required=True, help="The prompt file generated from.")
@click.option("--team", required=True, help="Team name used in the zip name.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("submissions"),
              show_default=True, help="Folder for the zip.")
@click.option("--images", "images_dir", type=existing_dir, default=None, help="Images folder (default RUN/images).")
def package(run_dir, prompts_path, team, out_dir, images_dir):
    """Validate RUN's images against the prompt file, then write submissions/<team>_clef2024_medvqa.zip.

    \b
    Example:
      harness package runs/msdm-unet-tiny-20261122-1532 --prompts test-prompts.txt --team simula-fans
    """
    from harness.package import package_run, read_prompts, zip_summary
    from harness.progress import console
    from harness.runs import open_run

    run = open_run(run_dir)
    prompts = read_prompts(prompts_path)
    path, report = package_run(Path(images_dir) if images_dir else run.images_dir, prompts, team, out_dir)
    s = zip_summary(path)
    run.log(f"package: {path} sha256 {s['sha256']}")
    w, h = report.size or (0, 0)
    console.print(f"[green]wrote[/] {path}  ({report.n_images} images {w}x{h}, {s['bytes']:,} bytes)")
    click.echo(f"sha256 {s['sha256']}")


@click.command()
@click.argument("zip_path", metavar="ZIP", type=existing_file)
@click.option("--prompts", "prompts_path", type=existing_file, required=True, help="The prompt file.")
def validate(zip_path, prompts_path):
    """Check a submission zip: one RGB PNG per prompt, one size, safe entry names, manifest matches.

    \b
    Example:
      harness validate submissions/simula-fans_clef2024_medvqa.zip --prompts test-prompts.txt
    """
    from harness.errors import UserError
    from harness.package import iter_problems, read_prompts, validate_zip, zip_summary
    from harness.progress import console

    prompts = read_prompts(prompts_path)
    report = validate_zip(zip_path, prompts)
    if not report.ok:
        for p in iter_problems(report):  # the report goes to stdout; stderr gets the one error line
            click.echo(f"  - {p}")
        raise UserError(f"{len(report.problems)} problem(s); first: {report.problems[0]}", zip_path)
    s = zip_summary(Path(zip_path))
    w, h = report.size or (0, 0)
    console.print(f"[green]valid[/] {zip_path}: {report.n_images} images {w}x{h} for {report.n_prompts} prompts")
    click.echo(f"sha256 {s['sha256']}")


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("quickstart"),
              show_default=True, help="Folder for the split, runs, prompts and the zip.")
@click.option("--model", type=click.Choice(["msdm", "test-pattern"]), default="msdm", show_default=True,
              help="msdm: train the tiny MSDM on CPU (a few minutes); test-pattern: skip training (seconds).")
@click.option("--seed", type=int, default=0, show_default=True)
def quickstart(workdir, model, seed):
    """Run the whole pipeline offline on CPU on the small real sample shipped with the package.

    data check -> split -> train (tiny MSDM VAE + UNet) -> generate -> score -> package -> validate.

    \b
    Example:
      harness quickstart                      # everything, a few minutes on 2 cores
      harness quickstart --model test-pattern # the plumbing only, in seconds
    """
    from harness.quickstart import run_quickstart

    run_quickstart(Path(workdir), model=model, seed=seed)
