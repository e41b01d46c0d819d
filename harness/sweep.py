"""Rank-grid sweeps of Kandinsky LoRA: for each rank train -> generate the validation prompts -> score -> record.

The seed paper's three-stage recipe, as commands (--preset paper: lr 1e-4, batch 64, 256 px padded, epochs over
the caption rows, 25 prior + 150 decoder sampling steps):
    harness train kandinsky-decoder --split S --data D --preset paper          # 1. decoder r=32, 40 epochs
    harness sweep kandinsky-prior --split S --data D --preset paper --decoder-adapter runs/<decoder-r32>
                                                                               # 2. prior ranks, 100 epochs each
    harness sweep kandinsky-decoder --split S --data D --preset paper --prior-adapter runs/<best prior>
                                                                               # 3. decoder ranks, 100 epochs each

Per rank: train, generate K images per validation caption (N_gen >= 2,000 by default, the paper's protocol size),
score against the validation images, then bootstrap 95 % intervals (harness/stats.py) and a paired comparison of
each rank's FID with the best rank's: the summary table marks the ranks statistically indistinguishable from it.

State lives in `<sweep dir>/sweep.json` (written atomically after every stage): per rank the run directory
(recorded as soon as the run exists, before its first step), the stage reached, the metrics, or the error of a
crash. A crash in one rank is recorded and the sweep goes on (a user error - bad data, a missing base model - stops
it, once). Running the same command again skips finished ranks, continues a rank whose training was killed
(SIGKILL, OOM, Ctrl-C) in the same run directory from its last checkpoint, and finishes generation/scoring where
they stopped. The sweep dir defaults to runs/sweeps/<family>-<hash of the base config and protocol>, so the same
command finds its own record; another base config or protocol (n_prompts, generation seed, images per prompt,
sampling steps/guidance) in the same dir is refused, naming the differences.

`--dry-run` needs no data and no weights: the trainable-parameter counts come from the real architectures built on
the meta device (models/kandinsky/counting.py) and equal the paper's tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import to_dict
from harness.errors import UserError
from harness.io import dumps_json, read_json, write_json, write_text
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


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def plan_rows(component: str, ranks: list[int], alpha: float | None = None, targets: str = "paper",
              dora: bool = False, rslora: bool = False) -> list[dict[str, Any]]:
    from models.kandinsky.counting import count_lora
    from models.kandinsky.lora import LoraSpec

    rows = []
    for r in ranks:
        try:
            spec = LoraSpec(rank=r, alpha=alpha, targets=targets, dora=dora, rslora=rslora)
        except ValueError as e:
            raise UserError(str(e)) from None
        c = count_lora(component, spec)
        rows.append({"rank": r, "alpha": c.alpha, "targets": targets, "dora": dora, "trainable": c.trainable,
                     "base": c.base, "optimizer_bytes": c.optimizer_bytes()})
    return rows


def plan_table(component: str, ranks: list[int], alpha: float | None = None, targets: str = "paper",
               dora: bool = False, rslora: bool = False):
    from rich.table import Table

    rows = plan_rows(component, ranks, alpha, targets, dora, rslora)
    t = Table(title=f"kandinsky-{component} LoRA sweep plan (real architecture, meta device; "
                    f"base {rows[0]['base']:,} frozen parameters)")
    for col in ("rank", "alpha", "targets", "trainable params", "% of base", "AdamW memory (fp32 w+g+m+v)"):
        t.add_column(col, justify="left" if col == "targets" else "right")
    for r in rows:
        t.add_row(str(r["rank"]), f"{r['alpha']:g}", r["targets"] + (" +DoRA" if r["dora"] else ""),
                  f"{r['trainable']:,}", f"{100 * r['trainable'] / r['base']:.2f}",
                  _human_bytes(r["optimizer_bytes"]))
    return t


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

    def failed(self) -> list[int]:
        return [int(r) for r, v in self.record["ranks"].items() if v.get("status") == "failed"]

    def table(self):
        """Per rank: status, run, trainable parameters, losses and metrics. Once ranks carry bootstrap intervals the
        table shows FID / P / R / F1 with their 95 % intervals and which ranks are indistinguishable from the best
        (the run ids and errors stay in sweep.json)."""
        from rich.table import Table

        ranks = sorted(self.record["ranks"].items(), key=lambda kv: int(kv[0]))
        best = self.record.get("best_rank")
        title = f"{self.record['family']} sweep ({self.path.parent})"
        if best is None:
            t = Table(title=title)
            for col in ("rank", "status", "run", "trainable", "val loss", "metrics / error"):
                t.add_column(col)
            for r, v in ranks:
                what = v.get("metrics_summary") or v.get("error", "")
                val = v.get("val_loss")
                t.add_row(r, v.get("status", "?"), Path(v["run"]).name if v.get("run") else "-",
                          f"{v['trainable']:,}" if v.get("trainable") else "-",
                          f"{val:.4f}" if isinstance(val, float) else "-", what)
            return t
        t = Table(title=f"{title}; best rank {best} by FID; '≈' = statistically indistinguishable from it "
                        "(paired bootstrap 95 % interval of the FID difference holds 0)")
        for col in ("rank", "status", "trainable", "FID [95 % CI]", "precision", "recall", "F1", "vs best"):
            t.add_column(col)
        for r, v in ranks:
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
                           "min_generated": MIN_GENERATED, "generation": to_dict(base.generation)}
    if base.data_dir and base.split_path:
        n = len(validation_prompts(base.data_dir, base.split_path, n_prompts))
        k = images_per_prompt or images_per_prompt_for(n)
        out.update(images_per_prompt=k, n_val_prompts=n, n_generated=n * k)
    elif images_per_prompt is None:
        out["images_per_prompt"] = f"auto: ceil({MIN_GENERATED} / validation prompts)"
    return out


def check_bases(base) -> None:
    """Resolve the base pipelines once, before any rank: a wrong --prior/--decoder or a hub id that is not cached
    offline is one line for the whole sweep, not one traceback per rank."""
    from models.kandinsky.loading import resolve_source

    for which in ("prior", "decoder"):
        try:
            resolve_source(getattr(base, which), getattr(base, f"{which}_revision"))
        except FileNotFoundError as e:
            raise UserError(f"--{which}: {e}") from None


def run_sweep(base, ranks: list[int], sweep_dir: Path | None = None, n_prompts: int = 0, gen_batch_size: int = 8,
              device: str | None = None, score: bool = True, gen_seed: int = 0,
              images_per_prompt: int | None = None) -> SweepResult:
    """Run (or continue) the sweep of `base` (a KandinskyConfig) over `ranks`; see the module docstring.

    `images_per_prompt` None = enough for MIN_GENERATED images per rank. Everything that changes a rank's results
    (the base config, n_prompts, gen_seed, images_per_prompt) is the sweep's identity: a rerun that differs in any of
    them is refused in an explicit --sweep-dir and gets its own directory by default."""
    from harness.families.kandinsky22.train import FAMILIES, resolve_adapter

    base.validate()
    family = FAMILIES[base.component]
    other = "decoder" if base.component == "prior" else "prior"
    resolve_adapter(base.decoder_adapter if other == "decoder" else base.prior_adapter, other)  # fail early
    check_bases(base)
    base_dict = to_dict(base)
    base_dict["lora"]["rank"] = None  # the rank varies; everything else must match to continue a sweep
    val_prompts = validation_prompts(base.data_dir, base.split_path, n_prompts)
    k = images_per_prompt if images_per_prompt is not None else images_per_prompt_for(len(val_prompts))
    if k < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {k}")
    protocol = {"n_prompts": n_prompts, "gen_seed": gen_seed, "images_per_prompt": k}
    sweep_dir = Path(sweep_dir) if sweep_dir else \
        runs_root() / "sweeps" / f"{family}-{_config_hash({'base': base_dict, 'protocol': protocol})}"
    path = sweep_dir / "sweep.json"
    if path.is_file():
        record = read_json(path)
        diff = _differences({"base_config": record.get("base_config"), "protocol": record.get("protocol")},
                            {"base_config": base_dict, "protocol": protocol})
        if diff:
            raise UserError(f"this sweep dir holds a sweep with another base config or protocol ({'; '.join(diff)}); "
                            "rerun with the same options to continue it, or pass another --sweep-dir", path)
    else:
        record = {"format": SWEEP_FORMAT, "family": family, "base_config": base_dict, "protocol": protocol,
                  "ranks": {}}
    # One line per generated image: prompt i of the validation list K times (each with its own image seed).
    prompts = [p for p in val_prompts for _ in range(k)]
    prompts_file = sweep_dir / "val-prompts.txt"
    write_text(prompts_file, "".join(p + "\n" for p in prompts))
    record["prompts"] = {"file": str(prompts_file), "n": len(prompts), "n_unique": len(val_prompts),
                         "images_per_prompt": k, "sha256": hashlib.sha256(prompts_file.read_bytes()).hexdigest()}
    write_json(path, record)

    from harness.progress import console

    for r in ranks:
        entry = record["ranks"].setdefault(str(r), {"status": "pending"})
        if entry.get("status") == "done":
            console.print(f"rank {r}: done earlier ({entry.get('run')}), skipped")
            continue
        try:
            _run_rank(base, r, entry, record, path, prompts, gen_batch_size, device, score, gen_seed)
            entry["status"] = "done"
            entry.pop("error", None)
            entry.pop("traceback", None)
        except KeyboardInterrupt:
            entry["status"] = "interrupted"
            write_json(path, record)
            raise
        except UserError as e:  # the user's setup: every other rank would fail the same way
            entry["status"] = "failed"
            entry["error"] = str(e)
            write_json(path, record)
            raise
        except Exception as e:  # noqa: BLE001 - one rank's crash must not stop the others
            entry["status"] = "failed"
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=8)
            console.print(f"[red]rank {r} failed:[/] {entry['error']}")
        write_json(path, record)
    if score:
        best = mark_best(record)
        if best is not None:
            record["best_rank"] = best
            plot = plot_sweep(record, sweep_dir / "sweep.png")
            record["plot"] = str(plot) if plot else None
        write_json(path, record)
    return SweepResult(path, record)


def _run_rank(base, rank: int, entry: dict, record: dict, path: Path, prompts: list[str], gen_batch_size: int,
              device: str | None, score: bool, gen_seed: int) -> None:
    from harness.generate import generate_images, load_generator
    from harness.runs import open_run
    from harness.families.kandinsky22.train import ADAPTER_DIR, WEIGHT_NAME, continue_run, train
    from models.kandinsky.counting import count_lora

    cfg = dataclasses.replace(base, lora=dataclasses.replace(base.lora, rank=rank),
                              loop=dataclasses.replace(base.loop), data=dataclasses.replace(base.data))
    try:
        entry["trainable"] = count_lora(cfg.component, cfg.lora).trainable  # of the real architecture
    except Exception:  # noqa: BLE001 - the count is informative only
        pass
    run: Run | None = open_run(entry["run"]) if entry.get("run") and Path(entry["run"]).is_dir() else None

    # 1. train, or continue the recorded run of a killed training in its own directory (from its last checkpoint)
    if run is None or not (run.dir / ADAPTER_DIR / WEIGHT_NAME).is_file():
        entry["stage"] = "train"
        if run is not None:
            run = continue_run(run)
        else:
            def record_run(new: Run) -> None:  # before the first step: a kill from here on leaves a resumable record
                entry["run"] = str(new.dir)
                write_json(path, record)

            run = train(cfg, on_run=record_run)
        entry["run"] = str(run.dir)
        write_json(path, record)
    stats = read_json(run.dir / "train_stats.json") if (run.dir / "train_stats.json").is_file() else {}
    entry["val_loss"], entry["train_loss"] = stats.get("val_loss"), stats.get("final_loss")
    write_json(path, record)

    # 2. generate (resumable by itself: finished images are kept; a resumed training is exact, so its images from
    # before a kill still belong to the same model; a retraining from scratch is a new run with an empty images dir)
    entry["stage"] = "generate"
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = load_generator(run, {"device": device})
    prompts_sha = record["prompts"]["sha256"]
    rep = generate_images(gen, prompts, run.images_dir, base_seed=gen_seed, batch_size=gen_batch_size,
                          prompts_sha256=prompts_sha)
    run.log(f"sweep generate: {rep.generated} new, {rep.skipped} kept, prompts sha256 {prompts_sha}")
    entry["n_images"] = rep.total
    write_json(path, record)

    # 3. score + leaderboard, when those modules are installed
    if score:
        entry["stage"] = "score"
        entry.update(_score(run, path.parent))
        write_json(path, record)
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


def mark_best(record: dict[str, Any]) -> int | None:
    """Compare every scored rank with the best one (lowest FID) by the paired bootstrap of the FID difference
    (same real features; image i of both runs comes from prompt i); each rank gets `vs_best` with the difference,
    its 95 % interval and whether the interval holds 0 (statistically indistinguishable). Kept in sweep.json per
    (rank run, best run), so a rerun does not recompute it."""
    from harness import stats
    from harness.runs import open_run

    scored = {r: v for r, v in record["ranks"].items()
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
    return int(best)


def plot_sweep(record: dict[str, Any], out: Path) -> Path | None:
    """FID / precision / recall / F1 against rank, with the 95 % bootstrap intervals as error bars."""
    from harness.plots import sweep_plot

    points = []
    for r, v in record["ranks"].items():
        iv = v.get("intervals") or {}
        if not iv:
            continue
        p: dict[str, Any] = {"rank": int(r), "series": record["family"]}
        for key in ("fid", "precision", "recall", "f1"):
            if key in iv:
                p[key], p[f"{key}_low"], p[f"{key}_high"] = iv[key]["value"], iv[key]["low"], iv[key]["high"]
        points.append(p)
    if not points:
        return None
    n = record.get("prompts", {}).get("n")
    return sweep_plot(points, out, f"{record['family']} sweep: 95 % bootstrap intervals (N_gen = {n})")
