"""The one list of model families that `harness train`, `generate`, `sweep` and `models` read.

A family is a folder `harness/families/<name>/` (configs, TrainTask(s), generator, CLI) plus one `Family` entry in
`FAMILIES` below. Each family trains one or more *run kinds*: the name `harness train <kind>` creates and records as
`family` in the run's config.json ("msdm-vae", "msdm-unet", "kandinsky-prior", ...). Runs made before families
moved into this folder recorded the same kind names, so they resolve here unchanged; a kind that is ever renamed
keeps its old name in `aliases` so its runs stay loadable.

Entries name modules and attributes as "module:attr" strings, imported only when used, so `harness --help` does
not import torch or diffusers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from harness.errors import UserError


@dataclass(frozen=True)
class RunKind:
    """One kind of run a family trains."""

    name: str  # `harness train NAME`; recorded as "family" in RUN/config.json
    generator: str | None = None  # "module:function", load(run, overrides) -> harness.generate.Generator
    sweep: str | None = None  # "module:attr", a harness.sweep.SweepTarget: `harness sweep NAME --grid ...`
    aliases: tuple[str, ...] = ()  # earlier names of this kind recorded in older runs' config.json
    # `harness generate` options beyond --steps/--guidance/--dtype/--device that its generator honours (override
    # keys of harness.generate.OPTIONAL_OVERRIDES); the others are refused for this kind, never ignored.
    generate_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str  # its folder, harness/families/<name>/
    description: str
    cli: str | None  # module with register(cli, train, sweep, models) adding the family's commands
    kinds: tuple[RunKind, ...]
    # A reference baseline, not an entry (what it stands for): the leaderboard marks its rows and never ranks them.
    reference: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family("msdm", "MSDM latent diffusion (VAE, then a text-conditioned UNet)", "harness.families.msdm.cli", (
        RunKind("msdm-vae"),
        RunKind("msdm-unet", generator="harness.families.msdm.sampling:load_generator",
                sweep="harness.families.msdm.sweep:UNET"),
    )),
    Family("kandinsky22", "Kandinsky 2.2 LoRA (prior and decoder)", "harness.families.kandinsky22.cli", (
        RunKind("kandinsky-prior", generator="harness.families.kandinsky22.train:load_generator",
                sweep="harness.families.kandinsky22.sweep:PRIOR", generate_options=("height", "width")),
        RunKind("kandinsky-decoder", generator="harness.families.kandinsky22.train:load_generator",
                sweep="harness.families.kandinsky22.sweep:DECODER", generate_options=("height", "width")),
    )),
    Family("sd", "Stable Diffusion 1.x/2.x fine-tuning (full, LoRA, DoRA, BitFit, DiffFit)", "harness.families.sd.cli", (
        RunKind("sd", generator="harness.families.sd.generate:load_generator", sweep="harness.families.sd.sweep:SD",
                generate_options=("scheduler", "negative_prompt", "height", "width")),
    )),
    Family("kandinsky3", "Kandinsky 3.0 LoRA (U-Net; T5 text-encoder cache)", "harness.families.kandinsky3.cli", (
        RunKind("kandinsky3", generator="harness.families.kandinsky3.generate:load_generator",
                sweep="harness.families.kandinsky3.sweep:K3",
                generate_options=("negative_prompt", "height", "width")),
    )),
    # Not a model: seeded colour fields, used by the tests and by `harness quickstart --model test-pattern`;
    # `harness train test-pattern` makes a run that records a split (a reference row of the leaderboard).
    Family("test-pattern", "seeded test pattern (no model)", "harness.families.retrieval.pattern", (
        RunKind("test-pattern", generator="harness.generate:load_test_pattern"),
    ), reference="nothing learned: seeded colour fields"),
    # Not a model: each prompt gets a training image whose caption asks for the same attributes.
    Family("retrieval", "retrieval baseline (a training image with the prompt's attributes)",
           "harness.families.retrieval.cli", (
               RunKind("retrieval", generator="harness.families.retrieval.generate:load_generator",
                       generate_options=("height", "width")),
           ), reference="copies of training images"),
)


def reference_families() -> dict[str, str]:
    """Run kind (and earlier names) -> what the reference baseline stands for, for the leaderboard."""
    return {name: f.reference for f in FAMILIES if f.reference for k in f.kinds for name in (k.name, *k.aliases)}


def load_ref(ref: str) -> Any:
    """Import "module:attr" and return the attribute."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def kinds() -> list[RunKind]:
    return [k for f in FAMILIES for k in f.kinds]


def family_of(kind: str) -> Family | None:
    for f in FAMILIES:
        if any(kind == k.name or kind in k.aliases for k in f.kinds):
            return f
    return None


def run_kind(kind: str) -> RunKind | None:
    """The registered kind named `kind` (or that once was)."""
    for k in kinds():
        if kind == k.name or kind in k.aliases:
            return k
    return None


def generator_loader(kind: str, where: Any = None):
    """`load(run, overrides) -> Generator` of a run kind; a UserError naming the kinds that generate otherwise."""
    k = run_kind(kind)
    if k is None or k.generator is None:
        names = ", ".join(sorted(x.name for x in kinds() if x.generator))
        raise UserError(f"family {kind!r} cannot generate images (generating families: {names})", where)
    return load_ref(k.generator)


def sweep_target(kind: str):
    """The `harness.sweep.SweepTarget` of a run kind; a UserError naming the sweepable kinds otherwise."""
    k = run_kind(kind)
    if k is None or k.sweep is None:
        names = ", ".join(sorted(x.name for x in kinds() if x.sweep))
        raise UserError(f"{kind!r} cannot be swept (sweepable: {names})")
    return load_ref(k.sweep)
