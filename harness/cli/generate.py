"""`harness generate`, `harness package`, `harness validate`, `harness quickstart`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from harness.cli.challenges import challenge_option
from harness.cli.common import FiniteFloatRange, check_output_dir
from harness.cli.common import SEED, existing_dir, existing_file

# --scheduler names (diffusers' samplers) -> the generation config's names.
SCHEDULER_NAMES = {"ddim": "ddim", "euler": "euler", "dpm-solver++": "dpmpp"}


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(generate)
    cli.add_command(package)
    cli.add_command(validate)
    cli.add_command(quickstart)
    make_tiny = groups["models"].commands.get("make-tiny") if "models" in groups else None
    if isinstance(make_tiny, click.Group):
        make_tiny.add_command(make_tiny_clip_text)


@click.command()
@click.argument("run_dir", metavar="RUN", type=existing_dir)
@click.option("--prompts", "prompts_path", type=str, required=True,
              help="Prompt file, one per line (the test prompts: for the submission), or split:val = the run's "
                   "validation captions (for `harness score --real val`), or split:train = its training captions "
                   "(for `harness fter`).")
@click.option("--images-per-prompt", type=click.IntRange(min=1), default=None,
              help="split:val: K captions per validation image; a prompt file: each line K times (default: the "
                   "challenge's images per prompt: 1 for 2024, 10 for 2025 task 2).")
@challenge_option
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts per forward pass. Keep it (and --threads, --device) fixed when resuming for bit-identical "
                   "images; generation.json records them and a resume with other values warns.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Base seed; image i uses a seed derived from (seed, i).")
@click.option("--out", "out_dir", type=existing_dir, default=None, help="Images folder (default RUN/images).")
@click.option("--overwrite", is_flag=True,
              help="Regenerate every image, replacing what is there (images past the end of a shorter prompt file "
                   "are removed).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampling steps (family default if unset).")
@click.option("--guidance", type=FiniteFloatRange(min=0), default=None,
              help="Classifier-free guidance scale, finite and >= 0 (family default if unset).")
@click.option("--device", type=str, default=None,
              help="torch device: cpu, cuda, cuda:N (default: cuda if available, else cpu).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's own choice, usually one per core). Recorded in "
                   "generation.json: another count can move a pixel by one grey level on CPU.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Weights/activations dtype (family default fp32; bf16/fp16 on a GPU).")
@click.option("--num-processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Shard prompts over N processes with `accelerate launch` (one per GPU; gloo on CPU).")
# Family-specific sampling options (RunKind.generate_options): a family that does not honour one refuses it.
@click.option("--scheduler", type=click.Choice(list(SCHEDULER_NAMES)), default=None,
              help="Sampler, as diffusers' DDIMScheduler / EulerDiscreteScheduler / DPMSolverMultistepScheduler "
                   "(dpmsolver++, order 2) from the base's scheduler config (default: the run's, ddim; sd).")
@click.option("--negative-prompt", type=str, default=None,
              help="Negative prompt of classifier-free guidance (default: the run's, none; sd).")
@click.option("--height", type=click.IntRange(min=8), default=None,
              help="Image height in pixels (default: the run's, its training resolution; sd, kandinsky, retrieval).")
@click.option("--width", type=click.IntRange(min=8), default=None,
              help="Image width in pixels (default: the run's, its training resolution; sd, kandinsky, retrieval).")
def generate(run_dir, prompts_path, images_per_prompt, challenge, batch_size, seed, out_dir, overwrite, steps,
             guidance, device, threads, dtype, num_processes, scheduler, negative_prompt, height, width):
    """Generate one image per prompt line into RUN/images/00001.png ... plus manifest.csv.

    With --challenge the prompt file is read in the challenge's format (2025: the JSON of prompt pairs), each
    prompt gets the challenge's K images (K per-index seeds of the same prompt) and the files are named by its
    template (2025: prompt0001_img0001.png ...), all in one folder.

    Resumable: images already written for the same prompt file, seed and model are kept; a killed run is simply
    started again. Image i depends only on (seed, i) and --batch-size: the same for any number of processes and any
    number of kills (batches are fixed index blocks); another batch size, thread count or device may move a pixel by
    one grey level, as floating-point sums run in another order (a resume that changes them warns). A copied or
    moved run keeps its images: the model identity holds content hashes, not folder names. With --overwrite, images
    past the end of a shorter prompt file are removed. An image that comes out constant (what a NaN/inf tensor
    becomes) is never written: the run stops naming its index.

    \b
    Examples:
      harness generate runs/msdm-unet-tiny-20261122-1532 --prompts test-prompts.txt
      harness generate runs/kandinsky-prior-r128-... --prompts test.txt --batch-size 16 --steps 50
      harness generate RUN --prompts test.txt --num-processes 4      # 4 GPUs, one process each
      harness generate RUN --prompts split:val --images-per-prompt 4   # validation captions: for scoring
      harness generate RUN --prompts test-2025.json --challenge imageclef2025-task2   # 10 images per prompt
    """
    from rich.markup import escape

    from harness.errors import UserError
    from harness.generate import check_images_dir, distributed_shard, generate_images, load_generator
    from harness.progress import console, progress
    from harness.prompts import resolve_prompt_source
    from harness.runs import open_run

    from harness.challenges import load_profile

    profile = load_profile(challenge)
    k = profile.k
    split = prompts_path.startswith("split:")
    template = profile.images.file_template
    per_prompt_names = "{prompt" in template or "{image" in template  # names that say which prompt an image is of
    eff_k = images_per_prompt or k
    if eff_k != k and per_prompt_names and not split:
        raise UserError(f"--images-per-prompt {images_per_prompt}: the challenge {profile.name} asks for {k} image(s) "
                        "per prompt (other counts are for split:val scoring prompts only)")
    run = open_run(run_dir)
    reader = profile.read_prompts if profile.prompts.format != "lines" else None
    if reader is None and not split:
        profile.check_lines_source(prompts_path)
    pf = resolve_prompt_source(prompts_path, run.dir, run.config(), eff_k, reader=reader)
    # The challenge's names where they fit the image list; 00001.png ... (generate's own default) otherwise: the
    # 2024 names, and split:val prompts drawn with another K than a per-prompt naming expects.
    name = None
    if template != "{index:05d}.png" and (eff_k == k or not per_prompt_names):
        name = profile.file_name
    images_dir = Path(out_dir) if out_dir else run.images_dir
    # Every option is checked before the model is loaded (minutes on a real model) or anything is written.
    check_output_dir(images_dir, "--out" if out_dir else "")
    dev = _device(device)
    if num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _relaunch_distributed(num_processes)
        return
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    rank, world = distributed_shard()
    overrides = {"steps": steps, "guidance": guidance, "dtype": dtype, "device": str(dev),
                 "scheduler": SCHEDULER_NAMES.get(scheduler), "negative_prompt": negative_prompt, "height": height,
                 "width": width}
    gen = load_generator(run, overrides)
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
            device=_device_label(dev),
            warn=lambda m: console.print(f"[yellow]warning:[/] {escape(m)}", markup=True, highlight=False),
            **({"name": name} if name else {}),
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
        try:
            run.log(f"generate: {report.total} images complete, prompts sha256 {pf.sha256}, seed {seed}, "
                    f"world {world}")
        except OSError as e:  # a run on read-only storage, generating into --out elsewhere
            console.print(f"[yellow]warning:[/] not logged in {run.dir} ({e.strerror})", markup=True, highlight=False)
        what = "prompts" if eff_k == 1 else f"images ({len(pf.prompts) // eff_k} prompts x {eff_k})"
        console.print(f"[green]{report.total} {what} -> {images_dir}: complete[/]")


def _device(device: str | None):
    """--device checked up front (an unknown or unavailable device is one line, exit 2); under a multi-process
    launch the default is this rank's device."""
    from harness.distributed import launched, pick_device, state

    if device in (None, "", "auto") and launched():
        return state().device
    return pick_device(device)


def _device_label(dev) -> str:
    """The device as recorded in generation.json: another GPU model can move a pixel as much as another batch."""
    if dev.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return dev.type


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
@challenge_option
@click.option("--hub-repo", default=None, metavar="USER/NAME",
              help="imageclef2025-task2: write the Hugging Face model-repo folder the organisers run (weights, "
                   "submission_task2.py, requirements.txt, model card, predictions_2.json) to OUT/NAME.")
@click.option("--push", is_flag=True, help="With --hub-repo: upload the folder with huggingface_hub (token from "
                                           "HF_TOKEN or `hf auth login`; never written to a file).")
def package(run_dir, prompts_path, team, out_dir, images_dir, challenge, hub_repo, push):
    """Validate RUN's images against the prompt file, then write submissions/<team>_clef2024_medvqa.zip
    (another --challenge: its archive name and layout, e.g. a flat zip of prompt0001_img0001.png ...).

    The checks are `harness validate`'s (so what package writes, validate accepts), and the zip appears only when
    all pass, in one piece (written under a temporary name, then renamed).

    \b
    Example:
      harness package runs/msdm-unet-tiny-20261122-1532 --prompts test-prompts.txt --team simula-fans
      harness package RUN --prompts test-2025.json --team t --challenge imageclef2025-task2   # flat zip
      harness package RUN --prompts test-2025.json --team t --challenge imageclef2025-task2 \\
          --hub-repo me/medvqa-task2 --push                                                    # the hub repo
    """
    from harness.challenges import load_profile
    from harness.package import package_run, zip_summary
    from harness.progress import console
    from harness.runs import open_run

    profile = load_profile(challenge)
    run = open_run(run_dir)
    prompts = profile.read_prompts(prompts_path).prompts
    check_output_dir(out_dir, "--out")
    if push and not hub_repo:
        from harness.errors import UserError

        raise UserError("--push uploads the --hub-repo folder: pass --hub-repo USER/NAME")
    if hub_repo:
        _package_hub(run, profile, prompts_path, team, out_dir, images_dir, hub_repo, push)
        return
    path, report = package_run(Path(images_dir) if images_dir else run.images_dir, prompts, team, out_dir,
                               profile=profile)
    s = zip_summary(path)
    try:
        run.log(f"package: {path} sha256 {s['sha256']}")
    except OSError as e:  # a run on read-only storage can still be packaged elsewhere
        console.print(f"[yellow]warning:[/] not logged in {run.dir} ({e.strerror})", markup=True, highlight=False)
    w, h = report.size or (0, 0)
    console.print(f"[green]wrote[/] {path}  ({report.n_images} images {w}x{h}, {s['bytes']:,} bytes)")
    click.echo(f"sha256 {s['sha256']}")


def _package_hub(run, profile, prompts_path, team, out_dir, images_dir, hub_repo, push) -> None:
    import json

    from harness.challenges.hub import build_hub_folder, push_hub_folder
    from harness.errors import UserError
    from harness.generate import GENERATION_JSON
    from harness.progress import console

    if profile.name != "imageclef2025-task2":
        raise UserError(f"--hub-repo: a hub submission is the imageclef2025-task2 format, not {profile.name}'s "
                        "(pass --challenge imageclef2025-task2)")
    # Seed and batch size as the local images were made, so the organisers' run draws the same images.
    gen_json = Path(images_dir or run.images_dir) / GENERATION_JSON
    seed, batch, rec = 0, 8, None
    if gen_json.is_file():
        try:
            rec = json.loads(gen_json.read_text(encoding="utf-8"))
            seed = int(rec.get("base_seed", 0))
            batch = int(((rec.get("settings") or [{}])[-1] or {}).get("batch_size") or 8)
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f"not a generation record ({e})", gen_json) from None
    folder = build_hub_folder(run, team, hub_repo, Path(prompts_path), out_dir, seed=seed, batch_size=batch,
                              generation=rec)
    console.print(f"[green]wrote[/] {folder} (hub folder for {hub_repo}; seed {seed}, batch size {batch})")
    info = json.loads((folder / "predictions_2.json").read_text(encoding="utf-8"))["submission_info"]
    empty = [k for k, v in info.items() if not v and k != "Notes_to_organizers"]
    if empty:
        console.print(f"[yellow]fill in[/] {', '.join(empty)} in {folder / 'predictions_2.json'} (submission_info, "
                      "read by submission_task2.py) before the organisers run it", highlight=False)
    if push:
        click.echo(f"pushed {push_hub_folder(folder, hub_repo)}")


@click.command()
@click.argument("zip_path", metavar="ZIP|FOLDER", type=click.Path(exists=False, path_type=Path))
@click.option("--prompts", "prompts_path", type=existing_file, required=True, help="The prompt file.")
@challenge_option
def validate(zip_path, prompts_path, challenge):
    """Check a submission zip: one RGB PNG per prompt, one size, safe entry names, manifest matches, and content.

    A FOLDER of images gets the same checks (what the organisers' script reads); --challenge sets the names, the
    count (K per prompt), the format and the zip layout. Each missing, extra or malformed file is named.

    Content problems: a constant image (all black is what a NaN/inf tensor becomes), a set of identical images, and
    images above 4096x4096 pixels (16.8 MP; read from the PNG header, so a decompression bomb is never decoded).

    \b
    Example:
      harness validate submissions/simula-fans_clef2024_medvqa.zip --prompts test-prompts.txt
      harness validate RUN/images --prompts test-2025.json --challenge imageclef2025-task2
    """
    from harness.challenges import load_profile
    from harness.errors import UserError
    from harness.package import iter_problems, validate_dir, validate_zip, zip_summary
    from harness.progress import console

    profile = load_profile(challenge)
    prompts = profile.read_prompts(prompts_path).prompts
    if (Path(zip_path) / "submission_task2.py").is_file():  # a hub submission folder (package --hub-repo)
        from harness.challenges.hub import validate_hub_folder

        problems = validate_hub_folder(Path(zip_path))
        for p in problems:
            click.echo(f"  - {p}")
        if problems:
            raise UserError(f"{len(problems)} problem(s); first: {problems[0]}", zip_path)
        console.print(f"[green]valid[/] {zip_path}: hub submission folder ({profile.name})")
        return
    folder = Path(zip_path).is_dir()
    report = validate_dir(zip_path, prompts, profile) if folder else validate_zip(zip_path, prompts, profile)
    if not report.ok:
        for p in iter_problems(report):  # the report goes to stdout; stderr gets the one error line
            click.echo(f"  - {p}")
        raise UserError(f"{len(report.problems)} problem(s); first: {report.problems[0]}", zip_path)
    w, h = report.size or (0, 0)
    console.print(f"[green]valid[/] {zip_path}: {report.n_images} images {w}x{h} for {report.n_prompts} prompts "
                  f"({profile.name})")
    if not folder:
        click.echo(f"sha256 {zip_summary(Path(zip_path))['sha256']}")


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("quickstart"),
              show_default=True, help="Folder for the split, runs, prompts and the zip.")
@click.option("--model", type=click.Choice(["msdm", "test-pattern"]), default="msdm", show_default=True,
              help="msdm: train the tiny MSDM on CPU (a few minutes); test-pattern: skip training (seconds).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the split, training and generation.")
def quickstart(workdir, model, seed):
    """Run the whole pipeline offline on CPU on the small real sample shipped with the package.

    data check -> split -> train (tiny MSDM VAE + UNet) -> generate -> score -> package -> validate.

    \b
    Example:
      harness quickstart                      # everything, a few minutes on 2 cores
      harness quickstart --model test-pattern # the plumbing only, in seconds
    """
    from harness.quickstart import run_quickstart

    check_output_dir(workdir, "--workdir")
    run_quickstart(Path(workdir), model=model, seed=seed)


@click.command("clip-text")
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_dir", type=existing_dir, default=None,
              help="Learn the tokenizer from this dev set's captions (default: the shipped list of 483 dev captions).")
@click.option("--hidden-size", type=click.IntRange(min=8, max=1024), default=32, show_default=True,
              help="Width of the tiny text tower, even (2 attention heads); 32 is the tests' size, real CLIP ViT-L/14 "
                   "has 768.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it exists.")
def make_tiny_clip_text(out_dir: Path, data_dir: Path | None, hidden_size: int, seed: int, overwrite: bool) -> None:
    """Write a tiny CLIP text encoder + tokenizer to DIR (tokenizer/ + text_encoder/, the diffusers pipeline layout),
    the offline stand-in for openai/clip-vit-large-patch14 that the tests and `harness quickstart` use.

    The tokenizer is a real byte-level BPE `CLIPTokenizer` learned offline from the dev captions, the encoder a
    randomly initialised `CLIPTextModel`; both are saved with `save_pretrained` and load through the same code as
    the hub model. Use it to run the README's MSDM recipe end to end without network (the images mean nothing).

    Scoring offline needs the metric extractors' weights too. In tests, `harness score --allow-unverified-weights`
    accepts randomly initialised extractors whose sha256 is not the published one; such results are labelled and
    kept off the leaderboard: a TEST option, never for reported numbers.

    \b
    Example (MSDM recipe, offline on CPU):
      harness models make-tiny clip-text tiny-clip
      harness train msdm-vae  --split split.json --data $DATA --preset tiny --max-steps 50
      harness train msdm-unet --split split.json --data $DATA --preset tiny --vae runs/<msdm-vae-run> \\
          --text-encoder tiny-clip --max-steps 50
    """
    from harness.errors import UserError
    from harness.progress import console
    from harness.io import atomic_dir
    from harness.prompts import dev_captions
    from models.tiny_clip import save_tiny_clip_text

    if hidden_size % 2:
        raise UserError(f"--hidden-size {hidden_size} must be even (the tiny tower has 2 attention heads)")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise UserError("exists and is not empty (use --overwrite to replace it)", out_dir)
    check_output_dir(out_dir.parent, name=out_dir)
    captions, label = dev_captions(data_dir)
    with atomic_dir(out_dir) as tmp:  # DIR is either the whole model or untouched
        save_tiny_clip_text(tmp, sorted(set(captions)), hidden_size=hidden_size, seed=seed)
    console.print(f"[green]{out_dir}[/]: tiny CLIP text encoder (hidden {hidden_size}, seed {seed}) + tokenizer "
                  f"learned from {label}; pass it as --text-encoder {out_dir}", highlight=False)
