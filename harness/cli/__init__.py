"""The `harness` command: a thin click layer over the pipeline-stage modules.

Each area registers its commands from its own module (data, generate, msdm, kandinsky, score, paraphrase), so the
command modules stay small and the stages stay importable without click.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from pathlib import Path

import click

from harness import __version__
from harness.errors import UserError

# show_default: every option with a concrete default prints it in --help (options whose default is None defer to
# a typed config and say where that value comes from in their help text).
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110, "show_default": True}
_verbose = False  # set per invocation by --verbose (HARNESS_VERBOSE=1 forces it)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="harness")
@click.option("--verbose", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Submission harness for ImageCLEFmed MEDVQA-GI 2024 text-to-image.

    \b
    Typical workflow:
      harness data check DATA_DIR
      harness split DATA_DIR --out split.json
      harness train msdm-vae --split split.json --data DATA_DIR --preset tiny
      harness train msdm-unet --split split.json --data DATA_DIR --vae runs/<vae-run>
      harness generate runs/<unet-run> --prompts test-prompts.txt
      harness score runs/<unet-run>
      harness package runs/<unet-run> --prompts test-prompts.txt --team myteam
    """
    global _verbose
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = _verbose = verbose


@cli.group(context_settings=CONTEXT)
def train() -> None:
    """Train a model family (each writes a new run under runs/)."""


@cli.group(context_settings=CONTEXT)
def sweep() -> None:
    """Train -> generate -> score over a grid of training options (--grid KEY=V1,V2 ...; --ranks for LoRA ranks)."""


@cli.group(context_settings=CONTEXT)
def models() -> None:
    """Inspect model architectures (parameter tables built without allocating weights)."""


@models.group("info", context_settings=CONTEXT)
def models_info() -> None:
    """Parameter table of a model family, built on the meta device (no weights are allocated or downloaded).

    \b
    Examples:
      harness models info msdm --preset paper
      harness models info kandinsky
    """


@models.group("make-tiny", context_settings=CONTEXT)
def models_make_tiny() -> None:
    """Write tiny, randomly initialised models in the real layouts, so every command can be smoke-tested offline on
    CPU in seconds (the same models the tests use)."""


def _register_all() -> None:
    # Each module exposes `register(cli, train, sweep, models)`: the shared areas here, then every family of the
    # registry (harness/families/registry.py). Imported here, not at the top of the stage modules, so
    # `harness --help` stays fast (torch/diffusers are imported lazily inside commands).
    import importlib

    from harness.families.registry import FAMILIES

    shared = [f"harness.cli.{name}"
              for name in ("data", "generate", "score", "paraphrase", "rate", "challenges", "sweeps", "doctor", "push",
                           "attributes")]
    for name in shared + [f.cli for f in FAMILIES if f.cli]:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # area not installed in this build
            raise
        mod.register(cli, train=train, sweep=sweep, models=models)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one red line and exit code 2."""
    global _verbose
    _verbose = False
    # Our progress is shown with rich; the libraries' own tqdm bars (weight loading, pipeline components) are noise.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        cli.main(args=argv, prog_name="harness", standalone_mode=False)
    except UserError as e:
        _fail(str(e), e)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except click.UsageError as e:
        # One line like every other error (click's own form is usage + blank line + message).
        where = e.ctx.command_path if e.ctx is not None else "harness"
        _fail(f"{where}: {e.format_message()} (see `{where} --help`)", e)
    except click.ClickException as e:
        _fail(e.format_message(), e)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        # An output path that cannot be written (a file where a folder must be, /proc, no permission, disk full,
        # read-only file system) is the user's to fix: one line naming the path. OS errors without a path are bugs.
        if e.filename is None:
            raise
        _fail(_os_error_line(e), e)
    sys.exit(0)


_OS_HINTS = {
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EACCES: "no permission",
    errno.EPERM: "not permitted here",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "is a folder, not a file",
}


def _os_error_line(e: OSError) -> str:
    path = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
    reason = e.strerror or type(e).__name__
    hint = _OS_HINTS.get(e.errno or 0)
    return f"{path}: {reason}" + (f" ({hint})" if hint and hint.lower() != reason.lower() else "")


def _fail(message: str, exc: BaseException) -> None:
    from rich.console import Console
    from rich.markup import escape

    if _verbose or os.environ.get("HARNESS_VERBOSE"):
        traceback.print_exception(exc)
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", markup=True)
    sys.exit(2)
