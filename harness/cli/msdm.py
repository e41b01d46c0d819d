"""`harness train msdm-vae`, `harness train msdm-unet`, `harness models info msdm`."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.common import existing_file, pop_loop_overrides, training_options
from harness.errors import UserError


def register(cli: click.Group, train: click.Group, sweep: click.Group, models: click.Group) -> None:
    train.add_command(msdm_vae)
    train.add_command(msdm_unet)
    models.commands["info"].add_command(msdm_info)


def _base_overrides(config_file, loop_kw: dict, paraphrases_path, paraphrase_strategy) -> dict:
    """Config file (if any), then the CLI options that were given, as a nested override dict."""
    from harness.io import read_json

    over: dict = read_json(config_file) if config_file else {}
    if not isinstance(over, dict):
        raise UserError("config file must hold a JSON object", config_file)
    loop = {k: v for k, v in loop_kw.items() if v is not None}
    if loop:
        over.setdefault("loop", {}).update(loop)
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


@click.command("msdm-vae")
@training_options
@click.option("--preset", type=click.Choice(["paper", "tiny"]), default=None, help="Model size (default paper).")
@click.option("--resolution", type=int, default=None, help="Image size (default: the preset's, 256 / 64).")
@click.option("--jitter", type=float, default=None, help="Brightness/contrast jitter (default 0.4, as published).")
@click.option("--perceptual-weight", type=float, default=None, help="LPIPS-style term weight (default 1; 0 = off).")
@click.option("--perceptual-weights", type=existing_file, default=None,
              help="torchvision VGG16 ImageNet weights file (default: $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth;"
                   " if absent the term is skipped and the run says so).")
@click.option("--ssim-weight", type=float, default=None, help="(1 - SSIM) weight (default 1).")
@click.option("--kl-weight", type=float, default=None, help="KL weight (default 1e-6).")
def msdm_vae(split_path, data_dir, config_file, run_id, resume_run, paraphrases_path, paraphrase_strategy, preset,
             resolution, jitter, perceptual_weight, perceptual_weights, ssim_weight, kl_weight, **kw):
    """Train the MSDM autoencoder (RGB -> 8 x H/8 x W/8 latents) into a new run.

    Loss: MSE + perceptual + (1 - SSIM) + 1e-6 KL. Writes RUN/final/vae (diffusers save_pretrained), checkpoints,
    train_log.jsonl and reconstruction grids (RUN/samples, with --sample-every).

    \b
    Examples:
      harness train msdm-vae --split split.json --data DATA --preset tiny --max-steps 300 --batch-size 16
      harness train msdm-vae --split split.json --data DATA --max-steps 100000 --mixed-precision bf16
      harness train msdm-vae --split split.json --data DATA --resume runs/msdm-vae-paper-20261122-1532
    """
    from harness.train_msdm import resume, train_vae, vae_config

    loop_kw = pop_loop_overrides(kw)
    if resume_run:
        run = resume(resume_run, max_steps=loop_kw.get("max_steps"))
        return _done(run, "resumed")
    if paraphrases_path or paraphrase_strategy:
        raise UserError("the VAE is trained on images only: --paraphrases/--paraphrase-strategy apply to msdm-unet")
    over = _base_overrides(config_file, loop_kw, None, None)
    for path, v in (("data.resolution", resolution), ("data.jitter", jitter), ("loss.perceptual_weight", perceptual_weight),
                    ("loss.perceptual_weights", str(perceptual_weights) if perceptual_weights else None),
                    ("loss.ssim_weight", ssim_weight), ("loss.kl_weight", kl_weight)):
        _set(over, path, v)
    preset = preset or over.pop("preset", "paper")
    over.pop("data_dir", None), over.pop("split_path", None)
    _done(train_vae(vae_config(preset, data_dir, split_path, over), run_id=run_id), "trained")


@click.command("msdm-unet")
@training_options
@click.option("--vae", "vae_run", type=click.Path(path_type=Path, resolve_path=True), default=None,
              help="The msdm-vae run whose latents to train on (required unless --resume).")
@click.option("--preset", type=click.Choice(["paper", "tiny"]), default=None, help="UNet size (default: the VAE's).")
@click.option("--text-encoder", type=str, default=None,
              help="CLIP text encoder: hub id (default openai/clip-vit-large-patch14) or a local dir holding "
                   "tokenizer/ + text_encoder/ (e.g. from models.tiny_clip) or a flat CLIP checkpoint.")
@click.option("--max-length", type=int, default=None, help="Text tokens (default 77).")
@click.option("--jitter", type=float, default=None, help="Brightness/contrast jitter (default 0.4, as published).")
@click.option("--caption-dropout", type=float, default=None,
              help="Per-sample probability of training on the empty prompt (CFG's unconditional input; default 0.2).")
@click.option("--self-cond-prob", type=float, default=None,
              help="Probability per batch of self-conditioning on the model's own x0 estimate (default 0.5; 0 = off).")
@click.option("--ema-decay", type=float, default=None, help="EMA decay of the UNet weights (default 0.9999; 0 = off).")
@click.option("--cache-latents", is_flag=True, default=None,
              help="Encode the training images once and draw z from the cached posteriors (needs --jitter 0).")
@click.option("--loss", "loss_kind", type=click.Choice(["l1", "l2"]), default=None, help="Noise loss (default l1).")
@click.option("--min-snr-gamma", type=float, default=None, help="Min-SNR weighting gamma (default 0 = off).")
@click.option("--schedule", type=click.Choice(["scaled_linear", "linear", "cosine"]), default=None,
              help="Beta schedule (default scaled_linear 0.002 -> 0.02, T = 1000).")
@click.option("--guidance", type=float, default=None,
              help="Default CFG scale w for generation, in the form uncond + w (cond - uncond) (default 4.5 = the "
                   "released MSDM's 3.5 in its (g+1) cond - g uncond form).")
@click.option("--steps", "sample_steps_gen", type=int, default=None, help="Default sampling steps (default 150).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default=None, help="Default sampler (default ddpm).")
def msdm_unet(split_path, data_dir, config_file, run_id, resume_run, paraphrases_path, paraphrase_strategy, vae_run,
              preset, text_encoder, max_length, jitter, caption_dropout, self_cond_prob, ema_decay, cache_latents,
              loss_kind, min_snr_gamma, schedule, guidance, sample_steps_gen, sampler, **kw):
    """Train the MSDM text-conditioned UNet on the latents of an msdm-vae run.

    Epsilon prediction, L1, context dropout to "" per sample, self-conditioning, EMA. Writes RUN/final/{unet,vae}
    + msdm.json (what `harness generate RUN` loads), checkpoints, train_log.jsonl, sample grids of fixed prompts.

    \b
    Examples:
      harness train msdm-unet --split split.json --data DATA --vae runs/msdm-vae-paper-... --max-steps 100000
      harness train msdm-unet --split split.json --data DATA --vae runs/msdm-vae-tiny-... \\
          --text-encoder ./tiny-clip --jitter 0 --cache-latents --max-steps 600 --batch-size 16
      harness train msdm-unet --split split.json --data DATA --vae RUN --paraphrases para.jsonl --paraphrase-strategy add
      harness train msdm-unet --split split.json --data DATA --resume runs/msdm-unet-paper-...
    """
    from harness.train_msdm import resume, train_unet, unet_config

    loop_kw = pop_loop_overrides(kw)
    if resume_run:
        run = resume(resume_run, max_steps=loop_kw.get("max_steps"))
        return _done(run, "resumed")
    over = _base_overrides(config_file, loop_kw, paraphrases_path, paraphrase_strategy)
    vae_run = vae_run or over.pop("vae_run", None)
    if not vae_run:
        raise UserError("--vae RUN is required (the msdm-vae run to train on)")
    for path, v in (("text_encoder", text_encoder), ("max_length", max_length), ("data.jitter", jitter),
                    ("data.caption_dropout", caption_dropout), ("self_cond_prob", self_cond_prob),
                    ("ema_decay", ema_decay), ("cache_latents", cache_latents), ("loss", loss_kind),
                    ("min_snr_gamma", min_snr_gamma), ("diffusion.schedule", schedule), ("sampling.guidance", guidance),
                    ("sampling.steps", sample_steps_gen), ("sampling.sampler", sampler)):
        _set(over, path, v)
    preset = preset or over.pop("preset", None)
    over.pop("data_dir", None), over.pop("split_path", None), over.pop("vae_run", None)
    _done(train_unet(unet_config(preset, data_dir, split_path, vae_run, over), run_id=run_id), "trained")


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

    from models.msdm.presets import get_preset, parameter_table

    p = get_preset(preset)
    table = Table(title=f"MSDM preset '{preset}': {p.description}")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("", justify="right")
    table.add_column("notes")
    rows = parameter_table(preset)
    for name, n, note in rows:
        table.add_row(name, f"{n:,}", f"{n / 1e6:.1f} M", note)
    total = sum(n for _, n, _ in rows)
    table.add_row("total", f"{total:,}", f"{total / 1e6:.1f} M", "")
    Console(width=140).print(table)
