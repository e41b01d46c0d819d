"""P6: Kandinsky 3.0 LoRA training step with the T5 text-encoder cache vs the encoder resident.

Both arms train the tiny offline Kandinsky 3.0 pipeline (`harness models make-tiny kandinsky3`: diffusers' fast-test
U-Net/MoVQ, a 2-layer T5 encoder) with the same LoRA, data, order and noise on the shipped sample (32 px, MoVQ
latents cached in both arms). cached = the family's path: texts read from harness/encoder_cache.py, the encoder
freed before the first step. resident = the baseline of the public example scripts: the T5 encoder stays loaded and
encodes each batch's captions every step. Reported: parameters resident during the steps, step time, and on CUDA
the peak allocated memory. Then the analytic figures at the real sizes (models/kandinsky3/memory.py: 3.06 B U-Net,
8.7 B FLAN-UL2 encoder, bf16, 256 px, batch 8).

    python benchmarks/p6_kandinsky3_cache.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HARNESS_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402


def _config(base: Path, data: tuple[Path, Path], cache: Path, steps: int, bs: int):
    from harness.config import to_dict
    from harness.families.kandinsky3.train import Kandinsky3Config, config_from_dict

    d = to_dict(Kandinsky3Config())
    d.update(data_dir=str(data[0]), split_path=str(data[1]), base=str(base), cache_dir=str(cache))
    d["data"].update(resolution=32, caption_dropout=0.1)
    d["loop"].update(max_steps=steps, batch_size=bs, checkpoint_every=0, val_every=0, val_batches=1, log_every=1,
                     num_workers=0)
    return config_from_dict(d)


def _arm(cfg, resident: bool, work: Path) -> dict:
    from harness.families.kandinsky3.train import _load_parts, build_task
    from harness.runs import create_run
    from harness.trainer import run_training
    from models.kandinsky3.loading import cut_context, encode_text

    task, hashes = build_task(cfg)
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
    if enc is not None:
        params += sum(p.numel() * p.element_size() for p in enc.parameters())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    orig_step = task.on_step_end
    last = [time.perf_counter()]

    def on_step_end(step):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        orig_step(step)

    task.on_step_end = on_step_end
    run_training(task, cfg.loop, create_run("kandinsky3", {}, hashes, root=work))
    steady = times[2:] or times
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"resident_param_bytes": params, "step_s": sum(steady) / len(steady), "peak_cuda_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from harness.progress import console  # noqa: F401
    from models.kandinsky.lora import LoraSpec
    from models.kandinsky3.memory import estimate
    from models.kandinsky3.testing import save_tiny_pipeline
    from test_kandinsky_fixtures import make_mini_devset

    sample = Path(__file__).resolve().parents[1] / "harness" / "sample"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HARNESS_RUNS_DIR"] = str(tmp / "runs")
        base = save_tiny_pipeline(tmp / "k3")
        data = make_mini_devset(sample, tmp / "data", n_images=12, n_val=2)
        rows = {}
        for name, resident in (("encoder resident", True), ("cached", False)):  # warm-up cost lands on the baseline
            cfg = _config(base, data, tmp / "cache", args.steps, args.batch_size)
            rows[name] = _arm(cfg, resident, tmp / "runs")
    dev = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"## P6 Kandinsky 3.0 LoRA step, text-encoder cache vs encoder resident ({platform.machine()}, {dev}, "
          f"torch {torch.__version__})\n")
    print(f"Tiny pipeline, 32 px, batch {args.batch_size}, {args.steps} steps (mean of steps 3..), rank 4.\n")
    print("| arm | resident parameters | step time | peak CUDA memory |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        peak = f"{r['peak_cuda_bytes'] / 2**20:.1f} MiB" if r["peak_cuda_bytes"] is not None else "n/a (CPU)"
        print(f"| {name} | {r['resident_param_bytes'] / 2**20:.2f} MiB | {r['step_s'] * 1000:.0f} ms | {peak} |")
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
