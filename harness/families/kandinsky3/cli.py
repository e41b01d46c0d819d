"""`harness train kandinsky3`, `harness models info kandinsky3`, `harness models make-tiny kandinsky3`."""

from __future__ import annotations

import json
from typing import Any

import click

from harness.cli.common import FiniteFloatRange, training_options

TARGET_HELP = ("paper: to_q,to_k,to_v,to_out.0 of every U-Net Attention (self/cross-attention of each level and the "
               "text attention pooling of the time condition) - the attention projections diffusers' LoRA "
               "trainers target.")


def register(cli: click.Group, train: click.Group, sweep: click.Group, models: click.Group) -> None:
    from harness.cli.common import sweep_command

    train.add_command(train_kandinsky3)
    # The sweep's own --dry-run (every cell's plan) replaces the train command's.
    base = click.Command(train_kandinsky3.name, callback=train_kandinsky3.callback,
                         params=[p for p in train_kandinsky3.params if p.name != "dry_run"],
                         context_settings=train_kandinsky3.context_settings)
    sweep.add_command(sweep_command(base, "harness.families.kandinsky3.sweep:K3", build_config,
                                    plan="harness.families.kandinsky3.sweep:plan_table"))
    models.commands["info"].add_command(models_kandinsky3)
    models.commands["make-tiny"].add_command(make_tiny_kandinsky3)


def lora_options(f):
    opts = [
        click.option("--base", type=str, default=None,
                     help="Kandinsky 3.0 pipeline: hub id or local folder (default kandinsky-community/kandinsky-3)."),
        click.option("--revision", type=str, default=None, help="Hub revision of --base (recorded)."),
        click.option("--rank", type=click.IntRange(min=1), default=None,
                     help="LoRA rank r (default 4, diffusers' LoRA trainers' default)."),
        click.option("--alpha", type=FiniteFloatRange(min=0, min_open=True), default=None,
                     help="LoRA alpha (default = rank: scale 1, as the Kandinsky 2.2 family)."),
        click.option("--lora-targets", type=click.Choice(["paper"]), default=None, help=TARGET_HELP),
        click.option("--dora", is_flag=True, default=None, help="Weight-decomposed LoRA (peft use_dora)."),
        click.option("--rslora", is_flag=True, default=None, help="Rank-stabilised scaling alpha/sqrt(r)."),
        click.option("--init-lora-weights", type=click.Choice(["true", "gaussian"]), default=None,
                     help="peft init_lora_weights (default true: B = 0, the adapter starts as the identity)."),
        click.option("--gradient-checkpointing", is_flag=True, default=None,
                     help="Recompute each U-Net level's activations in backward (less memory, slower)."),
        click.option("--snr-gamma", type=FiniteFloatRange(min=0, min_open=True), default=None,
                     help="Min-SNR weighting gamma (e.g. 5, the Min-SNR paper's); off by default."),
        click.option("--caption-dropout", type=FiniteFloatRange(0, 1), default=None,
                     help="Probability of training on the empty prompt \"\" (default 0.1: the unconditional branch "
                          "classifier-free guidance needs, the rate this project's Kandinsky 2.2 prior uses; diffusers' "
                          "trainers default to 0 via --proportion_empty_prompts, which leaves that branch as the "
                          "base model had it)."),
        click.option("--resolution", type=click.IntRange(8, 4096), default=None,
                     help="Training image side (default 256: the dev set's padded images)."),
        click.option("--cache/--no-cache", default=None,
                     help="Read MoVQ latents from the cache (default) or encode every step (needed with "
                          "augmentation). T5 texts always come from the cache: the encoder is never resident."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Encoder cache folder (default $HARNESS_CACHE_DIR/kandinsky-encoders or "
                          "<runs>/.cache/kandinsky-encoders)."),
        click.option("--base-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="dtype of the frozen weights (default fp32; bf16/fp16 need the same --mixed-precision)."),
        click.option("--warmup-steps", type=click.IntRange(min=0), default=None, help="Linear LR warm-up steps."),
        click.option("--dry-run", is_flag=True, default=False,
                     help="Print LoRA parameters and estimated memory on the real architecture (meta device) and "
                          "exit: no data or weights are read."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


# What --print-config adds to a config (resolved_config, a sweep's plan), dropped when --config reads it back.
PRINTED_KEYS = ("estimate", "sweep")


def build_config(kwargs: dict[str, Any]):
    from harness.cli.common import pop_loop_overrides
    from harness.config import read_config_file, to_dict
    from harness.families.kandinsky3.train import Kandinsky3Config, config_from_dict

    loop = pop_loop_overrides(kwargs)
    d = to_dict(Kandinsky3Config())
    config_file = kwargs.pop("config_file", None)
    if config_file:
        file_cfg = read_config_file(config_file, PRINTED_KEYS)
        _merge(d, file_cfg)
    over: dict[str, Any] = {"loop": dict(loop), "lora": {}, "data": {}}
    if kwargs.get("warmup_steps") is not None:
        over["loop"]["warmup_steps"] = kwargs["warmup_steps"]
    for opt, key in (("rank", "rank"), ("alpha", "alpha"), ("lora_targets", "targets"), ("dora", "dora"),
                     ("rslora", "rslora"), ("init_lora_weights", "init_lora_weights")):
        if kwargs.get(opt) is not None:
            over["lora"][key] = kwargs[opt]
    for opt in ("resolution", "caption_dropout", "paraphrase_strategy"):
        if kwargs.get(opt) is not None:
            over["data"][opt] = kwargs[opt]
    if loop.get("seed") is not None:
        over["data"]["seed"] = loop["seed"]
    for opt in ("base", "revision", "snr_gamma", "cache", "base_dtype", "gradient_checkpointing"):
        if kwargs.get(opt) is not None:
            over[opt] = kwargs[opt]
    for opt in ("data_dir", "split_path", "paraphrases_path", "cache_dir"):
        if kwargs.get(opt) is not None:
            over[opt] = str(kwargs[opt])
    _merge(d, over)
    return config_from_dict(d, where=str(config_file) if config_file else "options")


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


@click.command(name="kandinsky3")
@training_options
@lora_options
def train_kandinsky3(**kwargs):
    """Train a LoRA adapter on the Kandinsky 3.0 U-Net (only the LoRA weights train).

    Epsilon MSE on MoVQ latents of the padded training images, conditioned on FLAN-UL2 (T5) embeddings that are
    encoded once into the encoder cache (the 8.6 B encoder is then freed: training holds the U-Net alone).
    The adapter is written to RUN/final/ (peft state dict + adapter_config.json; loading recipe in
    models/kandinsky3/lora.py).

    \b
    Examples:
      harness train kandinsky3 --split split.json --data DATA_DIR --rank 8 --dry-run
      harness train kandinsky3 --split split.json --data DATA_DIR --rank 8 --max-steps 5000 \\
          --batch-size 8 --mixed-precision bf16 --base-dtype bf16 --gradient-checkpointing
    """
    from harness.cli.common import print_config
    from harness.progress import console
    from harness.runs import open_run
    from harness.families.kandinsky3.train import resolved_config, resume, train

    resume_run = kwargs.pop("resume_run", None)
    run_id = kwargs.pop("run_id", None)
    dry_run = kwargs.pop("dry_run", False)
    if kwargs.pop("print_config", False) or dry_run:
        print_config(resolved_config(build_config(kwargs)))
        return
    if resume_run:
        run = resume(open_run(resume_run), max_steps=kwargs.get("max_steps"))
    else:
        run = train(build_config(kwargs), run_id=run_id)
    from harness.distributed import state

    if not state().is_main_process:
        return
    stats = json.loads((run.dir / "train_stats.json").read_text(encoding="utf-8"))
    console.print(f"[green]trained[/] {run.dir}: {stats['steps']} steps, loss {stats['final_loss']:.4f}; "
                  f"adapter in {run.dir / 'final'}")


@click.command(name="kandinsky3")
@click.option("--ranks", default="4,8,16,32,64,128", show_default=True, help="Comma-separated LoRA ranks to count.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="Batch size of the memory estimate.")
@click.option("--gradient-checkpointing", is_flag=True, default=False, help="Estimate with checkpointing.")
def models_kandinsky3(ranks: str, batch_size: int, gradient_checkpointing: bool):
    """LoRA parameters per rank and training memory (bf16, cached vs encoder resident) of the real Kandinsky 3.0
    U-Net (models/kandinsky3/configs/unet_config.json), counted on the meta device."""
    from rich.table import Table

    from harness.errors import UserError
    from harness.progress import console
    from models.kandinsky.lora import LoraSpec
    from models.kandinsky3.memory import estimate

    try:
        rs = [int(r) for r in ranks.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ranks must be comma-separated integers, got {ranks!r}") from None
    t = Table(title=f"Kandinsky 3.0 LoRA (to_q,to_k,to_v,to_out.0), batch {batch_size}, bf16, 256 px")
    for c in ("rank", "LoRA params", "U-Net params", "T5 encoder params", "GiB cached", "GiB encoder resident"):
        t.add_column(c, justify="right")
    for r in rs:
        e = estimate(LoraSpec(rank=r), batch_size, 256, "bf16", "bf16", gradient_checkpointing)
        t.add_row(str(r), f"{e['lora_parameters']:,}", f"{e['unet_parameters'] / 1e9:.3f} B",
                  f"{e['text_encoder_parameters'] / 1e9:.3f} B", f"{e['cached_gib']:.2f}", f"{e['encoder_resident_gib']:.2f}")
    console.print(t)


@click.command(name="kandinsky3")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the random weights.")
def make_tiny_kandinsky3(out_dir, seed):
    """Write a tiny Kandinsky 3.0 pipeline (diffusers' fast-test sizes, offline T5 tokenizer) for smoke tests."""
    from harness.progress import console
    from models.kandinsky3.testing import save_tiny_pipeline

    save_tiny_pipeline(out_dir, seed=seed)
    console.print(f"[green]wrote[/] tiny Kandinsky 3.0 pipeline to {out_dir}")
