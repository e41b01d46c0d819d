"""P7: wall time of a 4-cell tiny Kandinsky prior sweep, cells one after another (the default inline launcher, one
process using every core) vs two cells at once (`--launcher local --devices cpu:2`: one worker process per CPU slot,
one torch thread each, running its cells one after another), plus the planning table for the paper's prior sweep at
real sizes (analytic GPU-hours from the FLOP count of benchmarks/p1).

Both runs are the same `harness sweep kandinsky-prior --grid rank=2,3 --grid lr=1e-3,2e-3` command on the tiny
models (`harness models make-tiny kandinsky22`) and the shipped sample, each in fresh sweep and runs folders (the
encoder cache is filled once beforehand, so neither run pays it). The launched cells get one torch thread each
(what the launcher sets). The inline run is measured with one thread and with every core (OMP_NUM_THREADS = cores,
what a user gets by default): on these tiny models a second intra-op thread gains little, and on a loaded machine
OpenMP threads waiting for each other can make it much slower, so the speed-up is taken against the faster inline
run (`--inline-threads` picks the ones to measure; an inline run past 1.5x the first one's time is stopped, as it
cannot be the faster: this keeps the default run to ~3 minutes even on a busy machine).

Reported per run: wall time; CPU time (user + system of the sweep and all its processes: equal for both launchers
when no start-up is paid twice, whatever else loads the machine); the time until the first cell starts (process
start-up, imports, planning); the start-up share = the part of the slots' time (wall x cells at once) beyond 4 x the
steady work of one cell (the median time of the cells that were not their process's first, in the 1-thread inline
run): process start-up, the imports the first cell of each process pays (diffusers, transformers, peft, the
real-size model counted on the meta device: most of a short cell), scheduling, a slot idle at the end. Prints
markdown tables and the load average.

    python benchmarks/p7_sweep_parallel.py                # 4 cells x 1,000 steps (~3 min on 2 idle cores)
    python benchmarks/p7_sweep_parallel.py --steps 60     # start-up dominates
    python benchmarks/p7_sweep_parallel.py --repo /path/to/older/checkout   # measure another checkout's launcher
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def sweep_args(work: Path, name: str, steps: int, extra: list[str]) -> list[str]:
    return ["sweep", "kandinsky-prior", "--split", str(work / "split.json"), "--data", str(work / "data"),
            "--prior", str(work / "tiny" / "prior"), "--decoder", str(work / "tiny" / "decoder"),
            "--grid", "rank=2,3", "--grid", "lr=1e-3,2e-3", "--batch-size", "2", "--resolution", "32",
            "--max-steps", str(steps), "--checkpoint-every", "0", "--n-prompts", "1", "--images-per-prompt", "1",
            "--no-score", "--prior-steps", "2", "--decoder-steps", "2", "--cache-dir", str(work / "cache"),
            "--sweep-dir", str(work / name), *extra]


def timed(work: Path, name: str, steps: int, extra: list[str], repo: Path, threads: int,
          timeout: float | None = None) -> dict | None:
    """Run the sweep; its wall time, when its first cell started, and the cells' own time (sweep.json); None when
    it ran past `timeout` seconds (stopped)."""
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HARNESS_NO_PROGRESS="1",
               HARNESS_RUNS_DIR=str(work / f"runs-{name}"))
    t0_wall = time.time()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "harness", *sweep_args(work, name, steps, extra)], env=env,
                             cwd=work, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    secs = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the sweep and every process it reaped (workers, loaders)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    cells = json.loads((work / name / "sweep.json").read_text())["cells"]
    assert all(c["status"] == "done" for c in cells.values()), cells
    first_of: dict = {}
    for c in sorted(cells.values(), key=lambda c: c["started"]):
        first_of.setdefault(c.get("pid"), c["started"])
    return {"wall": secs, "cpu": cpu, "first_cell": min(c["started"] for c in cells.values()) - t0_wall,
            "later_cells": [c["ended"] - c["started"] for c in cells.values()
                            if first_of[c.get("pid")] != c["started"]],
            "n_cells": len(cells), "processes": len(first_of),
            "cells": [round(c["ended"] - c["started"], 1) for c in sorted(cells.values(), key=lambda c: c["started"])]}


def planning_rows(gpu_tflops: float, util: float) -> list[tuple[int, float, float]]:
    """(GPUs, GPU-hours per cell, sweep wall hours) for the paper's prior sweep: 10 ranks x 100 epochs over the
    training caption rows (dev set: 20,241 rows, 90 % train), one prior LoRA step's FLOPs from p1 (encoders
    cached), one GPU per cell."""
    from p1_kandinsky_cache import analytic_rows

    step_flops = dict(analytic_rows())["prior LoRA step (fwd + activation bwd)"]
    rows = int(20241 * 0.9)
    cell_flops = 100 * rows * step_flops
    cell_h = cell_flops / (gpu_tflops * 1e12 * util) / 3600
    return [(n, cell_h, math.ceil(10 / n) * cell_h) for n in (1, 4, 8)], step_flops, cell_h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="training steps per cell")
    ap.add_argument("--inline-threads", default=None,
                    help="comma-separated torch thread counts of the inline runs (default: 1 and the core count)")
    ap.add_argument("--repo", type=Path, default=ROOT, help="the harness checkout whose sweep and launcher run")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    inline_threads = sorted({int(t) for t in (args.inline_threads or f"1,{cores}").split(",")})
    load0 = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="p7-") as tmp:
        work = Path(tmp)
        from harness.data import load_devset
        from harness.io import write_json
        from harness.sample import sample_dir
        from harness.split import make_split

        os.symlink(sample_dir(), work / "data")
        split = make_split(sample_dir(), val_images=2, seed=0)
        split["train"] = split["train"][:6]
        write_json(work / "split.json", split)
        assert load_devset(work / "data")
        env = dict(os.environ, PYTHONPATH=str(args.repo), HF_HUB_OFFLINE="1")
        subprocess.run([sys.executable, "-m", "harness", "models", "make-tiny", "kandinsky22", str(work / "tiny")],
                       env=env, check=True, capture_output=True)
        timed(work, "warm", 1, [], args.repo, cores)  # fills the encoder cache both timed runs then share
        inline: dict[int, dict | None] = {}
        for t in inline_threads:  # a run already 1.5x slower than the first cannot be the faster one: stopped
            first = next(iter(inline.values()), None)
            inline[t] = timed(work, f"sequential-{t}", args.steps, [], args.repo, t,
                              timeout=1.5 * first["wall"] if first else None)
        par = timed(work, "parallel", args.steps, ["--launcher", "local", "--devices", "cpu:2"], args.repo, 1)
    load1 = os.getloadavg()
    best = min((r for r in inline.values() if r), key=lambda r: r["wall"])
    later = inline[min(inline)]["later_cells"]  # the run with the fewest threads (1 by default)
    steady = statistics.median(later)  # one cell's own work, its process already warm

    print(f"### P7: 4-cell tiny sweep ({args.steps} steps per cell), {cores} cores, load average "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after (1 min)\n")
    print("| launcher | wall time | speed-up | CPU time | first cell starts after | start-up share | processes "
          "| cells (s, by start) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    rows = [(f"inline (one cell after another, 1 process, {t} thread{'s' if t > 1 else ''})", r, 1, t)
            for t, r in inline.items()] + [("local --devices cpu:2 (2 slots, 1 thread each)", par, 2, 1)]
    for what, r, slots, threads in rows:
        if r is None:
            print(f"| {what} | stopped after {1.5 * inline[inline_threads[0]]['wall']:.0f} s (1.5x the "
                  f"{inline_threads[0]}-thread run) | - | - | - | - | 1 | - |")
            continue
        # the steady work is a 1-thread figure: no start-up share for a run with more threads per cell
        share = f"{1 - r['n_cells'] * steady / (r['wall'] * slots):.0%}" if threads == 1 else "-"
        print(f"| {what} | {r['wall']:.1f} s | {best['wall'] / r['wall']:.2f}x | {r['cpu']:.1f} s | "
              f"{r['first_cell']:.1f} s | "
              f"{share} | {r['processes']} | {', '.join(map(str, r['cells']))} |")
    print(f"\nSpeed-up: against the faster inline run. Steady work of one cell: {steady:.1f} s (median of "
          f"{len(later)} warm cells, inline 1 thread). CPU time: user + system of the sweep and every process it "
          f"started; equal CPU times mean no start-up is paid twice, and the wall-time speed-up then depends only on "
          f"how much of the second core the machine's other load leaves.")
    rows, step_flops, cell_h = planning_rows(312.0, 0.35)
    print("\n### Planning the paper's prior sweep (10 ranks x 100 epochs, A100 bf16 at an assumed 35 % of peak)\n")
    print(f"One prior LoRA step: {step_flops / 1e9:.1f} GFLOP per sample (p1, encoders cached); "
          f"{cell_h:.2f} GPU-hours of training per cell (generation and scoring not included).\n")
    print("| GPUs | cells at once | sweep wall time (training) |")
    print("|---:|---:|---:|")
    for n, _, wall in rows:
        print(f"| {n} | {min(n, 10)} | {wall:.2f} h |")


if __name__ == "__main__":
    main()
