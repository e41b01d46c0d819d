"""P8: the attribute classifier's training step on CPU (the goal: the from-scratch variant trains to a useful level
on CPU in minutes at 128 px; tests/test_attributes_slow.py checks the "useful level" with 150 steps of 32).

Times one optimizer step (forward + BCE + backward + AdamW, the shared loop's work without its bookkeeping) of
`models.attributes.AttributeClassifier` on random images, for each backbone and image size, with the thread count
given, and prints seconds per step and the projected time of the default budget (600 steps) and of the slow test's
(150 steps). Load from other processes inflates every number: run it on an idle machine.

    python benchmarks/p8_attributes_cpu.py                       # resnet18 at 64 / 128 px, 2 threads
    python benchmarks/p8_attributes_cpu.py --backbones resnet18 mobilenet_v3_small --sizes 128 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_seconds(backbone: str, size: int, batch: int, labels: int, steps: int) -> float:
    import torch

    from models.attributes import AttributeClassifier

    torch.manual_seed(0)
    model = AttributeClassifier(labels=tuple(f"l{i}" for i in range(labels)), backbone=backbone, image_size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    y = (torch.rand(batch, labels) < 0.3).float()
    times = []
    for i in range(steps + 1):  # the first step (allocations) is not counted
        t = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]  # median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["resnet18"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--labels", type=int, default=40, help="about the dev set's label count at --min-count 20")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'backbone':<20} {'px':>4} {'s/step':>8} {'150 steps':>10} {'600 steps':>10}")
    for bb in args.backbones:
        for size in args.sizes:
            s = step_seconds(bb, size, args.batch_size, args.labels, args.steps)
            print(f"{bb:<20} {size:>4} {s:>8.2f} {s * 150 / 60:>8.1f} m {s * 600 / 60:>8.1f} m")


if __name__ == "__main__":
    main()
