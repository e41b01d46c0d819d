"""P5: can the data pipeline keep a GPU busy at the MSDM paper preset?

Three measurements, printed as markdown tables:
  1. Loader throughput (items/s) of the real training loader (`harness.trainer._micro_batch_loader` over
     `CaptionedImages` with the paper UNet's data config: 256 px, pad, jitter 0.4, context dropout 0.2, one item per
     caption row), on the real dev images (../shared/data/imageclef2024/dev-256, else the shipped sample), in the
     main process vs with DataLoader workers. Goal: workers >= 2x the main process on 2 cores.
  2. The same loader on full-resolution JPEGs (../shared/data/imageclef2024/full-res-sample, if present): decoding
     at the training resolution (PIL draft, jitter after the resize) vs the previous path (full-size decode, jitter
     at full size, then resize).
  3. The paper preset's training step (UNet 323.7 M fwd + bwd + AdamW, self-conditioning pass with p = 0.5, VAE
     encode because the jittered images cannot be cached), measured on whatever device is present, and its FLOPs
     (torch.utils.flop_counter). From the FLOPs: the step time of a GPU at an ASSUMED utilisation, hence the items/s
     the loader must deliver and the workers that takes - GPU figures are ESTIMATES, not measurements.

    python benchmarks/p5_msdm_pipeline.py                      # ~3-6 min on 2 CPU cores
    python benchmarks/p5_msdm_pipeline.py --items 256 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HARNESS_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "imageclef2024" / "dev-256"
FULLRES = REPO.parent / "shared" / "data" / "imageclef2024" / "full-res-sample"
# Dense bf16 tensor-core peaks (vendor datasheets) and the utilisation assumed for a conv/attention UNet.
GPU_PEAK_TFLOPS = {"A100 (bf16)": 312.0, "H100 SXM (bf16)": 989.0}
ASSUMED_MFU = 0.35


class _Collate:
    def collate(self, items):
        from harness.families.msdm.data import collate

        return collate(items)


def loader_rate(dataset, workers: int, items: int, batch: int, wait_per_item: float = 0.0,
                cpu: list | None = None) -> float:
    """Items/s of the training loader over `items` items (after the workers' first batch). `wait_per_item` > 0
    stands for a GPU step: the training process waits (sleeps, using no CPU) that long per item after each batch,
    as it would wait for the GPU; the workers keep decoding meanwhile."""
    from harness.trainer import ShardedBatches, _micro_batch_loader

    plan = ShardedBatches(len(dataset), batch, seed=0)
    it = iter(_micro_batch_loader(_Collate(), dataset, plan, 0, workers, pin=False))
    next(it)  # worker start-up and the first batch are not throughput
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n < items:
        b = len(next(it)["pixels"])
        n += b
        if wait_per_item:
            time.sleep(wait_per_item * b)
    rate = n / (time.perf_counter() - t0)
    if cpu is not None:  # CPU time of the training process itself per item (workers not counted)
        cpu.append((time.process_time() - c0) / n)
    del it
    return rate


def old_path_rate(dataset, items: int) -> float:
    """Items/s of the previous item path: full-size decode, full-size jitter, then resize + pad (main process)."""
    import torch
    from PIL import ImageEnhance

    from harness.dataset import _place, _resize, _to_tensor, item_rng
    from harness.images import open_rgb

    t0 = time.perf_counter()
    for index in range(items):
        rng = item_rng(0, 0, index)
        i, _ = dataset.caption_for(index, rng)
        img = open_rgb(dataset.devset.image_path(dataset.image_ids[i]))
        b, c = rng.uniform(0.6, 1.4, size=2)
        img = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(float(b))).enhance(float(c))
        r = dataset.cfg.resolution
        torch.stack([_to_tensor(_place(_resize(img, r, "pad"), r, "pad"))])
    return items / (time.perf_counter() - t0)


def paper_step(device, batch: int, steps: int):
    """(seconds per step, FLOPs per item) of the paper preset's UNet training step incl. VAE encode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.msdm.presets import get_preset
    from models.msdm.unet import MSDMUNet
    from models.msdm.vae import MSDMAutoencoder

    p = get_preset("paper")
    torch.manual_seed(0)
    if steps == 0:
        device = torch.device("meta")
    unet = MSDMUNet(context_dim=768, **p.unet).to(device)
    vae = MSDMAutoencoder(**p.vae).to(device).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 256, 256, device=device)
    ctx, mask = torch.randn(batch, 77, 768, device=device), torch.ones(batch, 77, dtype=torch.bool, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step(self_cond: bool):
        with torch.no_grad():
            mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        sc = None
        if self_cond:
            with torch.no_grad():
                sc = unet(z, t, ctx, mask, None)
        loss = (unet(z, t, ctx, mask, sc) - z).abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if steps == 0:  # FLOPs only: run on the meta device, nothing is computed
        with FlopCounterMode(display=False) as fc_plain:
            step(False)
        with FlopCounterMode(display=False) as fc_sc:
            step(True)
        return None, 0.5 * (fc_plain.get_total_flops() + fc_sc.get_total_flops()) / batch  # self-cond p = 0.5
    step(False)  # first-call overheads
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(steps):
        step(k % 2 == 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=384, help="Items timed per loader configuration.")
    ap.add_argument("--batch-size", type=int, default=16, help="Loader batch size.")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--step-batch", type=int, default=1, help="Batch of the measured paper-preset step.")
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()

    import torch

    from harness.data import load_devset
    from harness.dataset import CaptionedImages, DatasetConfig
    from harness.sample import sample_dir

    paper_data = DatasetConfig(resolution=256, fit="pad", jitter=0.4, caption_dropout=0.2, captions="all")
    data = DEV if (DEV / "prompt-gt.csv").is_file() else sample_dir()
    dev = load_devset(data)
    ds = CaptionedImages(dev, dev.images(), paper_data)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n## P5 MSDM data pipeline vs the paper-preset step\n")
    print(f"machine: {platform.machine()}, {cores} cores, torch {torch.__version__}; data: {data} "
          f"({len(dev.images())} images, {len(ds)} caption rows); loader batch {args.batch_size}, "
          f"{args.items} items timed per row (after the first batch)\n")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    _, flops = paper_step(device, 1, 0)
    a100 = ASSUMED_MFU * GPU_PEAK_TFLOPS["A100 (bf16)"] * 1e12 / flops  # items/s of the estimated A100 step

    rows = []
    for w in [0, *args.workers]:
        name = "main process (num_workers=0)" if w == 0 else f"{w} worker process(es)"
        cpu: list[float] = []
        rows.append((name, loader_rate(ds, w, args.items, args.batch_size, cpu=cpu),
                     loader_rate(ds, w, args.items, args.batch_size, wait_per_item=1 / a100), cpu[0]))
    base, base_gpu = rows[0][1], rows[0][2]
    print("### 1. Training loader at 256 px (paper data config), dev images\n")
    print(f"| loader | items/s, loader alone | vs main | items/s with a GPU step in the loop (ESTIMATE: A100 step "
          f"{1000 / a100:.2f} ms/item, simulated as a wait) | vs main | training-process CPU ms per item |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r, g, c in rows:
        print(f"| {name} | {r:.1f} | {r / base:.2f}x | {g:.1f} | {g / base_gpu:.2f}x | {1000 * c:.2f} |")
    best_gpu = max(g for _, _, g, _ in rows[1:])
    per_worker = 1 / rows[0][3]  # a worker spends what the main process spends per item: its CPU time, on one core
    print(f"\ntraining-process CPU per item, main process / {args.workers[-1]} workers = "
          f"**{rows[0][3] / rows[-1][3]:.1f}x** less: the time the training process no longer spends on data "
          "(independent of how busy the machine is).")
    print(f"\nwith the GPU step in the loop, best with workers / main process = **{best_gpu / base_gpu:.2f}x** "
          f"(goal >= 2x on 2 cores: {'met' if best_gpu >= 2 * base_gpu else 'not met'}). Loader alone, the main "
          "process has the whole machine to itself and the workers add the cost of sending each float32 item "
          "(768 KiB at 256 px) between processes, so workers pay off only when the training process is busy "
          "elsewhere - which is what a GPU step makes it.")

    if (FULLRES / "prompt-gt.csv").is_file():
        full = load_devset(FULLRES)
        fds = CaptionedImages(full, full.images(), paper_data)
        n = min(48, len(fds))
        new = loader_rate(fds, 0, n, 8)
        old = old_path_rate(fds, n)
        print(f"\n### 2. One item from a full-resolution JPEG ({FULLRES.name}, {n} items, main process)\n")
        print("| item path | items/s | ms/item |")
        print("|---|---:|---:|")
        print(f"| before: full-size decode + full-size jitter + resize | {old:.1f} | {1000 / old:.1f} |")
        print(f"| now: decode at training resolution (draft) + resize + jitter | {new:.1f} | {1000 / new:.1f} |")
        print(f"\nspeed-up: **{new / old:.2f}x**")

    s_step, _ = paper_step(device, args.step_batch, args.steps)
    print("\n### 3. Paper-preset training step (UNet 256/512/1024 + VAE encode, 256 px) vs the loader\n")
    print(f"FLOPs per item (fwd + bwd, VAE encode, self-conditioning p = 0.5; counted by torch.utils.flop_counter on "
          f"the meta device): {flops / 1e9:.0f} GFLOP\n")
    print(f"| where | step time per item | items/s the loader must deliver | workers needed (at {per_worker:.0f} "
          "items/s per worker = 1 / the main process's CPU time per item measured above) |")
    print("|---|---:|---:|---:|")
    meas = args.step_batch / s_step
    print(f"| measured: {dev_name}, fp32, batch {args.step_batch} | {1000 * s_step / args.step_batch:.0f} ms | "
          f"{meas:.2f} | {max(1, -(-meas // per_worker)):.0f} |")
    for gpu, tflops in GPU_PEAK_TFLOPS.items():
        items_s = ASSUMED_MFU * tflops * 1e12 / flops
        print(f"| ESTIMATE: {gpu}, {ASSUMED_MFU:.0%} of peak, batch 64 | {1000 / items_s:.2f} ms | {items_s:.0f} | "
              f"{-(-items_s // per_worker):.0f} |")
    print(f"\nGPU rows are estimates from the counted FLOPs and an assumed {ASSUMED_MFU:.0%} utilisation of the "
          "datasheet bf16 peak (no GPU was available here); the worker counts assume one free core per worker, each "
          "spending the CPU time per item the main process spent above.")


if __name__ == "__main__":
    main()
