"""P6: Kandinsky 3.0 LoRA training step with the T5 text-encoder cache vs the encoder resident.

Both arms train the tiny offline Kandinsky 3.0 pipeline (`harness models make-tiny kandinsky3`: diffusers' fast-test
U-Net/MoVQ, a 2-layer T5 encoder) with the same LoRA, data, order and noise on the shipped sample (32 px, MoVQ
latents cached in both arms). cached = the family's path: texts read from harness/encoder_cache.py, the encoder
never loaded while training. resident = the baseline of the public example scripts: the T5 encoder stays loaded and
encodes each batch's captions every step.

Each arm runs in its own fresh process, so its memory is its own: a one-off "cache fill" process first encodes every
caption (the only process that loads the encoder on the cached path), then each arm trains. Reported per arm: the
bytes of parameters resident during the steps, step time, and peak memory of the steps - on CUDA the peak allocated
bytes, on CPU the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs right before training;
elsewhere `resource.getrusage().ru_maxrss` of the whole process) next to the RSS at the start of training.

The stock tiny T5 (d_model 32) is ~2 % of the tiny weights, invisible next to the ~0.5 GB of the torch runtime in
RSS, so by default the encoder is widened (`--encoder-width 1024`: d_model 1024, d_ff 4096, still 2 layers,
~25 M parameters, ~100 MB fp32; the U-Net's `encoder_hid_dim` follows). `--encoder-width 32` is the stock tiny model.
Then the analytic figures at the real sizes (models/kandinsky3/memory.py: 3.06 B U-Net, 8.72 B FLAN-UL2 encoder,
bf16, 256 px, batch 8).

    python benchmarks/p6_kandinsky3_cache.py            # about two minutes on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HARNESS_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

MARK = "P6-RESULT "


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0), so the peak read later is the training's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _config(work: Path, steps: int, bs: int):
    from harness.config import to_dict
    from harness.families.kandinsky3.train import Kandinsky3Config, config_from_dict

    paths = json.loads((work / "paths.json").read_text())
    d = to_dict(Kandinsky3Config())
    d.update(data_dir=paths["data"], split_path=paths["split"], base=str(work / "k3"), cache_dir=str(work / "cache"))
    d["data"].update(resolution=32, caption_dropout=0.1)
    d["loop"].update(max_steps=steps, batch_size=bs, checkpoint_every=0, val_every=0, val_batches=1, log_every=1,
                     num_workers=0)
    return config_from_dict(d)


def _fill(cfg) -> dict:
    """The one-off cache fill: build_task encodes every caption (loading and freeing the encoder)."""
    from harness.families.kandinsky3.train import build_task

    _task, hashes = build_task(cfg)
    return {"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "text_misses": hashes["encoder_cache"]["text"]["misses"]}


def _arm(cfg, resident: bool, work: Path) -> dict:
    from harness.families.kandinsky3.train import _load_parts, build_task
    from harness.runs import create_run
    from harness.trainer import run_training
    from models.kandinsky3.loading import cut_context, encode_text

    task, hashes = build_task(cfg)
    assert hashes["encoder_cache"]["text"]["misses"] == 0, "the fill process should have cached every caption"
    enc = None
    if resident:
        parts = _load_parts(cfg, text_encoder=True)
        enc, tok = parts.text_encoder, parts.tokenizer
        orig = task.loss

        def loss(batch, g):  # the baseline: encode this batch's captions now
            out = encode_text(tok, enc, list(batch["caption"]))
            batch = dict(batch)
            batch["text_embeds"], batch["text_mask"] = cut_context(out["text_embeds"], out["text_mask"])
            return orig(batch, g)

        task.loss = loss
    params = sum(p.numel() * p.element_size() for m in task.modules().values() for p in m.parameters())
    enc_bytes = sum(p.numel() * p.element_size() for p in enc.parameters()) if enc is not None else 0
    times: list[float] = []
    orig_step = task.on_step_end
    last = [time.perf_counter()]

    def on_step_end(step):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        orig_step(step)

    task.on_step_end = on_step_end
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    hwm = _reset_peak_rss()
    rss_start = _status_kib("VmRSS")
    last[0] = time.perf_counter()
    run_training(task, cfg.loop, create_run("kandinsky3", {}, hashes, root=work / "runs"))
    steady = times[2:] or times
    return {"resident_param_bytes": params + enc_bytes, "encoder_param_bytes": enc_bytes,
            "step_s": sum(steady) / len(steady),
            "rss_start_kib": rss_start,
            "peak_rss_kib": _status_kib("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "peak_rss_scope": "steps" if hwm else "process",
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


def _child(args) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    os.environ["HARNESS_RUNS_DIR"] = str(work / "runs")
    cfg = _config(work, args.steps, args.batch_size)
    out = _fill(cfg) if args.arm == "fill" else _arm(cfg, args.arm == "resident", work)
    print(MARK + json.dumps(out), flush=True)


def _run_child(arm: str, work: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--work", str(work), "--steps",
           str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        sys.exit(f"arm {arm} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def _mib(kib: int | None) -> str:
    return f"{kib / 1024:.0f} MiB" if kib is not None else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--encoder-width", type=int, default=1024,
                    help="d_model of the tiny T5 encoder (32 = the stock tiny pipeline)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--arm", choices=("fill", "resident", "cached"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        return _child(args)
    from models.kandinsky.lora import LoraSpec
    from models.kandinsky3.memory import estimate
    from models.kandinsky3.testing import save_tiny_pipeline
    from test_kandinsky_fixtures import make_mini_devset

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_tiny_pipeline(work / "k3", encoder_width=args.encoder_width)
        data, split = make_mini_devset(ROOT / "harness" / "sample", work / "data", n_images=12, n_val=2)
        (work / "paths.json").write_text(json.dumps({"data": str(data), "split": str(split)}))
        fill = _run_child("fill", work, args)
        rows = {name: _run_child(arm, work, args) for name, arm in (("encoder resident", "resident"),
                                                                   ("cached", "cached"))}
    load1 = os.getloadavg()
    dev = "cuda" if torch.cuda.is_available() else f"cpu ({args.threads} threads per arm process)"
    print(f"## P6 Kandinsky 3.0 LoRA step, text-encoder cache vs encoder resident ({platform.machine()}, {dev}, "
          f"torch {torch.__version__})\n")
    print(f"Tiny pipeline with a T5 encoder of width {args.encoder_width}, 32 px, batch {args.batch_size}, "
          f"{args.steps} steps (mean of steps 3..), rank 4, each arm in its own process; load average "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after (1 min).\n")
    cuda = torch.cuda.is_available()
    scope = rows["cached"]["peak_rss_scope"]
    peak_col = "peak CUDA allocated" if cuda else ("peak RSS of the steps" if scope == "steps"
                                                   else "peak RSS of the process")
    print(f"| arm | resident parameters (of which T5) | RSS at first step | {peak_col} | step time |")
    print("|---|---:|---:|---:|---:|")
    print(f"| cache fill (one-off process) | - | - | {_mib(fill['peak_rss_kib'])} (process) | - |")
    for name, r in rows.items():
        peak = f"{r['peak_cuda_bytes'] / 2**20:.1f} MiB" if cuda else _mib(r["peak_rss_kib"])
        print(f"| {name} | {r['resident_param_bytes'] / 2**20:.1f} MiB ({r['encoder_param_bytes'] / 2**20:.1f} MiB) "
              f"| {_mib(r['rss_start_kib'])} | {peak} | {r['step_s'] * 1000:.0f} ms |")
    if not cuda and rows["cached"]["peak_rss_kib"] and rows["encoder resident"]["peak_rss_kib"]:
        d = (rows["encoder resident"]["peak_rss_kib"] - rows["cached"]["peak_rss_kib"]) / 1024
        print(f"\nPeak RSS difference (resident - cached): {d:.0f} MiB; T5 weights: "
              f"{rows['encoder resident']['encoder_param_bytes'] / 2**20:.0f} MiB.")
    print("\n### Analytic, real sizes (bf16 weights and activations, 256 px, batch 8)\n")
    print("| gradient checkpointing | U-Net params | T5 encoder params | LoRA r=4 params | activations/sample "
          "| cached GiB | encoder resident GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for ck in (False, True):
        e = estimate(LoraSpec(rank=4), 8, 256, "bf16", "bf16", ck)
        print(f"| {'on' if ck else 'off'} | {e['unet_parameters']:,} | {e['text_encoder_parameters']:,} | "
              f"{e['lora_parameters']:,} | {e['activations_per_sample_gib']:.3f} GiB | {e['cached_gib']:.2f} | "
              f"{e['encoder_resident_gib']:.2f} |")


if __name__ == "__main__":
    main()
