"""Click options shared by several commands, so every trainer spells them the same way."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import click

existing_file = click.Path(exists=False, dir_okay=False, path_type=Path)
existing_dir = click.Path(exists=False, file_okay=False, path_type=Path)
# Paths that end up in a run's config.json are made absolute, so `harness score RUN` and `--resume` find the data
# from any working directory. (Existence is checked by the stages, with their own one-line messages.)
stored_file = click.Path(exists=False, dir_okay=False, path_type=Path, resolve_path=True)
stored_dir = click.Path(exists=False, file_okay=False, path_type=Path, resolve_path=True)
# Seeds feed numpy's legacy RNG (random.seed / np.random.seed accept < 2**32) as well as torch: one range everywhere.
SEED = click.IntRange(0, 2**32 - 1)


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and +-inf (a range alone lets nan through: every comparison with nan
    is false). `--guidance nan` used to produce all-black images."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def training_options(f):
    """Options common to every `harness train ...` command. Unset options are None: the typed config's
    default applies, so the defaults live in one place (the dataclass), not in the CLI.

    The command receives `print_config` (bool) among its kwargs: when set, build the resolved config and call
    `print_config(resolved)` instead of training."""
    opts = [
        click.option("--split", "split_path", type=stored_file, required=True, help="SPLIT.json from `harness split`."),
        click.option("--data", "data_dir", type=stored_dir, required=True, help="Dev set dir: prompt-gt.csv + images/."),
        click.option("--seed", type=SEED, default=None, help="Seed for init, data order, noise (default 0)."),
        click.option("--max-steps", type=POSITIVE, default=None,
                     help="Optimizer steps to train (default: the command's config / --preset; not with --epochs)."),
        click.option("--epochs", type=POSITIVE, default=None,
                     help="Train this many epochs instead of --max-steps; the steps are derived from the data "
                          "(see --print-config) and both are recorded in the run."),
        click.option("--batch-size", type=POSITIVE, default=None,
                     help="Per-process batch size (default: the command's config / --preset)."),
        click.option("--grad-accum", type=POSITIVE, default=None, help="Gradient accumulation steps (default 1)."),
        click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=None,
                     help="AdamW learning rate (default: the command's config / --preset)."),
        click.option("--max-grad-norm", type=FiniteFloatRange(min=0), default=None,
                     help="Clip the trained parameters' grad norm (0 = off; default: the command's config / "
                          "--preset)."),
        click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default=None,
                     help="accelerate mixed precision (default no = fp32)."),
        click.option("--checkpoint-every", type=NON_NEGATIVE, default=None,
                     help="Save a checkpoint every N steps (0 = only the final one; default 500 or the preset's)."),
        click.option("--keep-last", type=POSITIVE, default=None, help="Keep the last K checkpoints (default 3)."),
        click.option("--val-every", type=NON_NEGATIVE, default=None,
                     help="Validation loss every N steps (fixed seed; 0 = only at the end; default 500 or the preset's)."),
        click.option("--sample-every", type=NON_NEGATIVE, default=None,
                     help="Sample grid PNG every N steps (0 = off)."),
        click.option("--log-every", type=POSITIVE, default=None,
                     help="Log the mean loss (and check it is finite) every N steps: the loop reads values from the "
                          "GPU only then (default 10)."),
        click.option("--num-workers", type=NON_NEGATIVE, default=None,
                     help="DataLoader worker processes per GPU process that decode images (0 = in the training "
                          "process). Default: the CPU cores this process may use (os.sched_getaffinity) divided by "
                          "the processes on this node, minus one, at most 8."),
        click.option("--select-best", type=click.Choice(["none", "val_loss", "fid"]), default=None,
                     help="Keep the weights that score best at each validation in RUN/best (as the seed paper "
                          "selected its model): val_loss, or fid where the family supports it and the Inception "
                          "weights are present (default none: RUN/final only)."),
        click.option("--channels-last/--no-channels-last", default=None,
                     help="CUDA: trained modules and image batches in channels_last memory format (default off: "
                          "faster for convolution-heavy models on tensor cores, measure before a long run)."),
        click.option("--tf32/--no-tf32", default=None,
                     help="CUDA: allow TF32 matmuls and cuDNN convolutions (default on, as diffusers' trainers "
                          "recommend for Ampere and newer)."),
        click.option("--report-to", type=str, default=None, metavar="none|tensorboard|wandb[,...]",
                     help="Trackers that view the run (harness/tracking.py): loss and its terms, lr, grad norm, "
                          "throughput, validation loss, sample grids, under RUN/tracking/ (a sweep also logs its "
                          "cell table under SWEEP_DIR/tracking/). A comma list for several. Default none: diffusers' "
                          "scripts default to tensorboard, but here the run folder (train_log.jsonl, samples/) is "
                          "the record and trackers are an optional extra (pip install -e \".[tracking]\"). "
                          "wandb honours WANDB_MODE=offline and logs offline when its host is unreachable."),
        click.option("--push-to-hub", "push_to_hub", type=str, default=None, metavar="USER/NAME",
                     help="When training ends, upload RUN/final with a model card to this hub model repo (as "
                          "`harness push RUN --repo USER/NAME`; default: no upload, as diffusers' scripts)."),
        click.option("--hub-private", is_flag=True, default=False,
                     help="--push-to-hub: create the repo private."),
        click.option("--print-config", is_flag=True, default=False,
                     help="Print the fully resolved config (model, loop, data, preset values, derived steps per "
                          "epoch) and exit, without loading weights or images; --config reads it back."),
        config_format_option,
        click.option("--config", "config_file", type=existing_file, default=None,
                     help=CONFIG_FILE_HELP),
        click.option("--run-id", type=str, default=None, help="Name of the new run (default: readable + timestamp)."),
        click.option("--resume", "resume_run", type=existing_dir, default=None,
                     help="Continue RUN exactly from its last checkpoint."),
        click.option("--paraphrases", "paraphrases_path", type=stored_file, default=None,
                     help="Paraphrase JSONL from `harness paraphrase`."),
        click.option("--paraphrase-strategy", type=str, default=None,
                     help="add | replace:P | replace-all (needs --paraphrases)."),
    ]
    f = _push_after_training(f)
    for opt in reversed(opts):
        f = opt(f)
    return _takes_config_format(f)


CONFIG_FILE_HELP = ("Config file in JSON, TOML or YAML (by extension: .json, .toml, .yaml/.yml), e.g. one written by "
                    "--print-config; unknown keys are an error; CLI options override it.")
config_format_option = click.option(
    "--format", "config_format", type=click.Choice(["json", "toml", "yaml"]), default="json",
    help="Format of --print-config (json as before; TOML, having no null, lists the null keys under `null`).")


def _takes_config_format(f):
    """The command function without the `config_format` keyword: `--format` is checked (it applies to
    --print-config and --dry-run, which print the config) and left in the click context for `print_config`."""
    import functools

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        take_config_format(kwargs)
        return f(*args, **kwargs)

    return wrapper


def take_config_format(kwargs: dict, printing: tuple[str, ...] = ("print_config", "dry_run")) -> None:
    """Pop `config_format` from a command's kwargs into the click context (read by `print_config`); refuse it
    unless one of the `printing` options (those that print the config) is set, rather than ignore it."""
    from harness.errors import UserError

    from click.core import ParameterSource

    ctx = click.get_current_context()
    fmt = kwargs.pop("config_format", "json")
    given = ctx.get_parameter_source("config_format") not in (None, ParameterSource.DEFAULT)
    if given and not any(kwargs.get(k) for k in printing):
        raise UserError("--format applies to --print-config (the printed config's format)")
    ctx.meta["harness.config_format"] = fmt


PUSH_KEYS = ("push_to_hub", "hub_private")


def _push_after_training(f):
    """`--push-to-hub REPO`: run the train command, then push the run it finished (rank 0) with harness.push. The
    repo name and the hub's reachability are checked before training, so a typo or an offline node is one line
    up front, not after days of training."""
    import functools

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from harness.errors import UserError

        repo, private = kwargs.pop("push_to_hub", None), kwargs.pop("hub_private", False)
        if repo is None:
            if private:
                raise UserError("--hub-private applies to --push-to-hub")
            return f(*args, **kwargs)
        ctx = click.get_current_context(silent=True)
        if ctx is not None and ctx.parent is not None and ctx.parent.command.name == "sweep":
            raise UserError("--push-to-hub applies to harness train; push a sweep cell's run with "
                            "`harness push RUN --repo USER/NAME`")
        if kwargs.get("print_config"):
            return f(*args, **kwargs)
        from harness.distributed import state
        from harness.features import offline
        from harness.push import check_repo, hub_endpoint, hub_reachable, push
        from harness.trainer import FINISHED_RUNS

        check_repo(repo)
        if offline() or not hub_reachable():
            raise UserError(f"--push-to-hub: the hub ({hub_endpoint()}) is offline or unreachable; train without "
                            f"it and run `harness push RUN --repo {repo}` when it is reachable")
        before = len(FINISHED_RUNS)
        out = f(*args, **kwargs)
        if len(FINISHED_RUNS) > before and state().is_main_process:
            res = push(FINISHED_RUNS[-1], repo, private=private)
            click.echo(f"pushed {len(res.files)} files to {repo}: {res.url}")
        return out

    return wrapper


LOOP_KEYS = ("seed", "max_steps", "epochs", "batch_size", "grad_accum", "lr", "max_grad_norm", "mixed_precision",
             "checkpoint_every", "keep_last", "val_every", "sample_every", "log_every", "num_workers",
             "select_best", "channels_last", "tf32", "report_to")


def pop_loop_overrides(kwargs: dict) -> dict:
    """Take the training-loop options out of a command's kwargs; returns only what to set in the loop config (the
    options given), ready to merge over the defaults / preset / config file. `--epochs` and `--max-steps` together
    are refused; `--max-steps` also sets `epochs` to None, since an epoch count (from a preset or a config file)
    would otherwise take precedence over it. Do not drop None values from the result."""
    from harness.errors import UserError

    given = {k: kwargs.pop(k) for k in LOOP_KEYS if k in kwargs}
    loop = {k: v for k, v in given.items() if v is not None}
    if "epochs" in loop and "max_steps" in loop:
        raise UserError("give the training length once: --epochs N or --max-steps N, not both")
    if "max_steps" in loop:
        loop["epochs"] = None
    if "report_to" in loop:  # a missing tracker package is one line before any model or data is loaded
        from harness.tracking import check_available

        check_available(loop["report_to"])
    return loop


def print_config(resolved: dict) -> None:
    """`--print-config`: the resolved config on stdout (nothing else there), for any family, in the --format of the
    command (JSON by default, or TOML / YAML: harness.config.dump_config). Non-JSON values (paths) are written as
    strings."""
    from harness.config import dump_config

    ctx = click.get_current_context(silent=True)
    fmt = ctx.meta.get("harness.config_format", "json") if ctx is not None else "json"
    click.echo(dump_config(resolved, fmt).rstrip("\n"))


def check_output_file(path: str | Path, option: str = "") -> Path:
    """`check_output_dir` for a file to write: its folder must be writable, and it must not be a folder itself."""
    from harness.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option + ' ' if option else ''}is a folder; name a file to write", path)
    check_output_dir(path.parent, option, name=path)
    return path


def check_output_dir(path: str | Path, option: str = "", name: str | Path | None = None) -> Path:
    """Fail before any work when `path` (a folder to write into, created if needed) cannot be written: a file
    where a folder must be, a read-only or pseudo file system (/proc, /sys), no permission. Probes by creating
    and removing a temporary folder in the nearest existing ancestor (root ignores mode bits, so `os.access` would
    say yes), which leaves nothing behind."""
    import tempfile

    from harness.errors import UserError

    path = Path(path)
    what = f"{option} " if option else ""
    anc = path.absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{what}cannot be created: {anc} is a file, not a folder", name or path)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".harness-write-test-", dir=anc))
    except OSError as e:
        raise UserError(f"{what}is not writable: cannot create anything in {anc} ({e.strerror})",
                        name or path) from None
    return path


def grid_option(f):
    """`--grid KEY=V1,V2` of `harness sweep` commands (harness/sweep.py resolves the keys against the family's
    config and checks them before anything trains)."""
    return click.option(
        "--grid", "grid", multiple=True, metavar="KEY=V1,V2",
        help="Sweep a training option over values; repeat for a cartesian product (--grid rank=4,16 --grid "
             "lr=1e-4,3e-4). KEY is a config field (its name, e.g. lr, or dotted path, e.g. "
             "loop.lr) or an option name (lora_targets); an unknown key is refused with the allowed "
             "ones.")(f)


def sweep_options(f):
    """The options every `harness sweep KIND` command shares (besides the family's training options)."""
    opts = [
        grid_option,
        click.option("--sweep-dir", type=existing_dir, default=None,
                     help="Where sweep.json goes (default runs/sweeps/<family>-<config hash>); a rerun skips done "
                          "cells."),
        click.option("--n-prompts", type=click.IntRange(min=0), default=0,
                     help="Validation prompts to generate per cell (one caption per validation image; 0 = all)."),
        click.option("--images-per-prompt", type=click.IntRange(min=1), default=None,
                     help="Images generated per validation prompt (each with its own seed). Default: the smallest K "
                          "with n_prompts x K >= 2,000, the Kandinsky seed paper's protocol size (K = 10 for 200 "
                          "validation images)."),
        click.option("--gen-seed", type=SEED, default=0,
                     help="Base seed of the generated images (image i gets a seed derived from it and i)."),
        click.option("--gen-batch-size", type=POSITIVE, default=8, help="Generation batch size."),
        click.option("--device", type=str, default=None, help="Generation device (default cuda if available)."),
        click.option("--score/--no-score", default=True, help="Score each cell (harness score)."),
        *launcher_options(),
    ]
    if hasattr(f, "__click_params__"):  # a sweep pushes nothing (`harness push` takes a cell's run)
        f.__click_params__ = [p for p in f.__click_params__ if p.name not in PUSH_KEYS]
    for opt in reversed(opts):
        f = opt(f)
    return f


def launcher_options() -> list:
    """Where the cells run (harness/launchers): here one after another (default), in parallel local processes
    pinned to devices, or as a SLURM job array through submitit."""
    return [
        click.option("--launcher", type=click.Choice(["inline", "local", "slurm"]), default="inline",
                     help="inline: the cells one after another in this process (the sweep before launchers); local: "
                          "each cell its own process pinned to --devices, floor(devices / --gpus-per-cell) at once; "
                          "slurm: one submitit job array, logs under the sweep dir, requeued jobs resume from their "
                          "last checkpoint."),
        click.option("--devices", type=str, default=None, metavar="IDS|cpu:N",
                     help="--launcher local: GPU ids (0,1,2,3) or cpu:N for N one-thread CPU cells at once. Default: "
                          "every visible GPU, else cpu:1."),
        click.option("--gpus-per-cell", type=click.IntRange(min=1), default=1,
                     help="GPUs per cell (local and slurm); K > 1 trains a cell under `accelerate launch` with K "
                          "processes."),
        click.option("--partition", type=str, default=None, help="--launcher slurm: the partition (required)."),
        click.option("--time", "time_limit", type=str, default=None, metavar="HH:MM:SS",
                     help="--launcher slurm: the time limit of each job (required); a job that hits it is requeued "
                          "and resumes from its last checkpoint."),
        click.option("--account", type=str, default=None, help="--launcher slurm: the account to charge."),
        click.option("--slurm-option", "slurm_options", type=str, multiple=True, metavar="KEY=VALUE",
                     help="--launcher slurm: any other sbatch option (repeatable), e.g. --slurm-option qos=high "
                          "--slurm-option constraint=a100."),
        click.option("--cpus-per-cell", type=click.IntRange(min=1), default=None,
                     help="--launcher slurm: CPUs per job (default: 8 per GPU, submitit's data loading rule of "
                          "thumb is 8-10 per GPU)."),
    ]


LAUNCH_KEYS = ("launcher", "devices", "gpus_per_cell", "partition", "time_limit", "account", "slurm_options",
               "cpus_per_cell")
SWEEP_KEYS = ("grid", "sweep_dir", "n_prompts", "images_per_prompt", "gen_seed", "gen_batch_size", "device", "score",
              *LAUNCH_KEYS)


def make_launcher(launcher: str = "inline", devices: str | None = None, gpus_per_cell: int = 1,
                  partition: str | None = None, time_limit: str | None = None, account: str | None = None,
                  slurm_options: tuple = (), cpus_per_cell: int | None = None):
    """The --launcher options -> a launcher object for harness.sweep.run_sweep (None: inline)."""
    from harness.errors import UserError

    if launcher != "slurm":
        for name, value in (("--partition", partition), ("--time", time_limit), ("--account", account),
                            ("--slurm-option", slurm_options), ("--cpus-per-cell", cpus_per_cell)):
            if value:
                raise UserError(f"{name} applies to --launcher slurm")
    if launcher == "inline":
        if devices is not None or gpus_per_cell != 1:
            raise UserError("--devices/--gpus-per-cell need --launcher local or slurm (inline runs one cell at a "
                            "time with --device)")
        return None
    if launcher == "local":
        from harness.launchers.local import LocalLauncher

        if devices is None:
            import torch

            n = torch.cuda.device_count()
            devices = ",".join(str(i) for i in range(n)) if n else "cpu:1"
        return LocalLauncher(devices=devices, gpus_per_cell=gpus_per_cell)
    from harness.launchers.slurm import SlurmLauncher

    if devices is not None:
        raise UserError("--devices applies to --launcher local (SLURM allocates the GPUs)")
    return SlurmLauncher.from_options(partition=partition, time_limit=time_limit, gpus_per_cell=gpus_per_cell,
                                      account=account, slurm_options=slurm_options, cpus_per_cell=cpus_per_cell)


def run_sweep_command(target, cfg, grid, sweep_dir, n_prompts, images_per_prompt, gen_seed, gen_batch_size, device,
                      score, **launch) -> None:
    """Run the sweep of `cfg` over `grid` (a list of ranks or {key: values}) and print its table; failed cells are
    one line at the end (exit 2) once the others are done."""
    from rich.console import Console

    from harness.errors import UserError
    from harness.sweep import run_sweep

    if sweep_dir is not None:
        check_output_dir(sweep_dir, "--sweep-dir")
    launcher = make_launcher(**launch)
    result = run_sweep(cfg, grid, sweep_dir=sweep_dir, n_prompts=n_prompts, gen_batch_size=gen_batch_size,
                       device=device, score=score, gen_seed=gen_seed, images_per_prompt=images_per_prompt,
                       target=target, launcher=launcher)
    console = Console(highlight=False)  # results go to stdout (progress bars and errors use stderr)
    console.print(result.table())
    console.print(f"sweep record: {result.path}")
    if launcher is not None and launcher.name == "slurm":
        console.print(f"submitted; follow it with: harness sweep status {result.path.parent}")
        return
    if result.failed():
        what = "rank(s)" if isinstance(grid, list) else "cell(s)"
        raise UserError(f"{len(result.failed())} {what} failed: {'; '.join(map(str, result.failed()))} "
                        f"(errors in {result.path}); rerun the same command to retry them")


def sweep_command(train_command: click.Command, target_ref: str, build_config, plan: str | None = None
                  ) -> click.Command:
    """`harness sweep KIND` for a family whose sweep takes exactly its training options plus the shared sweep
    options: built from its `harness train KIND` command, so every training option is also a sweep option.
    `build_config(train_kwargs)` is the typed config the train command would train; `target_ref` is the
    registry's "module:attr" of the family's SweepTarget. `plan` ("module:function", [(cell label, cell config)]
    -> a rich renderable) adds `--dry-run`: print the plan of every cell and exit, without data or weights."""

    def callback(**kwargs):
        from harness.errors import UserError
        from harness.families.registry import load_ref
        from harness.sweep import parse_grid

        take_config_format(kwargs, ("print_config",))  # a sweep's --dry-run prints a plan, not a config
        dry_run = kwargs.pop("dry_run", False)
        if dry_run:
            _print_plan(load_ref(target_ref), load_ref(plan), build_config, kwargs)
            return
        if kwargs.get("print_config"):
            _print_sweep_config(load_ref(target_ref), build_config, kwargs)
            return
        for opt, name in (("split_path", "--split"), ("data_dir", "--data")):
            if kwargs.get(opt) is None:
                raise UserError(f"{name} is required (except with --dry-run)")
        sweep_kw = {k: kwargs.pop(k) for k in SWEEP_KEYS}
        if sweep_kw["device"] is not None:  # before the config is built (it may open runs); run_sweep checks too
            from harness.distributed import pick_device

            pick_device(sweep_kw["device"])
        if kwargs.pop("resume_run", None):
            raise UserError("--resume does not apply to a sweep: rerun the same sweep command to continue it")
        kwargs.pop("print_config", None)
        kwargs.pop("run_id", None)
        grid = parse_grid(sweep_kw.pop("grid"))
        if not grid:
            raise UserError("give the grid to sweep: --grid KEY=V1,V2 (repeat for more axes)")
        run_sweep_command(load_ref(target_ref), build_config(kwargs), grid, **sweep_kw)

    # copies (--split/--data turn optional below); a sweep pushes nothing (`harness push` takes a cell's run)
    params = [copy.copy(p) for p in train_command.params if p.name not in PUSH_KEYS]
    cmd = sweep_options(click.Command(train_command.name, callback=callback, params=params,
                                      context_settings=train_command.context_settings))
    if plan is not None:
        cmd = click.option("--dry-run", is_flag=True,
                           help="Print every cell's trainable parameters (real architecture on the meta device) and "
                                "exit; needs no data and no weights.")(cmd)
        for p in cmd.params:  # not needed for --dry-run; the callback checks them otherwise
            if p.name in ("split_path", "data_dir"):
                p.required = False
    cmd.help = (f"Sweep `harness train {train_command.name}` over a grid of its options: per cell train -> "
                "generate the validation prompts -> score.\n\n"
                "Each cell is recorded in sweep.json (run, status, metrics or the error); a crash in one cell is "
                "recorded and the sweep goes on; rerunning the same command skips finished cells and continues a "
                "killed training in its own run directory. Every cell generates the same validation prompts with "
                "the same seeds; the table gives FID / precision / recall / F1 with bootstrap 95 % intervals and marks "
                "the cells indistinguishable from the best; sweep.png plots them per cell.\n\n"
                f"\b\nExample:\n  harness sweep {train_command.name} --split split.json --data DATA_DIR "
                "--grid lr=1e-4,3e-4 --grid loop.seed=0,1 ...")
    return cmd


def _print_sweep_config(target, build_config, kwargs: dict) -> None:
    """--print-config of a `sweep_command`: the base config every cell starts from (swept fields left as null), the
    resolved grid, the cells and the generation protocol; exits without data beyond the split or any weights."""
    from harness.config import to_dict
    from harness.errors import UserError
    from harness.sweep import _set_path, cell_label, grid_cells, parse_grid, resolve_grid, sweep_protocol

    grid = parse_grid(kwargs.pop("grid"))
    if not grid:
        raise UserError("give the grid to sweep: --grid KEY=V1,V2 (repeat for more axes)")
    sweep_kw = {k: kwargs.pop(k, None) for k in SWEEP_KEYS if k != "grid"}
    for k in ("resume_run", "print_config", "run_id"):
        kwargs.pop(k, None)
    base = build_config(kwargs)
    axes = resolve_grid(target, base, grid)
    resolved = to_dict(base)
    for path in axes:
        _set_path(resolved, path, None)  # each cell sets its own
    resolved["sweep"] = dict(sweep_protocol(base, sweep_kw["n_prompts"], sweep_kw["gen_seed"],
                                            sweep_kw["images_per_prompt"]),
                             grid=axes, cells=[cell_label(c) for c in grid_cells(axes)])
    print_config(resolved)


def _print_plan(target, plan, build_config, kwargs: dict) -> None:
    """--dry-run of a `sweep_command`: every cell's config built and validated as the sweep would, then the plan."""
    from rich.console import Console

    from harness.config import to_dict
    from harness.errors import UserError
    from harness.sweep import _set_path, cell_label, grid_cells, parse_grid, resolve_grid

    grid = parse_grid(kwargs.pop("grid"))
    if not grid:
        raise UserError("give the grid to sweep: --grid KEY=V1,V2 (repeat for more axes)")
    for k in SWEEP_KEYS + ("resume_run", "print_config", "run_id"):
        kwargs.pop(k, None)
    base = build_config(kwargs)
    cells = []
    for cell in grid_cells(resolve_grid(target, base, grid)):
        d = to_dict(base)
        for path, v in cell.items():
            _set_path(d, path, v)
        cfg = target.config_from_dict(d)
        cfg.validate()
        cells.append((cell_label(cell), cfg))
    Console(highlight=False).print(plan(cells))
