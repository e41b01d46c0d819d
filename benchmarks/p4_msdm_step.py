"""P4: MSDM UNet training step - fp32 re-encoding every step vs cached VAE posteriors (+ bf16 autocast + channels_last).

Three configurations train the same UNet from the same seed on the shipped 64 px sample through the real loop
(`harness.families.msdm.unet_task.UNetTask` + `harness.trainer.run_training`):
  A  fp32, the VAE encodes every batch (what the public scripts do)
  B  fp32, VAE posteriors (mean, logvar) cached once, z drawn from them each step
  C  B + bf16 autocast + channels_last UNet
A and B draw identical data, captions and noise (the cache only moves the encoder out of the loop), so their loss
curves must agree to float rounding; C differs by bf16 rounding only. Prints a markdown table and the curves.

    python benchmarks/p4_msdm_step.py                 # tiny preset, 64 px, batch 16, 40 steps (~1-3 min on 2 cores)
    python benchmarks/p4_msdm_step.py --steps 100 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HARNESS_NO_PROGRESS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=5, help="Steps excluded from the timing (first-call overheads).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    import torch

    from harness.data import load_devset
    from harness.families.msdm.config import VAE_FAMILY, unet_config
    from harness.families.msdm.data import load_sides
    from harness.families.msdm.sampling import load_text
    from harness.families.msdm.train import _prepare_latents
    from harness.families.msdm.unet_task import UNetTask
    from harness.runs import create_run
    from harness.sample import sample_dir
    from harness.split import write_split
    from harness.trainer import run_training
    from models.msdm.presets import get_preset
    from models.msdm.vae import MSDMAutoencoder
    from models.tiny_clip import save_tiny_clip_text

    tmp = Path(tempfile.mkdtemp(prefix="p4-msdm-"))
    os.environ["HARNESS_RUNS_DIR"] = str(tmp / "runs")
    data = sample_dir()
    write_split(data, tmp / "split.json", val_images=8, seed=0)
    clip = save_tiny_clip_text(tmp / "clip", load_devset(data).unique_prompts())
    preset = get_preset(args.preset)
    # The VAE's quality does not matter for step time; a fixed random init stands in for a trained one.
    torch.manual_seed(args.seed)
    vae_run = create_run(VAE_FAMILY, {"preset": args.preset, "data": {"resolution": preset.resolution}},
                         run_id="vae")
    MSDMAutoencoder(**preset.vae).save_pretrained(vae_run.dir / "final" / "vae")

    configs = {
        "A fp32, re-encode every step": dict(cache=False, mp="no", cl=False),
        "B fp32, cached posteriors": dict(cache=True, mp="no", cl=False),
        "C bf16 + channels_last + cached": dict(cache=True, mp="bf16", cl=True),
    }
    results = {}
    for name, c in configs.items():
        cfg = unet_config(args.preset, data, tmp / "split.json", vae_run.dir, {
            "text_encoder": str(clip), "data": {"jitter": 0.0}, "cache_latents": c["cache"], "latent_scale": 1.0,
            "loop": {"seed": args.seed, "max_steps": args.steps, "batch_size": args.batch_size, "lr": 1e-3,
                     "mixed_precision": c["mp"], "checkpoint_every": 0, "val_every": 0, "log_every": 1,
                     "sample_every": 0, "warmup_steps": 0}})
        train_ds, _, _ = load_sides(cfg.data_dir, cfg.split_path, cfg.data)
        vae = MSDMAutoencoder.from_pretrained(vae_run.dir / "final" / "vae")
        text = load_text(cfg.text_encoder, cfg.max_length)
        t0 = time.perf_counter()
        ds, scale = _prepare_latents(cfg, train_ds, vae)
        prep = time.perf_counter() - t0
        torch.manual_seed(args.seed)
        task = UNetTask(cfg, ds, None, vae, text, latent_scale=scale)
        if c["cl"]:
            task.unet.to(memory_format=torch.channels_last)
        stamps: list[float] = []
        cpu_stamps: list[float] = []
        orig = task.on_step_end

        def on_step_end(step, _orig=orig, _stamps=stamps, _cpu=cpu_stamps):
            _orig(step)
            _stamps.append(time.perf_counter())
            _cpu.append(time.process_time())  # CPU seconds: less sensitive than wall time to other load

        task.on_step_end = on_step_end
        run = create_run("msdm-unet", {}, {}, run_id=name.split()[0].lower())
        run_training(task, cfg.loop, run)
        per_step = np.diff(stamps[args.warmup - 1:]).mean()
        cpu_per_step = np.diff(cpu_stamps[args.warmup - 1:]).mean()
        losses = [json.loads(ln)["loss"] for ln in (run.dir / "train_log.jsonl").read_text().splitlines()
                  if "val_loss" not in ln]
        results[name] = {"s_per_step": float(per_step), "cpu_s_per_step": float(cpu_per_step), "prep_s": prep,
                         "losses": losses}

    base = results["A fp32, re-encode every step"]
    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else \
        f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"
    print(f"\n### P4 MSDM UNet step ({args.preset} preset, {preset.resolution} px, batch {args.batch_size}, "
          f"{args.steps} steps, timing after {args.warmup} warm-up steps, {device}, torch {torch.__version__})\n")
    print("| configuration | wall s / step | speed-up vs A | CPU s / step | speed-up vs A (CPU time) "
          "| one-off latent caching (s) | mean loss, last 10 steps |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['s_per_step']:.4f} | {base['s_per_step'] / r['s_per_step']:.2f}x | "
              f"{r['cpu_s_per_step']:.4f} | {base['cpu_s_per_step'] / r['cpu_s_per_step']:.2f}x | "
              f"{r['prep_s'] if 'cached' in name else 0:.1f} | {np.mean(r['losses'][-10:]):.4f} |")
    la, lb, lc = (np.array(r["losses"]) for r in results.values())
    w = max(1, args.steps // 8)
    print(f"\nLoss curves (mean over windows of {w} steps):\n")
    print("| steps | A | B | C |")
    print("|---|---:|---:|---:|")
    for s in range(0, args.steps, w):
        print(f"| {s + 1}-{min(s + w, args.steps)} | {la[s:s + w].mean():.4f} | {lb[s:s + w].mean():.4f} | "
              f"{lc[s:s + w].mean():.4f} |")
    print(f"\nmax |A - B| per step: {np.abs(la - lb).max():.2e} (same data and noise: float rounding only)")
    print(f"max relative |A - C| over windows: "
          f"{max(abs(la[s:s + w].mean() - lc[s:s + w].mean()) / la[s:s + w].mean() for s in range(0, args.steps, w)):.2%}"
          " (bf16 rounding)")


if __name__ == "__main__":
    main()
