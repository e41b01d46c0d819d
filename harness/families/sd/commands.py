"""The click commands of the SD family (registered by cli.py): `harness train sd`, `harness models info sd`,
`harness models make-tiny sd`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from harness.cli.common import FiniteFloatRange, existing_dir, training_options
from harness.families.sd.cli import _csv, build_config
from harness.families.sd.config import PRESETS, SCHEDULERS
from harness.families.sd.optim import OPTIMIZERS
from models.sd.loading import DEFAULT_BASE
from models.sd.methods import COMPONENTS, METHODS, UNET_LORA_TARGETS


def _preset_help() -> str:
    lines = []
    for p in PRESETS:
        what = ",".join(p.components or ()) if p.method == "full" else (p.method or "lora")
        extra = f" {p.optimizer}" if p.optimizer else ""
        extra += f" r{p.rank}/a{p.alpha:g}" if p.rank else ""
        lines.append(f"{p.name} ({what}{extra})")
    return "; ".join(lines)


def sd_options(f):
    pos = click.IntRange(min=1)
    opts = [
        click.option("--preset", type=click.Choice([p.name for p in PRESETS]), default=None,
                     help="A row of a paper's table: dasilva-m1..m5 = da Silva et al. Table I (kohya LoRA on U-Net + "
                          "text encoder, clip skip 2, 100 epochs, batch 2, 512 px; no rank given: defaults apply), "
                          "pixelup-1..11 = Pixels Under Pressure's strategies (full U-Net/TE/VAE combinations, "
                          "LoRA r16/a32, DoRA r32/a64, BitFit, DiffFit; lr/steps not given: defaults apply). "
                          "Options given on the command line override the preset. " + _preset_help()),
        click.option("--base", type=str, default=None,
                     help=f"Base pipeline: hub id or local folder (default {DEFAULT_BASE}; SD 2.x works, "
                          "v-prediction is read from its scheduler config)."),
        click.option("--revision", type=str, default=None, help="Hub revision of the base (recorded)."),
        click.option("--method", type=click.Choice(METHODS), default=None,
                     help="full | lora | dora | bitfit (bias terms) | difffit (biases, norms, per-block scales; "
                          "Xie et al. 2023) (default lora, as diffusers' train_text_to_image_lora.py)."),
        click.option("--components", type=str, default=None,
                     help=f"Comma list from {','.join(COMPONENTS)}: any subset for full; unet[,text_encoder] "
                          "for lora/dora; unet for bitfit/difffit (default unet)."),
        click.option("--rank", type=pos, default=None, help="LoRA/DoRA rank (default 4, diffusers' LoRA trainer)."),
        click.option("--alpha", type=FiniteFloatRange(min=0, min_open=True), default=None,
                     help="LoRA alpha (default = rank: scale 1, as diffusers' LoRA trainer)."),
        click.option("--lora-targets", type=str, default=None,
                     help=f"U-Net modules to adapt (default {','.join(UNET_LORA_TARGETS)}, diffusers' LoRA "
                          "trainer); the text encoder gets q_proj,k_proj,v_proj,out_proj."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
                     help="adamw (default) | adamw8bit (needs CUDA) | adafactor | dadapt-sgd | prodigy; "
                          "adamw8bit, dadapt-sgd and prodigy need pip install -e \".[optim]\"."),
        click.option("--text-encoder-lr", type=FiniteFloatRange(min=0, min_open=True), default=None,
                     help="Learning rate of the text encoder's parameters (default --lr; kohya's "
                          "text_encoder_lr)."),
        click.option("--clip-skip", type=pos, default=None,
                     help="kohya/A1111 numbering: 1 = last CLIP layer (default), 2 = penultimate (da Silva et al.)."),
        click.option("--noise-offset", type=FiniteFloatRange(min=0), default=None,
                     help="'Original' noise offset (kohya/diffusers; default 0 = off)."),
        click.option("--multires-noise-iterations", type=click.IntRange(min=0), default=None,
                     help="Multires/pyramid noise iterations (kohya; default 0 = off; da Silva et al. use 6)."),
        click.option("--multires-noise-discount", type=FiniteFloatRange(min=0, max=1, min_open=True), default=None,
                     help="Multires noise discount (default 0.3, kohya's sd-scripts; da Silva et al. use 0.1)."),
        click.option("--snr-gamma", type=FiniteFloatRange(min=0, min_open=True), default=None,
                     help="Min-SNR-gamma loss weighting (e.g. 5, Hang et al.); off by default."),
        click.option("--ema/--no-ema", default=None, help="EMA of the weights for --method full (decay 0.9999, "
                                                          "diffusers EMAModel); the EMA weights are exported."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     help="Recompute activations in the backward pass (less memory, slower)."),
        click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
                     help="Linear warm-up steps, then constant (default 0: constant schedule)."),
        click.option("--cache/--no-cache", default=None,
                     help="Cache frozen text embeddings / VAE latents (default on; only what nothing trainable "
                          "feeds, and latents only without augmentation)."),
        click.option("--cache-dir", type=existing_dir, default=None, help="Encoder cache folder."),
        click.option("--resolution", type=pos, default=None, help="Training image size (default 512, SD 1.5's)."),
        click.option("--fit", type=click.Choice(["pad", "crop"]), default=None, help="Square images by pad or crop."),
        click.option("--captions", type=click.Choice(["sample", "all"]), default=None,
                     help="One item per image (sample) or per caption row (all)."),
        click.option("--caption-dropout", type=FiniteFloatRange(min=0, max=1), default=None,
                     help='Probability of training on "" (default 0, as diffusers\' SD trainers).'),
        click.option("--base-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="dtype of the frozen weights (adapters and trained parameters stay fp32)."),
        click.option("--export", "export", type=click.Choice(["diffusers", "kohya"]), default=None,
                     help="Adapter layouts to write: diffusers (always) and kohya (LoRA only: also RUN/final/"
                          "kohya_lora.safetensors for the SD WebUI / ComfyUI, via diffusers' converter)."),
        click.option("--sample-scheduler", type=click.Choice(SCHEDULERS), default=None,
                     help="Sampler `harness generate` uses on this run (default ddim; dpmpp = DPM-Solver++ 2M)."),
        click.option("--negative-prompt", type=str, default=None, help="Negative prompt for generation (default none)."),
        click.option("--height", type=click.IntRange(min=8), default=None,
                     help="Generated image height (default the training resolution)."),
        click.option("--width", type=click.IntRange(min=8), default=None,
                     help="Generated image width (default the training resolution)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command(name="sd")
@training_options
@sd_options
def train_sd(**kwargs):
    """Fine-tune Stable Diffusion 1.x/2.x: full (any of U-Net, text encoder, VAE), LoRA, DoRA, BitFit or DiffFit.

    Objective as diffusers' train_text_to_image.py (epsilon or v target from the base's scheduler config), with
    kohya's knobs (clip skip, separate text-encoder lr, noise offset, multires noise, optimizers) and Min-SNR.
    Adapters go to RUN/final/pytorch_lora_weights.safetensors (load with pipe.load_lora_weights(RUN/final));
    full/BitFit/DiffFit save the trained components to RUN/final/<component>/ (diffusers layout).

    \b
    Examples:
      harness train sd --split split.json --data DATA_DIR --method lora --rank 16 --alpha 32 --max-steps 5000
      harness train sd --split split.json --data DATA_DIR --preset dasilva-m2 --export kohya
      harness train sd --split split.json --data DATA_DIR --method full --components unet,text_encoder --ema
      harness train sd --split split.json --data DATA_DIR --resume runs/sd-lora-r4-...
    """
    from harness.cli.common import print_config
    from harness.distributed import state
    from harness.errors import UserError
    from harness.families.sd.task import resolved_config, resume, train
    from harness.progress import console
    from harness.runs import open_run

    resume_run = kwargs.pop("resume_run", None)
    run_id = kwargs.pop("run_id", None)
    if kwargs.pop("print_config", False):
        if resume_run:
            raise UserError("--print-config shows a new run's config; a run's own is in RUN/config.json")
        print_config(resolved_config(build_config(kwargs)))
        return
    if resume_run:
        run = resume(open_run(resume_run), max_steps=kwargs.get("max_steps"))
    else:
        run = train(build_config(kwargs), run_id=run_id)
    if not state().is_main_process:
        return
    stats = json.loads((run.dir / "train_stats.json").read_text(encoding="utf-8"))
    console.print(f"[green]trained[/] {run.dir}: {stats['steps']} steps, loss {stats['final_loss']:.4f}"
                  + (f", val {stats['val_loss']:.4f}" if stats.get("val_loss") is not None else "")
                  + f"; result in {run.dir / 'final'}")


@click.command(name="sd")
@click.option("--base", type=str, default=None,
              help="Pipeline folder or hub id (cached) whose configs to count; default: the shipped "
                   "stable-diffusion-v1-5 configs (models/sd/configs, offline).")
@click.option("--rank", type=click.IntRange(min=1), default=4, help="LoRA/DoRA rank of the count.")
@click.option("--alpha", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="LoRA alpha (does not change counts; default = rank).")
@click.option("--lora-targets", type=str, default=",".join(UNET_LORA_TARGETS), help="U-Net LoRA targets.")
def models_info_sd(base, rank, alpha, lora_targets):
    """Stable Diffusion: parameters per network and trainable parameters per method, counted on the meta device
    (no weights, no download; about 10 s for SD 1.5).

    \b
    Examples:
      harness models info sd
      harness models info sd --base /models/sd15 --rank 16
    """
    from rich.console import Console
    from rich.table import Table

    from harness.errors import UserError
    from models.sd.architecture import component_configs, sizes, trainable_counts

    console = Console(highlight=False)
    folder = None
    if base is not None and base != DEFAULT_BASE:
        from models.hub import resolve_source

        try:
            folder = resolve_source(base).folder
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    try:
        configs = component_configs(folder)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    label = str(folder) if folder else f"{DEFAULT_BASE} (shipped configs)"
    t = Table(title=f"Stable Diffusion networks: {label}")
    for c in ("network", "parameters", "bias parameters"):
        t.add_column(c, justify="left" if c == "network" else "right")
    for comp, s in sizes(configs).items():
        t.add_row(comp, f"{s['parameters']:,}", f"{s['biases']:,}")
    console.print(t)
    targets = _csv(lora_targets) or list(UNET_LORA_TARGETS)
    m = Table(title=f"Trainable parameters per method (U-Net; LoRA/DoRA r={rank} on {','.join(targets)})")
    for c in ("method", "components", "trainable", "% of the U-Net"):
        m.add_column(c, justify="left" if c in ("method", "components") else "right")
    unet_total = None  # from the "full" row below
    rows = [("full", ["unet"]), ("lora", ["unet"]), ("lora", ["unet", "text_encoder"]), ("dora", ["unet"]),
            ("bitfit", ["unet"]), ("difffit", ["unet"])]
    for method, comps in rows:
        try:
            counts = trainable_counts(method, comps, configs, rank=rank, alpha=alpha, unet_targets=targets)
        except ValueError as e:
            raise UserError(str(e)) from None
        trainable = sum(c["trainable"] for c in counts.values())
        unet_total = unet_total or (counts["unet"]["total"] if method == "full" else None)
        pct = f"{100 * trainable / unet_total:.3f}" if unet_total else ""
        m.add_row(method, ",".join(comps), f"{trainable:,}", pct)
    console.print(m)


@click.command(name="sd")
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_dir", type=existing_dir, default=None,
              help="Learn the tokenizer from this dev set's captions (default: the shipped list of dev captions).")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default="epsilon",
              help="epsilon (SD 1.x) or v_prediction (SD 2.x-style).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of the random initialisation.")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it exists.")
def make_tiny_sd(out_dir: Path, data_dir, prediction_type, seed, overwrite):
    """Write a tiny, randomly initialised Stable Diffusion pipeline to DIR in diffusers' layout (diffusers' test-size
    U-Net and VAE, the offline CLIP tokenizer of `make-tiny clip-text`), loadable with
    StableDiffusionPipeline.from_pretrained(DIR) and usable as `--base DIR` everywhere (the images mean nothing).

    \b
    Example:
      harness models make-tiny sd tiny-sd
      harness train sd --split split.json --data DATA_DIR --base tiny-sd --resolution 32 --max-steps 20
    """
    from harness.cli.common import check_output_dir
    from harness.errors import UserError
    from harness.progress import console
    from harness.io import atomic_dir
    from harness.prompts import dev_captions
    from models.sd.tiny import save_tiny_sd

    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise UserError("exists and is not empty (use --overwrite to replace it)", out_dir)
    check_output_dir(out_dir.parent, name=out_dir)
    captions, label = dev_captions(data_dir)
    with atomic_dir(out_dir) as tmp:  # DIR is either the whole pipeline or untouched
        save_tiny_sd(tmp, sorted(set(captions)), seed=seed, prediction_type=prediction_type)
    console.print(f"[green]{out_dir}[/]: tiny Stable Diffusion pipeline ({prediction_type}, seed {seed}, tokenizer "
                  f"from {label}); pass it as --base {out_dir}", highlight=False)
