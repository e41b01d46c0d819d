"""Sweeps: for each cell of a grid over training options, train -> generate the validation prompts -> score -> record.

    harness sweep KIND --split S --data D --grid KEY=V1,V2 [--grid KEY2=A,B ...] [training options]

The grid is the cartesian product of the `--grid` axes; a key is a field of the family's typed config (its dotted
path, e.g. `loop.lr`, or its leaf name when unique, e.g. `lr`, `rank`) or one of the family's option aliases
(`resolve_grid`); an unknown key is one line naming the allowed ones. Every cell's config is built and validated
before anything trains. What a family provides is a `SweepTarget` (below), registered with its run kind in
harness/families/registry.py.

LoRA rank sweeps are the special case the seed paper needs (`--ranks R1,R2` = `--grid rank=R1,R2`), its three-stage
recipe as commands (--preset paper: lr 1e-4, batch 64, 256 px padded, epochs over the caption rows, 25 prior + 150
decoder sampling steps):
    harness train kandinsky-decoder --split S --data D --preset paper          # 1. decoder r=32, 40 epochs
    harness sweep kandinsky-prior --split S --data D --preset paper --decoder-adapter runs/<decoder-r32>
                                                                               # 2. prior ranks, 100 epochs each
    harness sweep kandinsky-decoder --split S --data D --preset paper --prior-adapter runs/<best prior>
                                                                               # 3. decoder ranks, 100 epochs each

Per cell: train, generate K images per validation caption (N_gen >= 2,000 by default, the paper's protocol size),
every cell the same prompts with the same seeds, score against the validation images, then bootstrap 95 %
intervals (harness/stats.py) and a paired comparison of each cell's FID with the best cell's: the summary table
marks the cells statistically indistinguishable from it; sweep.png plots them against the swept axis (rank on a
log2 axis) or per cell label for a multi-axis grid.

State lives in `<sweep dir>/sweep.json`, the one truth of the sweep: every process that runs a cell writes it
under a lock file, atomically (harness/launchers/state.py): per cell the run directory (recorded as soon as the run
exists, before its first step), status, launcher, job id, devices, start/end times, a heartbeat, the stage reached,
the metrics, or the error of a crash. Where the cells run is the launcher (--launcher): inline, one after another
in this process (the default); local, each cell its own `harness sweep-cell` process pinned to its devices
(--devices 0,1,2,3 [--gpus-per-cell K], cpu:N on CPU); slurm, one submitit job array (harness/launchers/).
`harness sweep status SWEEP_DIR` shows every cell. A crash in one cell is recorded and the sweep goes on (a user
error - bad data, a missing base model - stops an inline sweep, once). Running the same command again skips
finished cells, leaves cells running elsewhere (a live process, a queued SLURM job) alone, retries failed cells and
cells that died silently (stale heartbeat), continues a cell whose training was killed (SIGKILL, OOM, Ctrl-C,
preemption) in the same run directory from its last checkpoint, and finishes generation/scoring where they stopped.
The sweep dir defaults to runs/sweeps/<kind>-<hash of the base config and protocol> (the swept
fields are left out of the base config), so the same command finds its own record; another base config or
protocol (n_prompts, generation seed, images per prompt, sampling steps/guidance) in the same dir is refused,
naming the differences. Rank-only sweeps keep their cells under "ranks" (so sweeps started before --grid existed
continue), other grids under "cells" with their "axes".

Kandinsky's `--dry-run` needs no data and no weights: the trainable-parameter counts come from the real
architectures built on the meta device (models/kandinsky/counting.py) and equal the paper's tables.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from harness.config import to_dict
from harness.errors import UserError
from harness.io import dumps_json, read_json, write_text
from harness.launchers.state import Heartbeat, SweepStore, effective, now
from harness.runs import Run, runs_root

SWEEP_FORMAT = "harness-sweep/1"
STAGES = ("train", "generate", "score")


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(r) for r in str(text).replace(" ", "").split(",") if r]
    except ValueError:
        raise UserError(f"--ranks must be comma-separated integers, got {text!r}") from None
    if not ranks or any(r < 1 for r in ranks):
        raise UserError(f"--ranks must list ranks >= 1, got {text!r}")
    return list(dict.fromkeys(ranks))


class SweepTarget(ABC):
    """What a family implements so `harness sweep KIND` can train its cells (registered as the run kind's `sweep`
    in harness/families/registry.py). The config is the family's typed training config; it must have `data_dir`,
    `split_path` (the validation prompts) and `validate()`."""

    kind: str  # the run kind, recorded in sweep.json and used in the default sweep dir name
    # Grid keys that are not a config field's own (leaf) name: CLI option name -> dotted config path.
    aliases: dict[str, str] = {}
    # Fields a grid may not vary: the data and split define the validation prompts every cell shares.
    fixed: tuple[str, ...] = ("data_dir", "split_path")

    @abstractmethod
    def config_from_dict(self, d: dict[str, Any]) -> Any:
        """The typed config from its dict (unknown keys and bad values are UserErrors)."""

    @abstractmethod
    def check(self, cfg: Any) -> None:
        """Fail early, once for the whole sweep (bad base model, missing paired run, ...)."""

    @abstractmethod
    def train(self, cfg: Any, on_run: Callable[[Run], None]) -> Run:
        """Train a new run; call `on_run(run)` once its directory exists, before the first step."""

    @abstractmethod
    def continue_run(self, run: Run) -> Run:
        """Finish a killed training in its own directory (from its last checkpoint, or from step 0)."""

    @abstractmethod
    def finished(self, run: Run) -> bool:
        """Whether the run's training finished (its final artefact exists)."""

    def matches(self, cfg: Any) -> bool:
        """Whether `cfg` is a config this target trains (run_sweep finds the target of a config by it)."""
        return False

    def trainable(self, cfg: Any) -> int | None:
        """Trainable parameters of the cell (informative; None when unknown)."""
        return None


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """`--grid key=v1,v2` options -> {key: [raw values]} (keys in the order given; a repeated key is an error)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = str(item).partition("=")
        key = key.strip().replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise UserError(f"--grid takes KEY=V1,V2,..., got {item!r}")
        if key in grid:
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid {key}=...")
        grid[key] = list(dict.fromkeys(vals))
    return grid


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _typed(raw: str, like: Any) -> Any:
    """A grid value typed like the base config's value of the field (a str field keeps "4" a string)."""
    low = raw.lower()
    if low in ("none", "null"):
        return None
    if isinstance(like, bool) or (like is None and low in ("true", "false")):
        if low in ("true", "false", "1", "0", "yes", "no"):
            return low in ("true", "1", "yes")
        raise UserError(f"--grid value {raw!r} is not a boolean (true/false)")
    if isinstance(like, str):
        return raw
    try:
        return int(raw) if not isinstance(like, float) else float(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            if isinstance(like, (int, float)):
                raise UserError(f"--grid value {raw!r} is not a number") from None
            return raw


def resolve_grid(target: SweepTarget, base: Any, grid: dict[str, list[str]]) -> dict[str, list[Any]]:
    """{grid key: raw values} -> {dotted config path: typed values}. A key is a config field's dotted path
    (`loop.lr`), its leaf name when unique (`lr`, `rank`), or one of the target's aliases
    (CLI option names such as `lora_targets`). Unknown keys: one line naming the allowed ones."""
    leaves = {p: v for p, v in _leaves(to_dict(base)).items() if p not in target.fixed and p not in VIEW_FIELDS}
    by_leaf: dict[str, list[str]] = {}
    for path in leaves:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    out: dict[str, list[Any]] = {}
    for key, raws in grid.items():
        if key in target.aliases:
            path = target.aliases[key]
        elif key in leaves:
            path = key
        elif len(by_leaf.get(key, [])) == 1:
            path = by_leaf[key][0]
        else:
            allowed = sorted(set(target.aliases) | {k for k, v in by_leaf.items() if len(v) == 1}
                             | {p for v in by_leaf.values() if len(v) > 1 for p in v})
            what = "names several fields (give its dotted path)" if key in by_leaf else \
                f"is not a training option of {target.kind}"
            if key in target.fixed:
                what = "is fixed for a whole sweep (every cell is scored on the same validation prompts)"
            raise UserError(f"--grid key {key!r} {what}; allowed: {', '.join(allowed)}")
        if path in out:
            raise UserError(f"--grid keys {key!r} and another one both set {path}")
        out[path] = [_typed(r, leaves[path]) for r in raws]
    return out


def grid_cells(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the axes, in the order given: [{path: value}, ...]."""
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def cell_label(cell: dict[str, Any]) -> str:
    """"4" for a one-axis grid; "method=lora,rank=4" (leaf names) for more axes."""
    if len(cell) == 1:
        return _fmt(next(iter(cell.values())))
    return ",".join(f"{p.rsplit('.', 1)[-1]}={_fmt(v)}" for p, v in cell.items())


def _fmt(v: Any) -> str:
    return json.dumps(v) if v is None or isinstance(v, bool) else (f"{v:g}" if isinstance(v, float) else str(v))


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        d = d[p]
    d[leaf] = value


# Sweeps over LoRA rank alone keep their cells under "ranks" (sweep.json files written before --grid existed
# continue unchanged); any other grid uses "cells".
RANK_PATH = "lora.rank"


def cells_key(axes: Sequence[str]) -> str:
    return "ranks" if list(axes) == [RANK_PATH] else "cells"


# ---------------------------------------------------------------------------------------------------------------


def validation_prompts(data_dir: str, split_path: str, n: int = 0) -> list[str]:
    """One caption per validation image (picked by a hash of the image name, so the choice is stable), sorted by
    image; the first n (0 = all)."""
    from harness.data import load_devset
    from harness.split import load_split

    devset = load_devset(Path(data_dir))
    split = load_split(Path(split_path))
    by_image = devset.captions_by_image()
    prompts = []
    for img in sorted(split.val):
        caps = by_image[img]
        pick = int.from_bytes(hashlib.sha256(f"val-prompt:{img}".encode()).digest()[:8], "little") % len(caps)
        prompts.append(caps[pick])
    if not prompts:
        raise UserError("the split has no validation images to prompt with", split_path)
    return prompts[:n] if n > 0 else prompts


@dataclass
class SweepResult:
    path: Path
    record: dict[str, Any]

    @property
    def key(self) -> str:
        return "ranks" if "ranks" in self.record else "cells"

    def failed(self) -> list:
        """Failed cells: ranks (ints) for a rank sweep, cell labels otherwise."""
        bad = [c for c, v in self.record[self.key].items() if v.get("status") == "failed"]
        return [int(c) for c in bad] if self.key == "ranks" else bad

    def _cells(self) -> list[tuple[str, dict]]:
        items = list(self.record[self.key].items())
        return sorted(items, key=lambda kv: int(kv[0])) if self.key == "ranks" else items

    def table(self):
        """Per cell: status, run, trainable parameters, losses and metrics. Once cells carry bootstrap intervals the
        table shows FID / P / R / F1 with their 95 % intervals and which cells are indistinguishable from the best
        (the run ids and errors stay in sweep.json)."""
        from rich.table import Table

        cells = self._cells()
        head = "rank" if self.key == "ranks" else "cell"
        best = self.record.get("best_rank", self.record.get("best"))
        title = f"{self.record['family']} sweep ({self.path.parent})"
        if best is None:
            t = Table(title=title)
            t.add_column(head, no_wrap=True)  # a cell label stays one line
            for col in ("status", "run", "trainable", "val loss", "metrics / error"):
                t.add_column(col)
            for r, v in cells:
                what = v.get("metrics_summary") or v.get("error", "")
                val = v.get("val_loss")
                t.add_row(r, v.get("status", "?"), Path(v["run"]).name if v.get("run") else "-",
                          f"{v['trainable']:,}" if v.get("trainable") else "-",
                          f"{val:.4f}" if isinstance(val, float) else "-", what)
            return t
        t = Table(title=f"{title}; best {head} {best} by FID; '≈' = statistically indistinguishable from it "
                        "(paired bootstrap 95 % interval of the FID difference holds 0)")
        t.add_column(head, no_wrap=True)
        for col in ("status", "trainable", "FID [95 % CI]", "precision", "recall", "F1", "vs best"):
            t.add_column(col)
        for r, v in cells:
            iv = v.get("intervals") or {}

            def cell(key: str, fmt: str = ".3f") -> str:
                if key not in iv:
                    return "-"
                i = iv[key]
                return f"{i['value']:{fmt}} [{i['low']:{fmt}}, {i['high']:{fmt}}]"

            vs = v.get("vs_best") or {}
            mark = "best" if vs.get("best") else ("≈" if vs.get("indistinguishable") else
                                                    (f"worse (+{vs['diff']:.2f})" if "diff" in vs else "-"))
            t.add_row(r, v.get("status", "?"), f"{v['trainable']:,}" if v.get("trainable") else "-",
                      cell("fid", ".2f"), cell("precision"), cell("recall"), cell("f1"), mark)
        return t


# Config fields that only choose views of a run (trackers), not what it trains: left out of a sweep's identity (its
# default dir name and the continue check) and not sweepable; a rerun may add or drop a tracker.
VIEW_FIELDS = ("loop.report_to",)


def _identity(base_dict: dict) -> dict:
    import copy

    out = copy.deepcopy(base_dict)
    for path in VIEW_FIELDS:
        *parents, leaf = path.split(".")
        d = out
        for p in parents:
            d = d.get(p) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(leaf, None)
    return out


def _config_hash(d: dict) -> str:
    return hashlib.sha256(dumps_json(d).encode()).hexdigest()[:10]


MIN_GENERATED = 2000  # the seed paper's protocol size (N_gen of its FID)


def images_per_prompt_for(n_prompts: int, minimum: int = MIN_GENERATED) -> int:
    """The smallest K with n_prompts * K >= minimum (K >= 1)."""
    return max(1, -(-minimum // max(1, n_prompts)))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts (for a message that names them)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def sweep_protocol(base, n_prompts: int, gen_seed: int, images_per_prompt: int | None) -> dict[str, Any]:
    """What a sweep's generation will be (for --print-config): needs the split only for the automatic K."""
    out: dict[str, Any] = {"n_prompts": n_prompts, "gen_seed": gen_seed, "images_per_prompt": images_per_prompt,
                           "min_generated": MIN_GENERATED,
                           # the sampling settings every cell generates with (named per family)
                           "generation": to_dict(getattr(base, "generation", None) or getattr(base, "sampling"))}
    if base.data_dir and base.split_path:
        n = len(validation_prompts(base.data_dir, base.split_path, n_prompts))
        k = images_per_prompt or images_per_prompt_for(n)
        out.update(images_per_prompt=k, n_val_prompts=n, n_generated=n * k)
    elif images_per_prompt is None:
        out["images_per_prompt"] = f"auto: ceil({MIN_GENERATED} / validation prompts)"
    return out


def find_target(base) -> SweepTarget:
    """The registered SweepTarget whose config type and kind fit `base`."""
    from harness.families.registry import kinds, load_ref

    for k in kinds():
        if k.sweep:
            target = load_ref(k.sweep)
            if target.matches(base):
                return target
    raise UserError(f"no registered family sweeps a {type(base).__name__}")


def run_sweep(base, grid: list[int] | dict[str, Sequence[Any]], sweep_dir: Path | None = None, n_prompts: int = 0,
              gen_batch_size: int = 8, device: str | None = None, score: bool = True, gen_seed: int = 0,
              images_per_prompt: int | None = None, target: SweepTarget | None = None,
              launcher=None) -> SweepResult:
    """Run (or continue) the sweep of `base` (a family's typed training config) over `grid`; see the module
    docstring. `grid` is a list of LoRA ranks, or {key: values} with keys as `harness sweep --grid` takes them
    (cartesian product, in the order given).

    `images_per_prompt` None = enough for MIN_GENERATED images per cell. Everything that changes a cell's results
    (the base config, n_prompts, gen_seed, images_per_prompt) is the sweep's identity: a rerun that differs in any of
    them is refused in an explicit --sweep-dir and gets its own directory by default.

    `launcher` None runs the cells here, one after another; a launcher (harness/launchers: LocalLauncher,
    SlurmLauncher) runs each cell in its own process or job (`harness sweep-cell`), all of them writing sweep.json
    under its lock."""
    if device is not None:  # an unavailable --device is one line now, not a cell's crash after its training
        from harness.distributed import pick_device

        device = str(pick_device(device))
    target = target or find_target(base)
    axes = resolve_grid(target, base, {RANK_PATH if isinstance(grid, list) else k: [str(v) for v in vals]
                                       for k, vals in ({"rank": grid} if isinstance(grid, list) else grid).items()})
    target.check(base)
    # Every cell's config is built (and validated) before anything trains: a bad value is one line, up front.
    cells = []
    for cell in grid_cells(axes):
        cfg_dict = to_dict(base)
        for p, v in cell.items():
            _set_path(cfg_dict, p, v)
        cells.append((cell, target.config_from_dict(cfg_dict)))
    family = target.kind
    base_dict = to_dict(base)
    for path in axes:  # the swept fields vary; everything else must match to continue a sweep
        _set_path(base_dict, path, None)
    val_prompts = validation_prompts(base.data_dir, base.split_path, n_prompts)
    k = images_per_prompt if images_per_prompt is not None else images_per_prompt_for(len(val_prompts))
    if k < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {k}")
    protocol = {"n_prompts": n_prompts, "gen_seed": gen_seed, "images_per_prompt": k}
    sweep_dir = Path(sweep_dir) if sweep_dir else \
        runs_root() / "sweeps" / f"{family}-{_config_hash({'base': _identity(base_dict), 'protocol': protocol})}"
    path = sweep_dir / "sweep.json"
    key = cells_key(axes)
    # One line per generated image: prompt i of the validation list K times (each with its own image seed).
    prompts = [p for p in val_prompts for _ in range(k)]
    prompts_file = sweep_dir / "val-prompts.txt"
    prompts_text = "".join(p + "\n" for p in prompts)
    store = SweepStore(path)

    def prepare(record: dict) -> dict:  # under the lock: other processes of this sweep may be writing it
        if record:
            diff = _differences({"base_config": _identity(record.get("base_config") or {}),
                                 "protocol": record.get("protocol")},
                                {"base_config": _identity(base_dict), "protocol": protocol})
            if diff:
                raise UserError(f"this sweep dir holds a sweep with another base config or protocol "
                                f"({'; '.join(diff)}); rerun with the same options to continue it, or pass another "
                                "--sweep-dir", path)
        else:
            record.update({"format": SWEEP_FORMAT, "family": family, "protocol": protocol})
        record["base_config"] = base_dict  # this run's trackers (VIEW_FIELDS); the rest is equal
        record.setdefault(key, {})
        if key == "cells":
            record["axes"] = list(axes)  # dotted config paths, in the order of the cell labels
        write_text(prompts_file, prompts_text)
        record["prompts"] = {"file": str(prompts_file), "n": len(prompts), "n_unique": len(val_prompts),
                             "images_per_prompt": k,
                             "sha256": hashlib.sha256(prompts_text.encode("utf-8")).hexdigest()}
        # How a cell process rebuilds its work from this record alone (harness sweep-cell, SLURM jobs).
        record["run_options"] = {"gen_batch_size": gen_batch_size, "device": device, "score": score,
                                 "gen_seed": gen_seed}
        for cell, _ in cells:
            entry = record[key].setdefault(cell_label(cell), {"status": "pending"})
            if key == "cells":
                entry["params"] = cell
        return record

    record = store.update(prepare)

    from harness.progress import console

    what = "rank" if key == "ranks" else "cell"
    todo = []
    for cell, cfg in cells:
        label = cell_label(cell)
        status, _ = effective(store.read()[key][label])
        if status == "done":
            console.print(f"{what} {label}: done earlier ({record[key][label].get('run')}), skipped")
        elif status in ("running", "queued") and launcher is not None and launcher.owns(record[key][label]):
            console.print(f"{what} {label}: {status} ({launcher.describe(record[key][label])}), left alone")
        elif status == "running":
            console.print(f"{what} {label}: running in another process, left alone")
        else:
            todo.append((label, cfg))
    opts = CellOptions(sweep_dir=sweep_dir, prompts=prompts, prompts_sha256=record["prompts"]["sha256"],
                       gen_batch_size=gen_batch_size, device=device, score=score, gen_seed=gen_seed)
    if launcher is None:  # in-process, one cell after another
        for label, cfg in todo:
            run_cell(store, target, cfg, key, label, opts, launcher="inline")
    else:
        launcher.launch(store, [label for label, _ in todo])
    record = store.read()
    if score:
        def finish(record: dict) -> None:
            best = mark_best(record)
            if best is not None:
                record["best_rank" if key == "ranks" else "best"] = int(best) if key == "ranks" else best
                plot = plot_sweep(record, sweep_dir / "sweep.png")
                record["plot"] = str(plot) if plot else None

        store.update(finish)
        record = store.read()
    if launcher is None or launcher.name != "slurm":  # a slurm sweep returns once submitted: nothing final yet
        log_sweep_table(record, sweep_dir, getattr(getattr(base, "loop", None), "report_to", "none"))
    return SweepResult(path, record)


SWEEP_TABLE_COLUMNS = ["cell", "status", "run", "trainable", "train_loss", "val_loss", "n_gen", "fid", "fid_low",
                       "fid_high", "precision", "recall", "f1", "indistinguishable_from_best"]


def sweep_table_rows(record: dict[str, Any]) -> list[list[Any]]:
    """Each cell's final metrics as table rows (SWEEP_TABLE_COLUMNS): what sweep.json holds, for the trackers."""
    key = "ranks" if "ranks" in record else "cells"
    n_gen = (record.get("prompts") or {}).get("n")
    rows = []
    for label, v in record.get(key, {}).items():
        iv = v.get("intervals") or {}
        fid = iv.get("fid", {})
        vs = v.get("vs_best") or {}
        rows.append([label, v.get("status"), Path(v["run"]).name if v.get("run") else None, v.get("trainable"),
                     v.get("train_loss"), v.get("val_loss"), n_gen if iv else None, fid.get("value"),
                     fid.get("low"), fid.get("high"), *(iv.get(m, {}).get("value") for m in ("precision", "recall",
                                                                                              "f1")),
                     True if vs.get("best") else vs.get("indistinguishable")])
    return rows


def log_sweep_table(record: dict[str, Any], sweep_dir: Path, report_to: str | None) -> None:
    """The cell table to the sweep's trackers (SWEEP_DIR/tracking/), at step = the cells done so far; a rerun
    that finishes more cells logs the grown table at a later step."""
    from harness.tracking import Trackers, parse_report_to

    if not parse_report_to(report_to):
        return
    key = "ranks" if "ranks" in record else "cells"
    done = sum(1 for v in record.get(key, {}).values() if v.get("status") == "done")
    name = f"sweep-{Path(sweep_dir).name}"
    with Trackers.start(report_to, sweep_dir, name, config={"family": record.get("family"),
                                                            "base_config": record.get("base_config"),
                                                            "protocol": record.get("protocol")},
                        group=record.get("family"), resume_step=0) as t:
        t.log_table("sweep/cells", SWEEP_TABLE_COLUMNS, sweep_table_rows(record), step=done)


@dataclass
class CellOptions:
    """What every cell of a sweep shares besides its config: the generation protocol and where it runs."""

    sweep_dir: Path
    prompts: list[str]
    prompts_sha256: str
    gen_batch_size: int = 8
    device: str | None = None
    score: bool = True
    gen_seed: int = 0


def run_cell(store: "SweepStore", target: SweepTarget, cfg, key: str, label: str, opts: CellOptions,
             launcher: str = "inline", job_id: str | None = None, devices: str | None = None) -> dict:
    """Train -> generate -> score one cell in this process, its entry in sweep.json kept current under the lock
    (run dir before the first step, a heartbeat while it runs). A crash is recorded as the cell's failure and
    returned; a user error (bad data, missing base model) and Ctrl-C are recorded and raised."""
    import os
    import socket

    from harness.progress import console

    entry = dict(store.read().get(key, {}).get(label, {}))
    entry.update(status="running", launcher=launcher, host=socket.gethostname(), pid=os.getpid(),
                 started=now(), heartbeat=now())
    entry.pop("ended", None)
    if job_id is not None:
        entry["job_id"] = job_id
    if devices is not None:
        entry["devices"] = devices
    store.put_cell(key, label, entry)
    what = "rank" if key == "ranks" else "cell"

    def save() -> None:
        entry["heartbeat"] = now()
        store.put_cell(key, label, entry)

    def end(status: str) -> None:
        entry["status"] = status
        entry["ended"] = now()
        save()

    try:
        with Heartbeat(store, key, label, entry):
            _run_cell(target, cfg, entry, save, opts)
        entry.pop("error", None)
        entry.pop("traceback", None)
        end("done")
    except KeyboardInterrupt:
        end("interrupted")
        raise
    except UserError as e:  # the user's setup: every other cell would fail the same way
        entry["error"] = str(e)
        end("failed")
        raise
    except Exception as e:  # noqa: BLE001 - one cell's crash must not stop the others
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc(limit=8)
        end("failed")
        console.print(f"[red]{what} {label} failed:[/] {entry['error']}")
    return entry


def _run_cell(target: SweepTarget, cfg, entry: dict, save: Callable[[], None], opts: CellOptions) -> None:
    from harness.generate import generate_images, load_generator
    from harness.runs import open_run

    try:
        n = target.trainable(cfg)
        if n is not None:
            entry["trainable"] = n
    except Exception:  # noqa: BLE001 - the count is informative only
        pass
    run: Run | None = open_run(entry["run"]) if entry.get("run") and Path(entry["run"]).is_dir() else None

    # 1. train, or continue the recorded run of a killed training in its own directory (from its last checkpoint)
    if run is None or not target.finished(run):
        entry["stage"] = "train"
        if run is not None:
            run = target.continue_run(run)
        else:
            def record_run(new: Run) -> None:  # before the first step: a kill from here on leaves a resumable record
                entry["run"] = str(new.dir)
                save()

            run = target.train(cfg, record_run)
        entry["run"] = str(run.dir)
        save()
    stats = read_json(run.dir / "train_stats.json") if (run.dir / "train_stats.json").is_file() else {}
    entry["val_loss"], entry["train_loss"] = stats.get("val_loss"), stats.get("final_loss")
    save()

    # 2. generate (resumable by itself: finished images are kept; a resumed training is exact, so its images from
    # before a kill still belong to the same model; a retraining from scratch is a new run with an empty images dir)
    entry["stage"] = "generate"
    device = opts.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = load_generator(run, {"device": device})
    prompts_sha = opts.prompts_sha256
    rep = generate_images(gen, opts.prompts, run.images_dir, base_seed=opts.gen_seed,
                          batch_size=opts.gen_batch_size,
                          prompts_sha256=prompts_sha)
    run.log(f"sweep generate: {rep.generated} new, {rep.skipped} kept, prompts sha256 {prompts_sha}")
    entry["n_images"] = rep.total
    save()

    # 3. score + leaderboard, when those modules are installed
    if opts.score:
        entry["stage"] = "score"
        entry.update(_score(run, opts.sweep_dir))
        save()
    entry.pop("stage", None)


def _score(run: Run, sweep_dir: Path) -> dict[str, Any]:
    try:
        score_mod = importlib.import_module("harness.score")
    except ModuleNotFoundError:
        return {"metrics_summary": "not scored (harness.score not installed)"}
    result = score_mod.score_run(run, score_mod.ScoreConfig())
    out: dict[str, Any] = {"metrics": str(result.path), "metrics_summary": result.summary_line()}
    feats = rank_features(run)
    if feats:
        out["intervals"] = _intervals(feats)
    try:
        lb = importlib.import_module("harness.leaderboard")
    except ModuleNotFoundError:
        return out
    board, _ = lb.write_leaderboard(out=sweep_dir / "leaderboard.md")  # every scored run under the runs root
    out["leaderboard"] = str(board)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Statistics: bootstrap intervals per rank and which ranks are indistinguishable from the best (harness/stats.py).

N_BOOT = 200


def rank_features(run: Run) -> dict[str, Any] | None:
    """The features `harness score` cached for this run's FID (Inception pool3) and precision/recall (its PRC
    extractor's layer), generated and real side: {"fid": (gen, real), "prc": (gen, real)}; None when not scored."""
    from harness.features import load_cached

    if not run.metrics_path.is_file():
        return None
    m = read_json(run.metrics_path)
    keys = m.get("feature_cache", {})
    out: dict[str, Any] = {}
    for metric, layer_of in (("fid", lambda v: "2048"), ("prc", lambda v: v.get("layer"))):
        info = m.get("metrics", {}).get(metric, {})
        if info.get("status") != "ok":
            continue
        ex, layer = info.get("extractor"), layer_of(info)
        blobs = [load_cached(keys.get(f"{ex}/{side}", {}).get("key", "")) for side in ("gen", "real")]
        if any(b is None for b in blobs):
            continue
        out[metric] = tuple(b["features"][layer].numpy() for b in blobs)
    return out or None


def _intervals(feats: dict[str, Any]) -> dict[str, Any]:
    from harness import stats

    out: dict[str, Any] = {}
    if "fid" in feats:
        out.update(stats.bootstrap(stats.FID(), *feats["fid"], n_boot=N_BOOT))
    if "prc" in feats:
        out.update(stats.bootstrap(stats.PRC(k=3), *feats["prc"], n_boot=N_BOOT))
    return {k: {"value": v.value, **v.to_dict()} for k, v in out.items()}


def mark_best(record: dict[str, Any]) -> str | None:
    """The label of the best cell. Compare every scored cell with the best one (lowest FID) by the paired
    bootstrap of the FID difference (same real features; image i of both runs comes from prompt i); each cell gets
    `vs_best` with the difference, its 95 % interval and whether the interval holds 0 (statistically
    indistinguishable). Kept in sweep.json per (cell run, best run), so a rerun does not recompute it."""
    from harness import stats
    from harness.runs import open_run

    cells = record["ranks" if "ranks" in record else "cells"]
    scored = {r: v for r, v in cells.items()
              if v.get("status") == "done" and "fid" in (v.get("intervals") or {})}
    if not scored:
        return None
    best = min(scored, key=lambda r: scored[r]["intervals"]["fid"]["value"])
    best_feats = rank_features(open_run(scored[best]["run"]))
    for r, v in scored.items():
        if r == best:
            v["vs_best"] = {"best": True, "best_run": scored[best]["run"]}
            continue
        if v.get("vs_best", {}).get("best_run") == scored[best]["run"]:
            continue
        feats = rank_features(open_run(v["run"]))
        if not (feats and best_feats and "fid" in feats and "fid" in best_feats):
            v["vs_best"] = {"best": False, "best_run": None, "error": "features no longer in the feature cache"}
            continue
        c = stats.compare(stats.FID(), feats["fid"][0], best_feats["fid"][0], best_feats["fid"][1],
                          n_boot=N_BOOT)["fid"]
        v["vs_best"] = {"best": False, "best_run": scored[best]["run"], "indistinguishable": c.indistinguishable,
                        **c.to_dict()}
    return best


def plot_sweep(record: dict[str, Any], out: Path) -> Path | None:
    """FID / precision / recall / F1 against the swept axis (rank on a log2 axis; another numeric axis linear), or
    per cell label for a multi-axis or non-numeric grid, with the 95 % bootstrap intervals as error bars."""
    from harness.plots import sweep_plot

    key = "ranks" if "ranks" in record else "cells"
    cells = [(c, v) for c, v in record[key].items() if v.get("intervals")]
    if not cells:
        return None
    axes = record.get("axes") or [RANK_PATH]
    values = [next(iter(v["params"].values())) if key == "cells" else int(c) for c, v in cells]
    numeric = len(axes) == 1 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values)
    if numeric:
        xs, ticks = values, None
    else:
        xs = list(range(1, len(cells) + 1))
        ticks = {x: c for x, (c, _) in zip(xs, cells)}
    points = []
    for x, (_, v) in zip(xs, cells):
        iv = v["intervals"]
        p: dict[str, Any] = {"rank": x, "series": record["family"]}
        for m in ("fid", "precision", "recall", "f1"):
            if m in iv:
                p[m], p[f"{m}_low"], p[f"{m}_high"] = iv[m]["value"], iv[m]["low"], iv[m]["high"]
        points.append(p)
    n = record.get("prompts", {}).get("n")
    xlabel = "LoRA rank" if key == "ranks" else (axes[0] if numeric else " x ".join(axes))
    log2 = key == "ranks" and all(x > 0 for x in xs)
    return sweep_plot(points, out, f"{record['family']} sweep: 95 % bootstrap intervals (N_gen = {n})",
                      xlabel=xlabel, log2=log2, tick_labels=ticks)
