"""P1: Kandinsky prior LoRA training epoch, frozen-encoder cache vs recomputing the encoders every step.

Both arms train the same small Kandinsky 2.2 prior pipeline (built offline, same classes as the real one) with the
same LoRA, data order and noise, on the shipped real sample (its training side, 256 px padded images, every caption
row once per epoch), through the shared training loop. The only difference is `cache`: on = CLIP text/image outputs
read from harness/encoder_cache.py, off = JPEG decode + resize + CLIP image tower + CLIP text tower every step (what
the public example scripts do). The one-off cache fill is reported separately. Then the analytic FLOP saving for the
real model sizes (CLIP ViT-bigG text and image towers, the 1.0 B prior) is computed from their configs.

    python benchmarks/p1_kandinsky_cache.py            # a few minutes on 2 CPU cores
    python benchmarks/p1_kandinsky_cache.py --epochs 1 --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HARNESS_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The small pipeline: CLIP towers at the real input sizes (224 px / 14 px patches = 257 tokens, 77 text tokens),
# scaled-down widths and depths.
SMALL = dict(embed_dim=64, text_layers=4, vision_layers=4, vision_hidden=64, image_size=224, patch_size=14,
             prior_layers=2)

# Real sizes (public configs): CLIP ViT-bigG/14 (laion2B-39B-b160k) towers and the Kandinsky 2.2 prior.
BIGG_TEXT = dict(hidden=1280, layers=32, ff=5120, tokens=77)
BIGG_VISION = dict(hidden=1664, layers=48, ff=8192, tokens=257)


def transformer_flops(hidden: int, layers: int, ff: int, tokens: int) -> float:
    """Forward FLOPs of a pre-norm transformer: 2 x (QKV + out + MLP weights) per token + attention scores/values."""
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ff) + 4 * tokens * tokens * hidden
    return float(layers * per_layer)


def analytic_rows() -> list[tuple[str, float]]:
    from models.kandinsky.counting import architecture_config

    p = architecture_config("prior")
    inner = p["num_attention_heads"] * p["attention_head_dim"]
    tokens = p["num_embeddings"] + p["additional_embeddings"]
    prior_fwd = transformer_flops(inner, p["num_layers"], 4 * inner, tokens)
    # LoRA step on a frozen base: forward + backward through the activations (~ another forward's worth for the
    # input gradients); the LoRA weight gradients are negligible.
    prior_step = 2 * prior_fwd
    text = transformer_flops(BIGG_TEXT["hidden"], BIGG_TEXT["layers"], BIGG_TEXT["ff"], BIGG_TEXT["tokens"])
    vision = transformer_flops(BIGG_VISION["hidden"], BIGG_VISION["layers"], BIGG_VISION["ff"],
                               BIGG_VISION["tokens"])
    return [("prior LoRA step (fwd + activation bwd)", prior_step), ("CLIP bigG text tower (fwd)", text),
            ("CLIP bigG image tower (fwd)", vision)]


def run(epochs: int, batch_size: int, workdir: Path) -> None:
    from harness.config import to_dict
    from harness.runs import create_run
    from harness.sample import sample_dir
    from harness.split import write_split
    from harness.families.kandinsky22.train import build_task, config_from_dict, default_config
    from harness.trainer import run_training
    from models.kandinsky.testing import tiny_decoder_pipeline, tiny_prior_pipeline

    import torch

    prior = tiny_prior_pipeline(**SMALL)
    prior.save_pretrained(workdir / "prior")
    tiny_decoder_pipeline(embed_dim=SMALL["embed_dim"]).save_pretrained(workdir / "decoder")
    data = sample_dir()
    split = workdir / "split.json"
    write_split(data, split, val_images=4)
    os.environ["HARNESS_RUNS_DIR"] = str(workdir / "runs")

    def config(cache: bool):
        d = to_dict(default_config("prior"))
        d.update(data_dir=str(data), split_path=str(split), prior=str(workdir / "prior"),
                 decoder=str(workdir / "decoder"), cache=cache, cache_dir=str(workdir / "cache"))
        d["lora"]["rank"] = 16
        d["data"]["captions"] = "all"  # one item per caption row, as the seed paper trained
        d["loop"].update(batch_size=batch_size, checkpoint_every=0, val_every=0, val_batches=1, log_every=1000)
        return config_from_dict(d)

    t0 = time.perf_counter()
    cached_task, hashes = build_task(config(True))
    fill = time.perf_counter() - t0
    n_items = len(cached_task.train_dataset())
    steps = max(1, n_items // batch_size)
    print(f"encoder cache fill (one-off): {fill:.1f}s for {hashes['encoder_cache']['n_images']} images and "
          f"{hashes['encoder_cache']['n_captions']} captions", file=sys.stderr)

    times: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, float] = {}
    for e in range(epochs):
        for cache in ((True, False) if e % 2 == 0 else (False, True)):  # alternate order: no warm-up bias
            cfg = config(cache)
            cfg.loop.max_steps = steps
            task, _ = build_task(cfg)
            r = create_run("bench", {})
            t = time.perf_counter()
            stats = run_training(task, cfg.loop, r)
            times[cache].append(time.perf_counter() - t)
            losses[cache] = stats["final_loss"]
    torch_threads = torch.get_num_threads()

    c, u = min(times[True]), min(times[False])
    print("## P1: Kandinsky prior LoRA epoch, encoder cache vs recompute\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch threads "
          f"{torch_threads}, CPU only. Data: shipped sample, {n_items} (image, caption) rows/epoch at 256 px (pad), "
          f"batch {batch_size}, {steps} steps/epoch, LoRA r=16 on to_q/to_k/to_v/to_out.0, best of {epochs}.")
    print(f"Pipeline: PriorTransformer 2 layers (dim 64); CLIP text 4 layers (hidden 64, 77 tokens); "
          f"CLIP vision 4 layers (hidden 64, 224 px, patch 14).\n")
    print("| arm | epoch time (s) | s/step | final loss |")
    print("|---|---:|---:|---:|")
    print(f"| recompute encoders every step | {u:.2f} | {u / steps:.3f} | {losses[False]:.4f} |")
    print(f"| encoder cache | {c:.2f} | {c / steps:.3f} | {losses[True]:.4f} |")
    print(f"| **speed-up** | **{u / c:.1f}x** | | |")
    print(f"\nOne-off cache fill: {fill:.1f}s (paid once per data set/model/preprocessing; later runs hit the "
          "cache). Equal final losses show both arms train on the same stream.\n")

    rows = analytic_rows()
    step = rows[0][1]
    enc = rows[1][1] + rows[2][1]
    print("### Analytic FLOPs per training sample, real model sizes\n")
    print("| part | GFLOP |")
    print("|---|---:|")
    for name, f in rows:
        print(f"| {name} | {f / 1e9:,.0f} |")
    print(f"| step without cache (sum) | {(step + enc) / 1e9:,.0f} |")
    print(f"| step with cache | {step / 1e9:,.0f} |")
    print(f"| **saving** | **{(step + enc) / step:.1f}x fewer FLOPs** (plus no JPEG decode/resize) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="Epochs per arm (best is reported).")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None, help="Scratch folder (default: a temp dir, removed).")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine, 2 OpenMP threads contending "
                         "with other processes make small matmuls ~100x slower and the timings meaningless).")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="p1-kandinsky-"))
    try:
        run(args.epochs, args.batch_size, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
