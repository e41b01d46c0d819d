"""`harness challenges list|show|check`: the challenge profiles (harness/challenges/)."""

from __future__ import annotations

from pathlib import Path

import click

CHALLENGE_HELP = ("Challenge profile: a shipped name (`harness challenges list`) or a FILE.toml with the same fields "
                  "(default: imageclef2024-task1, the 2024 task's behaviour).")


def challenge_option(f):
    return click.option("--challenge", "challenge", type=str, default="imageclef2024-task1", show_default=True,
                        help=CHALLENGE_HELP)(f)


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(challenges)


@click.group()
def challenges() -> None:
    """Challenge profiles: prompt format, images per prompt, file names, archive, official metrics."""


@challenges.command("list")
def list_() -> None:
    """The shipped profiles, one per line."""
    from harness.challenges import load_profile, shipped_names

    for name in shipped_names():
        p = load_profile(name)
        click.echo(f"{name}\t{p.prompts.images_per_prompt} image(s)/prompt\t{p.title}")


def _describe(p) -> list[str]:
    from harness.config import to_dict

    d = to_dict(p)
    d.pop("source")
    lines = [f"source: {p.source}"]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += [f"{k}.{kk}: {vv}" for kk, vv in v.items()]
        else:
            lines.append(f"{k}: {v}")
    lines.append(f"example names: {', '.join(p.expected_names(2)[:3])}")
    return lines


@challenges.command("show")
@click.argument("name", metavar="NAME|FILE.toml")
def show(name: str) -> None:
    """Every field of one profile (a shipped name or a TOML file)."""
    from harness.challenges import load_profile

    for line in _describe(load_profile(name)):
        click.echo(line)


@challenges.command("check")
@click.argument("path", metavar="FILE.toml", type=click.Path(dir_okay=False, path_type=Path))
def check(path: Path) -> None:
    """Validate a custom profile: syntax, unknown keys and bad values are one line naming the file, line and key.

    \b
    Example:
      harness challenges check my-challenge.toml
    """
    from harness.challenges import load_profile

    p = load_profile(str(path) if str(path).endswith(".toml") else f"./{path}")
    click.echo(f"ok {path}: {p.name}, {p.prompts.images_per_prompt} image(s) per prompt, "
               f"names {', '.join(p.expected_names(1)[:2])}")


def score_challenge(target: Path, challenge: str, prompts_path, data_dir, organiser_quirks: bool, biomedclip: str,
                    device: str, batch_size: int, out_path, real_mapping=None) -> bool:
    """`harness score TARGET --challenge NAME`: the challenge's official metric when it is the 2025 task-2 one
    (returns True); False = the profile's metrics are `harness score`'s own, which then runs as usual."""
    from harness.challenges import load_profile
    from harness.challenges.metrics_2025 import score_2025
    from harness.errors import UserError

    profile = load_profile(challenge)
    if "fidelity" not in profile.metrics:
        if organiser_quirks:
            raise UserError(f"--organiser-quirks is for the 2025 task-2 metrics, not {profile.name}'s")
        return False
    if prompts_path is None or data_dir is None:
        raise UserError(f"--challenge {profile.name} needs --prompts (the prompt file) and --data (the real set: "
                        "prompt-gt.csv + images/, e.g. from `harness data fetch`)")
    target = Path(target)
    images = target / "images" if (target / "config.json").is_file() else target
    prompts = profile.read_prompts(prompts_path).prompts
    dev = "cuda" if device == "auto" and _cuda() else ("cpu" if device == "auto" else device)
    record, out = score_2025(images, prompts, Path(data_dir), profile, organiser_quirks=organiser_quirks,
                             biomedclip=biomedclip, device=dev, batch_size=batch_size, out=out_path,
                             real_mapping=real_mapping)
    click.echo(f"{profile.name} [{record['variant']}]")
    if record.get("not_computed"):
        click.echo(f"  not computed: {record['not_computed']}")
    else:
        for key in ("fidelity", "agreement", "diversity", "FBD"):
            click.echo(f"  {key:<10} {record[key]:.4f}")
        click.echo(f"  pairs scored {record['pairs_scored']} of {record['pairs_total']}")
    click.echo(f"wrote {out}")
    return True


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
