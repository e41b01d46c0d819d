"""P5: can the data pipeline keep a GPU busy at the MSDM paper preset?

Three measurements, printed as markdown tables:
  1. Loader throughput (items/s) of the real training loader (`harness.trainer._micro_batch_loader` over
     `CaptionedImages` with the paper UNet's data config: 256 px, pad, jitter 0.4, context dropout 0.2, one item per
     caption row), on the real dev images (../shared/data/imageclef2024/dev-256, else the shipped sample), in the
     main process vs with DataLoader workers, side by side for the two item contracts: "float32" (before: items
     converted to [-1, 1] in the loader, 768 KiB each at 256 px) and "uint8" (now: 196 KiB items, converted on the
     training device by `harness.dataset.to_model_pixels`). Goal: workers >= 2x the main process on 2 cores.
     Each row is timed alone and with a simulated GPU step in the loop (the training process sleeps as long as the
     ESTIMATED step of a GPU would take, see 3.). The load average is printed: on a shared machine, rows move;
     a second table predicts the rows for idle cores from the CPU time each process spent per item.
  2. The same loader on full-resolution JPEGs (../shared/data/imageclef2024/full-res-sample, if present): decoding
     at the training resolution (PIL draft, jitter after the resize) vs the previous path (full-size decode, jitter
     at full size, then resize).
  3. The paper preset's training step (UNet 323.7 M fwd + bwd + AdamW, self-conditioning pass with p = 0.5, VAE
     encode because the jittered images cannot be cached), measured on whatever device is present, and its FLOPs
     (torch.utils.flop_counter). From the FLOPs: the step time of a GPU at an ASSUMED utilisation, hence the items/s
     the loader must deliver and the workers that takes - GPU figures are ESTIMATES, not measurements.

    python benchmarks/p5_msdm_pipeline.py                      # ~2-3 min on 2 idle CPU cores
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


class FloatItems:
    """The item contract before uint8: the same items converted to float32 [-1, 1] in the loader (in the worker
    processes when there are any). Bit-identical to the old items (tests/test_dataset.py checks it)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from harness.dataset import to_model_pixels

        item = dict(self.dataset[index])
        item["pixels"] = to_model_pixels(item["pixels"])
        return item


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc; 0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def loader_rate(dataset, workers: int, items: int, batch: int, wait_per_item: float = 0.0,
                cpu: list | None = None) -> float:
    """Items/s of the training loader over `items` items, timed after a warm-up of 1 + 2 x workers batches (worker
    start-up, and the batches the workers had prefetched - `prefetch_factor` 2 each - which would otherwise count as
    delivered for free). `wait_per_item` > 0 stands for a GPU step: the training process waits (sleeps, using no
    CPU) that long per item after each batch, as it would wait for the GPU; the workers keep decoding meanwhile.
    Batches are pinned as the trainer pins them when a GPU is present. `cpu` receives CPU seconds per item of
    (the training process over the timed window, the worker processes over their whole life divided by every item
    they made - the ones still waiting in the prefetch queue included): CPU time depends much less than wall time
    on what else the machine is running (not at all only on an idle machine: caches are shared)."""
    import torch

    from harness.trainer import ShardedBatches, _micro_batch_loader

    class CountingPlan(ShardedBatches):  # counts the batches handed to the workers
        sent = 0

        def indices(self, k):
            self.sent += 1
            return super().indices(k)

    plan = CountingPlan(len(dataset), batch, seed=0)
    it = iter(_micro_batch_loader(_Collate(), dataset, plan, 0, workers, pin=torch.cuda.is_available()))
    for _ in range(1 + 2 * workers):  # start-up and the prefetched batches are not throughput
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n < items:
        b = len(next(it)["pixels"])
        n += b
        if wait_per_item:
            time.sleep(wait_per_item * b)
    rate = n / (time.perf_counter() - t0)
    if cpu is not None:
        main_cpu = (time.process_time() - c0) / n
        last, t_end = -1.0, time.perf_counter() + 10
        while pids and time.perf_counter() < t_end:  # let the workers finish what they were sent, then read
            time.sleep(0.2)
            now = sum(map(_cpu_seconds, pids))
            if now - last < 0.005:
                break
            last = now
        cpu.append((main_cpu, last / (plan.sent * batch) if pids else 0.0))
    del it
    return rate


def conversion_cost(device, batch: int, reps: int = 20) -> float:
    """Seconds per item of `to_model_pixels` on `device` for a uint8 batch at 256 px (host -> device copy
    included): what the uint8 contract adds to the training step."""
    import torch

    from harness.dataset import to_model_pixels

    x = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    if device.type == "cuda":
        x = x.pin_memory()
    to_model_pixels(x, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        to_model_pixels(x, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (reps * batch)


def old_path_rate(dataset, items: int) -> float:
    """Items/s of the item path before the draft decode: full-size decode, full-size jitter, then resize + pad,
    float32 in the loader (main process)."""
    import torch
    from PIL import ImageEnhance

    from harness.dataset import _place, _resize, _to_uint8, item_rng, to_model_pixels
    from harness.images import open_rgb

    t0 = time.perf_counter()
    for index in range(items):
        rng = item_rng(0, 0, index)
        i, _ = dataset.caption_for(index, rng)
        img = open_rgb(dataset.devset.image_path(dataset.image_ids[i]))
        b, c = rng.uniform(0.6, 1.4, size=2)
        img = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(float(b))).enhance(float(c))
        r = dataset.cfg.resolution
        torch.stack([to_model_pixels(_to_uint8(_place(_resize(img, r, "pad"), r, "pad")))])
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


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1024, help="Items timed per loader configuration.")
    ap.add_argument("--batch-size", type=int, default=64, help="Loader batch size (the paper preset's).")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-float", action="store_true", help="Time the uint8 items only (skip the 'before' rows).")
    ap.add_argument("--step-batch", type=int, default=1, help="Batch of the measured paper-preset step.")
    ap.add_argument("--steps", type=int, default=1, help="Paper-preset steps timed (0: FLOPs only, no timing).")
    args = ap.parse_args()

    import torch

    from harness.data import load_devset
    from harness.dataset import CaptionedImages, DatasetConfig
    from harness.sample import sample_dir

    t_start = time.perf_counter()
    paper_data = DatasetConfig(resolution=256, fit="pad", jitter=0.4, caption_dropout=0.2, captions="all")
    data = DEV if (DEV / "prompt-gt.csv").is_file() else sample_dir()
    dev = load_devset(data)
    ds = CaptionedImages(dev, dev.images(), paper_data)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print("\n## P5 MSDM data pipeline vs the paper-preset step\n")
    print(f"machine: {platform.machine()}, {cores} cores, torch {torch.__version__}; data: {data} "
          f"({len(dev.images())} images, {len(ds)} caption rows); loader batch {args.batch_size}, "
          f"{args.items} items timed per row (after 1 + 2 x workers warm-up batches), "
          f"pin_memory={device.type == 'cuda'}; "
          f"load average at start: {_load()}\n")
    _, flops = paper_step(device, 1, 0)
    gpu_wait = {gpu: 1 / (ASSUMED_MFU * tflops * 1e12 / flops) for gpu, tflops in GPU_PEAK_TFLOPS.items()}

    rows = []  # (contract, workers, alone, {gpu: with step}, (training-process, workers) CPU s/item)
    for contract in (["float32", "uint8"] if not args.no_float else ["uint8"]):
        source = FloatItems(ds) if contract == "float32" else ds
        for w in [0, *args.workers]:
            cpu: list[tuple[float, float]] = []
            alone = loader_rate(source, w, args.items, args.batch_size, cpu=cpu)
            stepped = {gpu: loader_rate(source, w, args.items, args.batch_size, wait_per_item=t)
                       for gpu, t in gpu_wait.items()}
            rows.append((contract, w, alone, stepped, cpu[0]))
    load_after = _load()
    base = {c: r for c, w, *r in rows if w == 0}
    gpus = list(gpu_wait)
    short = {g: g.split(" ")[0] for g in gpus}
    print("### 1. Training loader at 256 px (paper data config), dev images\n")
    print("Measured (wall clock; on a busy machine these move with the load):\n")
    print("| items | loader | items/s, loader alone | vs main | "
          + " | ".join(f"items/s with a simulated {g} step ({1000 * gpu_wait[g]:.2f} ms/item, ESTIMATE) | vs main"
                       for g in gpus) + " |")
    print("|---|---|---:|---:|" + "---:|---:|" * len(gpus))
    for contract, w, alone, stepped, _ in rows:
        b_alone, b_step, _ = base[contract]
        name = "main process (num_workers=0)" if w == 0 else f"{w} worker process(es)"
        cells = " | ".join(f"{stepped[g]:.1f} | {stepped[g] / b_step[g]:.2f}x" for g in gpus)
        print(f"| {contract} | {name} | {alone:.1f} | {alone / b_alone:.2f}x | {cells} |")
    print(f"\nload average after the loader rows: {load_after}")

    # The same rows from CPU time, which hardly depends on the load: on `cores` idle cores a loader with w workers
    # delivers at most cores / (m + k) items/s (all its CPU work spread over the cores), w / k (one core per
    # worker) and 1 / (s + m) (the training process: its own CPU m per item plus the step s it waits for).
    def model(w, m, k, s):
        return 1 / (s + m) if w == 0 else min(cores / (m + k), w / k if k else float("inf"), 1 / (s + m))

    print(f"\nPredicted for {cores} idle cores from the CPU time each process spent per item (measured above):\n")
    print("| items | loader | training-process CPU ms/item | worker processes' CPU ms/item | items/s, loader alone "
          "| vs main | " + " | ".join(f"items/s with the {short[g]} step | vs main" for g in gpus) + " |")
    print("|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(gpus))
    pred = {}
    for contract, w, _, _, (m, k) in rows:
        d = base[contract][2][0]
        p = [model(w, m, k, 0.0)] + [model(w, m, k, gpu_wait[g]) for g in gpus]
        p0 = [model(0, d, 0.0, 0.0)] + [model(0, d, 0.0, gpu_wait[g]) for g in gpus]
        pred[(contract, w)] = [a / b for a, b in zip(p, p0)]
        name = "main process (num_workers=0)" if w == 0 else f"{w} worker process(es)"
        cells = " | ".join(f"{a:.0f} | {a / b:.2f}x" for a, b in zip(p, p0))
        print(f"| {contract} | {name} | {1000 * m:.2f} | {1000 * k:.2f} | {cells} |")

    u = [r for r in rows if r[0] == "uint8"]
    best_alone = max(r[2] for r in u[1:]) / u[0][2]
    best_step = {g: max(r[3][g] for r in u[1:]) / u[0][3][g] for g in gpus}
    best_pred = [max(pred[("uint8", w)][j] for w in args.workers) for j in range(1 + len(gpus))]
    print(f"\nuint8 items, best with workers / main process, measured: loader alone **{best_alone:.2f}x**, "
          + ", ".join(f"with the {short[g]} step **{best_step[g]:.2f}x**" for g in gpus)
          + f"; predicted for {cores} idle cores: loader alone **{best_pred[0]:.2f}x**, "
          + ", ".join(f"with the {short[g]} step **{best_pred[1 + j]:.2f}x**" for j, g in enumerate(gpus))
          + ". Goal >= 2x on 2 cores.")
    d = u[0][4][0]
    print(f"\nWhy these ceilings: loader alone, {cores} workers on {cores} cores can at best multiply the main "
          "process by the core count, less what the training process itself spends per item with workers "
          "(receiving batches) and any per-item cost a worker adds. With a GPU step of s ms/item the main process "
          f"needs s + d per item (d = its CPU per item, here {1000 * d:.2f} ms) and workers at best s, so the ratio "
          "is at most 1 + d/s: " + ", ".join(f"{short[g]} {1 + d / gpu_wait[g]:.2f}x" for g in gpus)
          + ". A slow step hides the data time; a fast one (or an expensive item) exposes it.")
    if not args.no_float:
        f0, fw = [r for r in rows if r[0] == "float32"][0], [r for r in rows if r[0] == "float32"][-1]
        print(f"\nuint8 vs float32 items with {u[-1][1]} workers, loader alone: **{u[-1][2] / fw[2]:.2f}x**; "
              f"main process alone: {u[0][2] / f0[2]:.2f}x.")
    conv = conversion_cost(device, args.batch_size)
    print(f"\n`to_model_pixels` (uint8 -> float32 [-1, 1]) on {dev_name}: {1e6 * conv:.0f} us per item"
          + (" (host -> device copy from pinned memory included)" if device.type == "cuda" else
             " - on this CPU-only machine the training process pays it; on a GPU it is one elementwise kernel") + ".")

    if (FULLRES / "prompt-gt.csv").is_file():
        full = load_devset(FULLRES)
        fds = CaptionedImages(full, full.images(), paper_data)
        n = min(48, len(fds))
        new = loader_rate(fds, 0, n, 8)
        old = old_path_rate(fds, n)
        print(f"\n### 2. One item from a full-resolution JPEG ({FULLRES.name}, {n} items, main process)\n")
        print("| item path | items/s | ms/item |")
        print("|---|---:|---:|")
        print(f"| before: full-size decode + full-size jitter + resize, float32 item | {old:.1f} | {1000 / old:.1f} |")
        print(f"| now: decode at training resolution (draft) + resize + jitter, uint8 item | {new:.1f} | "
              f"{1000 / new:.1f} |")
        print(f"\nspeed-up: **{new / old:.2f}x**")

    per_worker = 1 / u[0][4][0]  # a worker spends what the main process spends per item: its CPU time, on one core
    print("\n### 3. Paper-preset training step (UNet 256/512/1024 + VAE encode, 256 px) vs the loader\n")
    print(f"FLOPs per item (fwd + bwd, VAE encode, self-conditioning p = 0.5; counted by torch.utils.flop_counter on "
          f"the meta device): {flops / 1e9:.0f} GFLOP\n")
    print(f"| where | step time per item | items/s the loader must deliver | workers needed (at {per_worker:.0f} "
          "items/s per worker = 1 / the main process's CPU time per item, uint8, measured above) |")
    print("|---|---:|---:|---:|")
    if args.steps:
        s_step, _ = paper_step(device, args.step_batch, args.steps)
        meas = args.step_batch / s_step
        print(f"| measured: {dev_name}, fp32, batch {args.step_batch} | {1000 * s_step / args.step_batch:.0f} ms | "
              f"{meas:.2f} | {max(1, -(-meas // per_worker)):.0f} |")
    for gpu, t in gpu_wait.items():
        print(f"| ESTIMATE: {gpu}, {ASSUMED_MFU:.0%} of peak, batch 64 | {1000 * t:.2f} ms | {1 / t:.0f} | "
              f"{-(-(1 / t) // per_worker):.0f} |")
    print(f"\nGPU rows are estimates from the counted FLOPs and an assumed {ASSUMED_MFU:.0%} utilisation of the "
          "datasheet bf16 peak (unless a GPU is named in the measured row); the worker counts assume one free core "
          "per worker, each spending the CPU time per item the main process spent above.")
    print(f"\nload average at the end: {_load()}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
