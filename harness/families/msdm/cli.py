"""`harness train msdm-vae`, `harness train msdm-unet`, `harness sweep msdm-unet`, `harness models info msdm`."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import FiniteFloatRange, existing_file, pop_loop_overrides, sweep_command, training_options
from harness.errors import UserError
from harness.families.msdm.sources import preset_help


def register(cli: click.Group, train: click.Group, sweep: click.Group, models: click.Group) -> None:
    train.add_command(msdm_vae)
    train.add_command(msdm_unet)
    sweep.add_command(sweep_command(msdm_unet, "harness.families.msdm.sweep:UNET",
                                    lambda kw: unet_config_from_options(**kw)))
    models.commands["info"].add_command(msdm_info)


# What --print-config adds to a config (resolved_config), dropped when a printed file is read back with --config.
PRINTED_KEYS = ("model", "data_counts", "paper_sources", "loop.derived", "sweep")


def _base_overrides(config_file, loop: dict, paraphrases_path, paraphrase_strategy, family: str) -> dict:
    """Config file (if any), then the CLI options that were given, as a nested override dict."""
    from harness.config import read_config_file

    over: dict = read_config_file(config_file, PRINTED_KEYS) if config_file else {}
    printed_family = over.pop("family", family)  # --print-config names the command it printed for
    if printed_family != family:
        raise UserError(f"config is for {printed_family}, not {family}", config_file)
    if loop:
        over["loop"] = {**over.get("loop", {}), **loop}
    if paraphrase_strategy is not None:
        over.setdefault("data", {})["paraphrase_strategy"] = paraphrase_strategy
    if paraphrases_path is not None:
        over["paraphrases_path"] = str(paraphrases_path)
    return over


def _set(over: dict, path: str, value) -> None:
    if value is None:
        return
    *parents, leaf = path.split(".")
    d = over
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _done(run, what: str) -> None:
    from rich.console import Console

    from harness.distributed import state

    if not state().is_main_process:  # under `accelerate launch` rank 0 reports
        return
    stats_path = run.dir / "train_stats.json"
    extra = ""
    if stats_path.is_file():
        import json

        s = json.loads(stats_path.read_text())
        extra = f" - {s['steps']} steps, loss {s['final_loss']:.4f}" + (
            f", val {s['val_loss']:.4f}" if s.get("val_loss") is not None else "") + f", {s['seconds']:.0f}s"
    Console().print(f"[green]{what}[/] {run.dir}{extra}")


def _finish(cfg, print_config: bool, run_id) -> None:
    from harness.cli.common import print_config as show
    from harness.families.msdm.train import resolved_config, train

    if print_config:
        return show(resolved_config(cfg))
    _done(train(cfg, run_id=run_id), "trained")


def _resume(resume_run, loop: dict, print_config: bool) -> None:
    from harness.families.msdm.train import resume

    if print_config:
        raise UserError("--print-config prints a new run's config; a run's own is RUN/config.json")
    _done(resume(resume_run, loop), "resumed")


_PRESETS = click.Choice(["paper", "tiny"])
_JITTER_HELP = ("Brightness/contrast jitter: factors drawn from [1 - j, 1 + j], applied to the resized image before "
                "padding. The MSDM paper's text trains the UNet with 0.4; the released VAE used no augmentation.")


@click.command("msdm-vae")
@training_options
@click.option("--preset", type=_PRESETS, default=None, help=preset_help("vae") + " (default paper)")
@click.option("--resolution", type=click.IntRange(min=8), default=None,
              help="Image size; a multiple of 32 (VAE x UNet downsampling) (default: the preset's, 256 / 64).")
@click.option("--jitter", type=FiniteFloatRange(0, 1, max_open=True), default=None,
              help=_JITTER_HELP + " Default 0 for the VAE (as released).")
@click.option("--perceptual-weight", type=FiniteFloatRange(min=0), default=None,
              help="LPIPS-style term weight (default 1, paper; 0 = off).")
@click.option("--perceptual-weights", type=existing_file, default=None,
              help="torchvision VGG16 ImageNet weights file (default: $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth;"
                   " if absent the term is skipped and the run says so).")
@click.option("--ssim-weight", type=FiniteFloatRange(min=0), default=None, help="(1 - SSIM) weight (default 1, paper).")
@click.option("--kl-weight", type=FiniteFloatRange(min=0), default=None,
              help="KL weight, against per-sample summed reconstruction terms as in Medfusion (default 1e-6, paper).")
def msdm_vae(split_path, data_dir, config_file, run_id, resume_run, paraphrases_path, paraphrase_strategy, preset,
             resolution, jitter, perceptual_weight, perceptual_weights, ssim_weight, kl_weight, print_config, **kw):
    """Train the MSDM autoencoder (RGB -> 8 x H/8 x W/8 latents) into a new run.

    Loss (Medfusion convention, per-sample sums averaged over the batch): MSE + perceptual + (1 - SSIM) + 1e-6 KL,
    each term logged in train_log.jsonl. Writes RUN/final/vae (diffusers save_pretrained), checkpoints,
    train_log.jsonl and reconstruction grids (RUN/samples, with --sample-every).

    \b
    Examples:
      harness train msdm-vae --split split.json --data DATA --preset paper --print-config
      harness train msdm-vae --split split.json --data DATA --preset tiny --max-steps 300 --batch-size 16
      harness train msdm-vae --split split.json --data DATA --epochs 100 --mixed-precision bf16
      harness train msdm-vae --split split.json --data DATA --resume runs/msdm-vae-paper-20261122-1532
    """
    from harness.families.msdm.config import vae_config

    loop = pop_loop_overrides(kw)
    if resume_run:
        return _resume(resume_run, loop, print_config)
    if paraphrases_path or paraphrase_strategy:
        raise UserError("the VAE is trained on images only: --paraphrases/--paraphrase-strategy apply to msdm-unet")
    over = _base_overrides(config_file, loop, None, None, "msdm-vae")
    for path, v in (("data.resolution", resolution), ("data.jitter", jitter), ("loss.perceptual_weight", perceptual_weight),
                    ("loss.perceptual_weights", str(perceptual_weights) if perceptual_weights else None),
                    ("loss.ssim_weight", ssim_weight), ("loss.kl_weight", kl_weight)):
        _set(over, path, v)
    preset = preset or over.pop("preset", "paper")
    over.pop("data_dir", None), over.pop("split_path", None)
    _finish(vae_config(preset, data_dir, split_path, over), print_config, run_id)


@click.command("msdm-unet")
@training_options
@click.option("--vae", "vae_run", type=click.Path(path_type=Path, resolve_path=True), default=None,
              help="The msdm-vae run whose latents to train on (required unless --resume).")
@click.option("--preset", type=_PRESETS, default=None, help=preset_help("unet") + " (default: the VAE's)")
@click.option("--text-encoder", type=str, default=None,
              help="CLIP text encoder: hub id (default openai/clip-vit-large-patch14) or a local dir holding "
                   "tokenizer/ + text_encoder/ (e.g. from models.tiny_clip) or a flat CLIP checkpoint.")
@click.option("--max-length", type=click.IntRange(min=2), default=None, help="Text tokens (default 77).")
@click.option("--jitter", type=FiniteFloatRange(0, 1, max_open=True), default=None,
              help=_JITTER_HELP + " Default 0.4 for the UNet (paper).")
@click.option("--hflip-uncond/--no-hflip-uncond", default=None,
              help="Released augmentation: flip (p = 0.5) only items whose caption was dropped (an empty prompt "
                   "names no left/right) (default off).")
@click.option("--captions", type=click.Choice(["sample", "all"]), default=None,
              help="all: one item per caption row (an epoch = one pass over the caption rows, as the paper); "
                   "sample: one item per image, caption drawn (default: the preset's; paper: all).")
@click.option("--caption-dropout", type=FiniteFloatRange(0, 1), default=None,
              help="Per-sample probability of training on the empty prompt (CFG's unconditional input; default 0.2).")
@click.option("--self-cond-prob", type=FiniteFloatRange(0, 1), default=None,
              help="Probability per batch of self-conditioning on the model's own x0 estimate (default 0.5; 0 = off).")
@click.option("--ema-decay", type=FiniteFloatRange(0, 1, max_open=True), default=None,
              help="EMA decay of the UNet weights (default 0.9999; 0 = off).")
@click.option("--dropout", type=FiniteFloatRange(0, 1, max_open=True), default=None,
              help="UNet dropout (default 0.1, paper).")
@click.option("--dropout-layout", type=click.Choice(["released", "ddpm"]), default=None,
              help="released: channel-wise Dropout2d in both res sub-blocks + dropout on the attention output (the "
                   "released code); ddpm: element-wise before the second conv only (default released).")
@click.option("--cache-latents", is_flag=True, default=None,
              help="Encode the training images once and draw z from the cached posteriors (needs --jitter 0).")
@click.option("--loss", "loss_kind", type=click.Choice(["l1", "l2"]), default=None, help="Noise loss (default l1).")
@click.option("--min-snr-gamma", type=FiniteFloatRange(min=0), default=None,
              help="Min-SNR weighting gamma (default 0 = off).")
@click.option("--schedule", type=click.Choice(["scaled_linear", "linear", "cosine"]), default=None,
              help="Beta schedule (default scaled_linear 0.002 -> 0.02, T = 1000).")
@click.option("--guidance", type=FiniteFloatRange(min=0), default=None,
              help="Default CFG scale w for generation, in the form uncond + w (cond - uncond) (default 4.5 = the "
                   "released MSDM's 3.5 in its (g+1) cond - g uncond form).")
@click.option("--steps", "sample_steps_gen", type=click.IntRange(min=1), default=None,
              help="Default sampling steps (default 150).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default=None, help="Default sampler (default ddpm).")
def msdm_unet(run_id, resume_run, print_config, **options):
    """Train the MSDM text-conditioned UNet on the latents of an msdm-vae run.

    Epsilon prediction, L1, context dropout to "" per sample, self-conditioning, EMA. Writes RUN/final/{unet,vae}
    + msdm.json (what `harness generate RUN` loads), checkpoints, train_log.jsonl, sample grids of fixed prompts.

    \b
    Examples:
      harness train msdm-unet --split split.json --data DATA --vae runs/msdm-vae-paper-... --print-config
      harness train msdm-unet --split split.json --data DATA --vae runs/msdm-vae-paper-... --select-best val_loss
      harness train msdm-unet --split split.json --data DATA --vae runs/msdm-vae-tiny-... \\
          --text-encoder ./tiny-clip --jitter 0 --cache-latents --max-steps 600 --batch-size 16
      harness train msdm-unet --split split.json --data DATA --vae RUN --paraphrases para.jsonl --paraphrase-strategy add
      harness train msdm-unet --split split.json --data DATA --resume runs/msdm-unet-paper-...
    """
    if resume_run:
        return _resume(resume_run, pop_loop_overrides(options), print_config)
    _finish(unet_config_from_options(**options), print_config, run_id)


def unet_config_from_options(split_path, data_dir, config_file, paraphrases_path, paraphrase_strategy, vae_run,
                             preset, text_encoder, max_length, jitter, hflip_uncond, captions, caption_dropout,
                             self_cond_prob, ema_decay, dropout, dropout_layout, cache_latents, loss_kind,
                             min_snr_gamma, schedule, guidance, sample_steps_gen, sampler, **kw):
    """The UNetConfig `harness train msdm-unet` trains for these options (also what `harness sweep msdm-unet`
    sweeps from)."""
    from harness.families.msdm.config import unet_config

    loop = pop_loop_overrides(kw)
    over = _base_overrides(config_file, loop, paraphrases_path, paraphrase_strategy, "msdm-unet")
    vae_run = vae_run or over.pop("vae_run", None)
    if not vae_run:
        raise UserError("--vae RUN is required (the msdm-vae run to train on)")
    for path, v in (("text_encoder", text_encoder), ("max_length", max_length), ("data.jitter", jitter),
                    ("data.hflip_uncond", hflip_uncond), ("data.captions", captions),
                    ("data.caption_dropout", caption_dropout), ("self_cond_prob", self_cond_prob),
                    ("ema_decay", ema_decay), ("dropout", dropout), ("dropout_layout", dropout_layout),
                    ("cache_latents", cache_latents), ("loss", loss_kind),
                    ("min_snr_gamma", min_snr_gamma), ("diffusion.schedule", schedule), ("sampling.guidance", guidance),
                    ("sampling.steps", sample_steps_gen), ("sampling.sampler", sampler)):
        _set(over, path, v)
    preset = preset or over.pop("preset", None)
    over.pop("data_dir", None), over.pop("split_path", None), over.pop("vae_run", None)
    return unet_config(preset, data_dir, split_path, vae_run, over)


@click.command("msdm")
@click.option("--preset", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True)
def msdm_info(preset):
    """Parameter table of an MSDM preset, built on the meta device (no weights allocated or downloaded).

    The text encoder row is CLIP ViT-L/14's text tower, what the default --text-encoder loads.

    \b
    Example:
      harness models info msdm --preset paper
    """
    from rich.console import Console
    from rich.table import Table

    from models.msdm.presets import COUNT_NOTES, PAPER_COUNTS, get_preset, parameter_table

    p = get_preset(preset)
    table = Table(title=f"MSDM preset '{preset}': {p.description}")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("", justify="right")
    paper = preset == "paper"
    if paper:
        table.add_column("paper", justify="right")
        table.add_column("diff", justify="right")
    table.add_column("notes")
    rows = parameter_table(preset)
    for name, n, note in rows:
        cells = [name, f"{n:,}", f"{n / 1e6:.1f} M"]
        if paper:
            ref = PAPER_COUNTS[name]
            cells += [f"{ref / 1e6:.1f} M", f"{100 * (n - ref) / ref:+.1f} %"]
            note = f"{note}; {COUNT_NOTES[name]}"
        table.add_row(*cells, note)
    total = sum(n for _, n, _ in rows)
    table.add_row("total", f"{total:,}", f"{total / 1e6:.1f} M", *(["", ""] if paper else []), "")
    Console(width=160).print(table)
