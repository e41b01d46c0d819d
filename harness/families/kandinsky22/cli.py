"""`harness train kandinsky-prior|kandinsky-decoder`, `harness sweep kandinsky-prior|kandinsky-decoder`,
`harness models info kandinsky`."""

from __future__ import annotations

import json
from typing import Any

import click

from click.core import ParameterSource

from harness.cli.common import SEED, FiniteFloatRange, existing_dir, pop_loop_overrides, sweep_options, training_options

FAMILY = {"prior": "kandinsky-prior", "decoder": "kandinsky-decoder"}


def register(cli: click.Group, train: click.Group, sweep: click.Group, models: click.Group) -> None:
    train.add_command(_train_command("prior"))
    train.add_command(_train_command("decoder"))
    sweep.add_command(_sweep_command("prior"))
    sweep.add_command(_sweep_command("decoder"))
    models.commands["info"].add_command(models_kandinsky)
    models.commands["make-tiny"].add_command(make_tiny_kandinsky)


def lora_options(component: str):
    """LoRA, base-model and objective options of one component (unset = the typed config's default)."""
    other = "decoder" if component == "prior" else "prior"
    opts = [
        click.option("--rank", type=int, default=None,
                     help="LoRA rank r (default 4, diffusers' LoRA trainers' default; --preset paper: 32 for the "
                          "stage-1 decoder)."),
        click.option("--alpha", type=FiniteFloatRange(min=0, min_open=True), default=None,
                     help="LoRA alpha (default = rank, i.e. scale 1: the paper's parameter tables)."),
        click.option("--lora-targets", type=click.Choice(["paper", "paper+added-kv"]), default=None,
                     help="paper: to_q,to_k,to_v,to_out.0 (reproduces the paper's counts); paper+added-kv also "
                          "adds the decoder's add_k_proj,add_v_proj (the image-embedding path)."),
        click.option("--dora", is_flag=True, default=None, help="Weight-decomposed LoRA (peft use_dora)."),
        click.option("--rslora", is_flag=True, default=None,
                     help="Rank-stabilised scaling alpha/sqrt(r) (with the default alpha = r that is sqrt(r): "
                          "pass --alpha; a warning says so)."),
        click.option("--gradient-checkpointing", is_flag=True, default=None,
                     help=f"Recompute the {component}'s activations in backward: less memory, ~30 % slower "
                          "(diffusers' Kandinsky trainers have it; large batches need it below 80 GB)."),
        click.option("--init-lora-weights", type=click.Choice(["true", "gaussian"]), default=None,
                     help="peft init_lora_weights (default true: B = 0, adapter starts as identity). pissa/olora/"
                          "loftq are refused: they rewrite the base weights, so the saved adapter would not "
                          "reproduce the model on a plain diffusers load of the base."),
        click.option("--prior", "prior", type=str, default=None,
                     help="Prior pipeline: hub id or local folder (default kandinsky-community/kandinsky-2-2-prior)."),
        click.option("--decoder", "decoder", type=str, default=None,
                     help="Decoder pipeline: hub id or folder (default kandinsky-community/kandinsky-2-2-decoder)."),
        click.option("--revision", type=str, default=None, help=f"Hub revision of the {component} (recorded)."),
        click.option(f"--{other}-adapter", "pair_adapter", type=str, default=None,
                     help=f"{other.capitalize()} adapter used by `harness generate`: a {FAMILY[other]} run, an "
                          "adapter folder, or none (base model)."),
        click.option("--snr-gamma", type=FiniteFloatRange(min=0, min_open=True), default=None,
                     help="Min-SNR weighting gamma (e.g. 5); off by default."),
        click.option("--cache/--no-cache", default=None,
                     help="Read frozen-encoder outputs from the on-disk cache (default) or recompute every step."),
        click.option("--cache-dir", type=existing_dir, default=None, help="Encoder cache folder."),
        click.option("--resolution", type=int, default=None, help="Training image size (default 256)."),
        click.option("--fit", type=click.Choice(["pad", "crop"]), default=None, help="Square images by pad or crop."),
        click.option("--captions", type=click.Choice(["sample", "all"]), default=None,
                     help="One item per image (sample) or per caption row (all)."),
        click.option("--base-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="dtype of the frozen weights (LoRA stays fp32)."),
        click.option("--warmup-steps", type=click.IntRange(min=0), default=None, help="Linear LR warm-up steps."),
        click.option("--prior-steps", type=click.IntRange(min=1), default=None,
                     help="Prior sampling steps of `harness generate` / the sweep (default 25: "
                          "KandinskyV22PriorPipeline's and the paper's)."),
        click.option("--decoder-steps", type=click.IntRange(min=1), default=None,
                     help="Decoder sampling steps (default 100: KandinskyV22Pipeline's; the paper and --preset "
                          "paper use 150)."),
        click.option("--prior-guidance", type=FiniteFloatRange(min=0), default=None,
                     help="Prior guidance scale (default 4.0, the pipeline's)."),
        click.option("--decoder-guidance", type=FiniteFloatRange(min=0), default=None,
                     help="Decoder guidance scale (default 4.0, the pipeline's)."),
        click.option("--gen-dtype", "gen_dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="dtype of the sampling models for `harness generate` / the sweep (default fp32; bf16 or "
                          "fp16 on a GPU, as diffusers' Kandinsky examples load them)."),
    ]
    if component == "prior":
        opts.append(click.option("--caption-dropout", type=FiniteFloatRange(0, 1), default=None,
                                 help='Probability of training on "" instead of the caption (default 0.1).'))
    else:
        opts.append(click.option("--image-embed-dropout", type=FiniteFloatRange(0, 1), default=None,
                                 help="Probability of conditioning on the zero-image embedding, the negative that "
                                      "guidance uses (default 0.1, as the original Kandinsky 2 decoder trainer "
                                      "drops the CLIP image to zeros; validation loss is measured without it)."))

    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco


PRESET_HELP = ("paper: the seed paper's recipe - AdamW lr 1e-4, batch 64 (the released default config; its example "
               "config ran batch 256, fp16, Min-SNR gamma 5: add --batch-size 256 --mixed-precision fp16 "
               "--snr-gamma 5 for that), 256 px padded, one epoch = one pass over the caption rows (~18.2 k for "
               "1,800 training images), {epochs}, generation with 25 prior and 150 decoder steps (the paper's; "
               "diffusers' default is 100). Options given with it override its values.")


def preset_option(component: str, stage: str):
    epochs = {("prior", "train"): "100 epochs", ("decoder", "train"): "stage-1 decoder r=32 for 40 epochs",
              ("prior", "sweep"): "100 epochs per rank", ("decoder", "sweep"): "100 epochs per rank"}
    return click.option("--preset", type=click.Choice(["paper"]), default=None,
                        help=PRESET_HELP.format(epochs=epochs[(component, stage)]))


def eval_option(f):
    return click.option("--eval-every-epochs", type=FiniteFloatRange(min=0, min_open=True), default=None,
                        help="Every E epochs compute the validation loss (fixed noise seeds, dropout off), keep the "
                             "best adapter and export it to RUN/final/ with the epoch it came from (last weights "
                             "in RUN/last/); as the paper kept its best epoch. Default: the last weights.")(f)


# What --print-config adds to a config (resolved_config, a sweep's plan), dropped when --config reads it back.
PRINTED_KEYS = ("loop.derived", "note", "sweep")


def build_config(component: str, kwargs: dict[str, Any], stage: str = "train"):
    """defaults(component) or --preset <- --config file <- CLI options, then the typed config (unknown keys are
    errors)."""
    from harness.config import read_config_file, to_dict
    from harness.errors import UserError
    from harness.families.kandinsky22.train import base_config, config_from_dict

    loop = pop_loop_overrides(kwargs)
    d = to_dict(base_config(component, kwargs.pop("preset", None), stage))  # type: ignore[arg-type]
    config_file = kwargs.pop("config_file", None)
    if config_file:
        file_cfg = read_config_file(config_file, PRINTED_KEYS)
        if file_cfg.get("component", component) != component:
            raise UserError(f"config is for the {file_cfg['component']}, not the {component}", config_file)
        _merge(d, file_cfg)
    over: dict[str, Any] = {"loop": dict(loop), "lora": {}, "data": {}}  # None in loop = clear (epochs)
    if kwargs.get("warmup_steps") is not None:
        over["loop"]["warmup_steps"] = kwargs["warmup_steps"]
    for opt, key in (("rank", "rank"), ("alpha", "alpha"), ("lora_targets", "targets"), ("dora", "dora"),
                     ("rslora", "rslora"), ("init_lora_weights", "init_lora_weights")):
        if kwargs.get(opt) is not None:
            over["lora"][key] = kwargs[opt]
    for opt in ("resolution", "fit", "captions", "caption_dropout", "paraphrase_strategy"):
        if kwargs.get(opt) is not None:
            over["data"][opt] = kwargs[opt]
    if kwargs.get("seed") is not None:
        over["data"]["seed"] = kwargs["seed"]
    for opt in ("prior", "decoder", "snr_gamma", "cache", "image_embed_dropout", "base_dtype",
                "gradient_checkpointing", "eval_every_epochs"):
        if kwargs.get(opt) is not None:
            over[opt] = kwargs[opt]
    if kwargs.get("cache_dir") is not None:
        over["cache_dir"] = str(kwargs["cache_dir"])
    if kwargs.get("revision") is not None:
        over[f"{component}_revision"] = kwargs["revision"]
    if kwargs.get("pair_adapter") is not None:
        over["decoder_adapter" if component == "prior" else "prior_adapter"] = kwargs["pair_adapter"]
    for opt, key in (("data_dir", "data_dir"), ("split_path", "split_path"), ("paraphrases_path", "paraphrases_path")):
        if kwargs.get(opt) is not None:
            over[key] = str(kwargs[opt])
    if loop.get("seed") is not None:
        over["data"]["seed"] = loop["seed"]
    gen = {k: kwargs[k] for k in ("prior_steps", "decoder_steps", "prior_guidance", "decoder_guidance")
           if kwargs.get(k) is not None}
    if kwargs.get("gen_dtype") is not None:
        gen["dtype"] = kwargs["gen_dtype"]
    if gen:
        over["generation"] = gen
    _merge(d, over)
    d["component"] = component
    cfg = config_from_dict(d, where=str(config_file) if config_file else "options")
    from harness.progress import console

    for w in cfg.warnings():
        console.print(f"[yellow]warning:[/] {w}")
    return cfg


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _train_command(component: str) -> click.Command:
    example_extra = ("--caption-dropout 0.1 --decoder-adapter runs/kandinsky-decoder-r32-...") if component == "prior" \
        else "--prior-adapter runs/kandinsky-prior-r128-..."

    @click.command(name=FAMILY[component])
    @training_options
    @preset_option(component, "train")
    @eval_option
    @lora_options(component)
    def cmd(**kwargs):
        from harness.cli.common import print_config
        from harness.progress import console
        from harness.runs import open_run
        from harness.families.kandinsky22.train import resolved_config, resume, train

        resume_run = kwargs.pop("resume_run", None)
        run_id = kwargs.pop("run_id", None)
        if kwargs.pop("print_config", False):
            if resume_run:
                from harness.errors import UserError

                raise UserError("--print-config shows a new run's config; a run's own is in RUN/config.json")
            print_config(resolved_config(build_config(component, kwargs)))
            return
        if resume_run:
            run = resume(open_run(resume_run), max_steps=kwargs.get("max_steps"))
        else:
            cfg = build_config(component, kwargs)
            run = train(cfg, run_id=run_id)
        from harness.distributed import state

        if not state().is_main_process:  # under `accelerate launch` rank 0 reports
            return
        stats = json.loads((run.dir / "train_stats.json").read_text(encoding="utf-8"))
        console.print(f"[green]trained[/] {run.dir}: {stats['steps']} steps, loss {stats['final_loss']:.4f}"
                      + (f", val {stats['val_loss']:.4f}" if stats.get("val_loss") is not None else "")
                      + f"; adapter in {run.dir / 'final'}"
                      + (f" (best by {stats['exported']['metric']}: epoch {stats['exported']['epoch']:g}, "
                         f"step {stats['exported']['step']}; last weights in last/)" if stats.get("exported") else ""))

    cmd.help = f"""Train a LoRA adapter on the Kandinsky 2.2 {component} (only the LoRA weights train).

    {'unCLIP prior objective: x0 MSE on the normalised CLIP image embedding, squaredcos_cap_v2 noise.'
     if component == 'prior' else 'Decoder objective: epsilon MSE on MoVQ latents, conditioned on the image embedding.'}
    Frozen-encoder outputs are computed once into the encoder cache (--no-cache recomputes every step).
    The adapter is written in diffusers format to RUN/final/pytorch_lora_weights.safetensors.

    --preset paper is the seed paper's recipe ({'100 epochs' if component == 'prior' else 'stage 1: r = 32, 40 epochs'}
    at batch 64, lr 1e-4); --epochs counts passes over the caption rows, as the paper does; --eval-every-epochs
    keeps the best epoch's adapter in RUN/final/. --print-config shows the resolved config and the derived steps.

    \b
    Examples:
      harness train {FAMILY[component]} --split split.json --data DATA_DIR --preset paper --print-config
      harness train {FAMILY[component]} --split split.json --data DATA_DIR --preset paper --eval-every-epochs 5 \\
          --mixed-precision bf16 --gradient-checkpointing {example_extra}
      harness train {FAMILY[component]} --split split.json --data DATA_DIR --rank 32 --max-steps 5000 \\
          --batch-size 16 --mixed-precision bf16
      harness train {FAMILY[component]} --split split.json --data DATA_DIR --{component} /models/k22 --rank 4
      harness train {FAMILY[component]} --split split.json --data DATA_DIR --resume runs/{FAMILY[component]}-r32-...
    """
    return cmd


def _sweep_command(component: str) -> click.Command:
    other = "decoder" if component == "prior" else "prior"
    pair = "runs/kandinsky-decoder-r32-..." if component == "prior" else "runs/kandinsky-prior-r128-..."

    @click.command(name=FAMILY[component])
    @click.option("--ranks", type=str, default="4,8,16,24,32,40,48,56,64,128", show_default=True,
                  help="Comma-separated LoRA ranks.")
    @click.option("--dry-run", is_flag=True, help="Print the plan (trainable parameters on the real architecture, "
                                                  "optimizer memory) and exit; needs no data and no weights.")
    @sweep_options
    @training_options
    @preset_option(component, "sweep")
    @eval_option
    @lora_options(component)
    def cmd(ranks, grid, dry_run, sweep_dir, n_prompts, images_per_prompt, gen_seed, gen_batch_size, device, score,
            **kwargs):
        from rich.console import Console

        from harness.errors import UserError
        from harness.families.kandinsky22.sweep import plan_table
        from harness.cli.common import run_sweep_command
        from harness.cli.common import LAUNCH_KEYS
        from harness.sweep import parse_grid, parse_ranks

        launch = {k: kwargs.pop(k) for k in LAUNCH_KEYS}  # --launcher and its options (harness/launchers)
        console = Console(highlight=False)  # results go to stdout (progress bars and errors use stderr)

        # --ranks R1,R2 is --grid rank=R1,R2; its default applies unless --grid is given.
        grid_dict = parse_grid(grid)
        ranks_given = click.get_current_context().get_parameter_source("ranks") != ParameterSource.DEFAULT
        if "rank" in grid_dict and ranks_given:
            raise UserError("--ranks and --grid rank=... both set the rank: give one")
        if ranks_given or not grid_dict:
            grid_dict = {"rank": [str(r) for r in parse_ranks(ranks)], **grid_dict}
        rank_list = parse_ranks(",".join(grid_dict["rank"])) if "rank" in grid_dict else None
        sweep_grid = rank_list if list(grid_dict) == ["rank"] else grid_dict
        if dry_run:
            if click.get_current_context().get_parameter_source("config_format") != ParameterSource.DEFAULT:
                raise UserError("--format applies to --print-config (--dry-run prints the plan table)")
            if rank_list is None:
                raise UserError("--dry-run plans LoRA ranks: give --ranks or --grid rank=...")
            alpha = kwargs.get("alpha")
            console.print(plan_table(component, rank_list, alpha=alpha, targets=kwargs.get("lora_targets") or "paper",
                                     dora=bool(kwargs.get("dora")), rslora=bool(kwargs.get("rslora"))))
            return
        if kwargs.pop("print_config", False):
            from harness.cli.common import print_config
            from harness.sweep import sweep_protocol
            from harness.families.kandinsky22.train import resolved_config

            kwargs.pop("resume_run", None)
            kwargs.pop("run_id", None)
            cfg = build_config(component, kwargs, stage="sweep")
            resolved = resolved_config(cfg)
            from harness.families.kandinsky22.sweep import PRIOR, DECODER
            from harness.sweep import _set_path, resolve_grid

            axes = resolve_grid(PRIOR if component == "prior" else DECODER, cfg,
                                {"rank": [str(r) for r in sweep_grid]} if isinstance(sweep_grid, list) else grid_dict)
            for path in axes:
                _set_path(resolved, path, None)  # each sweep cell's
            resolved["sweep"] = dict(sweep_protocol(cfg, n_prompts, gen_seed, images_per_prompt), grid=axes)
            if isinstance(sweep_grid, list):
                resolved["sweep"]["ranks"] = sweep_grid
            print_config(resolved)
            return
        for opt, name in (("split_path", "--split"), ("data_dir", "--data")):
            if kwargs.get(opt) is None:
                raise UserError(f"{name} is required (except with --dry-run and --print-config)")
        if kwargs.pop("resume_run", None):
            raise UserError("--resume does not apply to a sweep: rerun the same sweep command to continue it")
        kwargs.pop("run_id", None)
        cfg = build_config(component, kwargs, stage="sweep")
        from harness.families.kandinsky22.sweep import DECODER, PRIOR

        run_sweep_command(PRIOR if component == "prior" else DECODER, cfg, sweep_grid, sweep_dir, n_prompts,
                          images_per_prompt, gen_seed, gen_batch_size, device, score, **launch)

    # --split/--data are not needed for --dry-run; the command checks them itself otherwise.
    for p in cmd.params:
        if p.name in ("split_path", "data_dir"):
            p.required = False
    cmd.help = f"""Sweep the {component} LoRA over ranks (or any --grid): per cell train -> generate -> score.

    Each rank is recorded in sweep.json (run, status, metrics or the error); a crash in one rank is recorded and the
    sweep goes on; rerunning the same command skips finished ranks and continues a killed training in its own run
    directory from its last checkpoint. Each rank generates --images-per-prompt images per validation caption
    (default: N_gen >= 2,000) and is scored against the validation images; the table gives each rank's FID,
    precision, recall and F1 with bootstrap 95 % intervals and marks the ranks statistically indistinguishable
    from the best (paired bootstrap of the FID difference); sweep.png plots them against rank.

    --grid KEY=V1,V2 sweeps any training option (repeat it for a cartesian product); --ranks R1,R2 is
    --grid rank=R1,R2 (the default ranks apply when neither is given; with --grid alone the rank is --rank's).

    \b
    Examples:
      harness sweep {FAMILY[component]} --ranks 4,8,16,32,64,128 --dry-run
      harness sweep {FAMILY[component]} --split split.json --data DATA_DIR --grid rank=8,32 --grid lr=1e-4,3e-4
      harness sweep {FAMILY[component]} --preset paper --print-config
      harness sweep {FAMILY[component]} --split split.json --data DATA_DIR --preset paper \\
          --{other}-adapter {pair} --eval-every-epochs 10 --mixed-precision bf16
    """
    return cmd


@click.command(name="kandinsky")
@click.option("--ranks", type=str, default="4,8,16,24,32,40,48,56,64,128", show_default=True)
@click.option("--lora-targets", type=click.Choice(["paper", "paper+added-kv"]), default="paper", show_default=True)
def models_kandinsky(ranks, lora_targets):
    """Kandinsky 2.2 prior and decoder: parameters and LoRA counts on the real architectures (meta device: no
    weights, no download, about a second).

    \b
    Example:
      harness models info kandinsky --ranks 4,32,128 --lora-targets paper+added-kv
    """
    from rich.console import Console
    from rich.table import Table

    from harness.families.kandinsky22.sweep import plan_table
    from harness.sweep import parse_ranks
    from models.kandinsky.counting import architecture_summary

    console = Console(highlight=False)
    t = Table(title="Kandinsky 2.2 architectures (from models/kandinsky/configs)")
    for c in ("component", "parameters", "LoRA target layers (count x (in+out))"):
        t.add_column(c, justify="right" if c == "parameters" else "left")
    for comp in ("prior", "decoder"):
        s = architecture_summary(comp)
        t.add_row(comp, f"{s['parameters']:,}", ", ".join(f"{k} {n}x{w}" for k, (n, w) in s["targets"].items()))
    console.print(t)
    for comp in ("prior", "decoder"):
        console.print(plan_table(comp, parse_ranks(ranks), targets=lora_targets))


@click.command(name="kandinsky22")
@click.argument("out_dir", type=existing_dir)
@click.option("--seed", type=SEED, default=0, help="Seed of the random initialisation.")
def make_tiny_kandinsky(out_dir, seed):
    """Write tiny, randomly initialised Kandinsky 2.2 prior and decoder pipelines (diffusers' layout, the ones the
    tests use: models/kandinsky/testing.py) to OUT_DIR/prior and OUT_DIR/decoder, a few MB, in seconds.

    Every Kandinsky command then runs offline on CPU (the images are noise; use it to smoke-test a setup). Use a
    --resolution that is a multiple of 16 (the tiny MoVQ downsamples by 4, the UNet by 2 more), e.g. 32.

    \b
    Example:
      harness models make-tiny kandinsky22 tiny-k22
      harness train kandinsky-prior --split split.json --data DATA_DIR --prior tiny-k22/prior \\
          --decoder tiny-k22/decoder --resolution 32 --max-steps 10
    """
    from harness.errors import UserError
    from harness.progress import console
    from models.kandinsky.testing import save_tiny_kandinsky

    try:
        prior_dir, decoder_dir = save_tiny_kandinsky(out_dir, seed=seed)
    except FileExistsError as e:
        raise UserError(f"{e}; choose an empty folder", out_dir) from None
    console.print(f"[green]wrote[/] {prior_dir} and {decoder_dir}; use --prior {prior_dir} --decoder {decoder_dir}")
