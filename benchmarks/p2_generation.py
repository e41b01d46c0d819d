"""P2: generation of N prompts - the harness vs the earlier entries' per-prompt loop; peak RSS at N=5,000 vs 500.

Both arms drive the same tiny Kandinsky 2.2 prior + decoder (models/kandinsky/testing.py) with the same steps,
guidance and resolution, and both write PNG files:

  per-prompt loop   for each prompt: KandinskyV22PriorPipeline(prompt) -> KandinskyV22Pipeline(...) at batch 1,
                    the text (and the "" negative) re-encoded on every call - what earlier entries did;
  harness           `harness.generate.generate_images` with KandinskyGenerator: batched, unique-prompt encodings
                    reused, per-index seeds, atomic PNG writes, manifest.

Peak RSS: `generate_images` in a fresh process for N = 500 and N = 5,000 prompts (260 unique, as the test file),
each process reporting its own ru_maxrss.

    python benchmarks/p2_generation.py            # prints a markdown table (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = dict(prior_steps=5, prior_guidance=4.0, decoder_steps=5, decoder_guidance=4.0)
SIZE = 32


def _prompts(n: int, unique: int) -> list[str]:
    from harness.prompts import shipped_dev_captions, synthesize_test_prompts

    return synthesize_test_prompts(shipped_dev_captions(), n=n, n_unique=unique, seed=0)


def _generator(prior_dir: Path, decoder_dir: Path):
    from harness.families.kandinsky22.train import GenerationConfig, KandinskyGenerator
    from models.kandinsky.loading import load_decoder, load_prior

    gen = GenerationConfig(**STEPS, height=SIZE, width=SIZE)
    return KandinskyGenerator(load_prior(prior_dir), load_decoder(decoder_dir), gen, SIZE, SIZE, "cpu",
                              {"family": "kandinsky-prior", "benchmark": "p2"})


def per_prompt_loop(prior_dir: Path, decoder_dir: Path, prompts: list[str], out: Path) -> float:
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from harness.generate import image_seed

    pp = KandinskyV22PriorPipeline.from_pretrained(prior_dir)
    dp = KandinskyV22Pipeline.from_pretrained(decoder_dir)
    pp.set_progress_bar_config(disable=True)
    dp.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts, start=1):
        g = torch.Generator().manual_seed(image_seed(0, i))
        emb = pp(prompt, generator=g, num_inference_steps=STEPS["prior_steps"],
                 guidance_scale=STEPS["prior_guidance"])
        img = dp(image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds, generator=g,
                 num_inference_steps=STEPS["decoder_steps"], guidance_scale=STEPS["decoder_guidance"],
                 height=SIZE, width=SIZE).images[0]
        img.save(out / f"{i:05d}.png")
    return time.perf_counter() - t0


def harness_arm(prior_dir: Path, decoder_dir: Path, prompts: list[str], out: Path, batch_size: int) -> float:
    from harness.generate import generate_images

    gen = _generator(prior_dir, decoder_dir)
    t0 = time.perf_counter()
    generate_images(gen, prompts, out, batch_size=batch_size)
    return time.perf_counter() - t0


def rss_child(prior_dir: str, decoder_dir: str, n: int, out: str, batch_size: int) -> None:
    """Run in a fresh process: generate n images, print peak RSS (MiB) and seconds as JSON."""
    torch.set_num_threads(1)
    secs = harness_arm(Path(prior_dir), Path(decoder_dir), _prompts(n, 260), Path(out), batch_size)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"n": n, "peak_rss_mib": peak_mib, "seconds": secs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="prompts in the speed comparison")
    ap.add_argument("--unique", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rss-ns", default="500,5000", help="prompt counts for the peak-RSS comparison")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rss-child", nargs=4, metavar=("PRIOR", "DECODER", "N", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        p, d, n, out = args.rss_child
        rss_child(p, d, int(n), out, args.batch_size)
        return

    from models.kandinsky.testing import save_tiny_kandinsky

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prior_dir, decoder_dir = save_tiny_kandinsky(tmp / "models")
        prompts = _prompts(args.n, args.unique)
        loop_s = per_prompt_loop(prior_dir, decoder_dir, prompts, tmp / "loop")
        ours_s = harness_arm(prior_dir, decoder_dir, prompts, tmp / "harness", args.batch_size)

        rss = []
        env = {**os.environ, "HARNESS_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(args.threads)}
        for n in map(int, args.rss_ns.split(",")):
            res = subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size), "--rss-child",
                                  str(prior_dir), str(decoder_dir), str(n), str(tmp / f"rss-{n}")],
                                 capture_output=True, text=True, env=env, check=True)
            rss.append(json.loads(res.stdout.strip().splitlines()[-1]))

    print(f"# P2 generation ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} thread(s))\n")
    print(f"Config: tiny Kandinsky 2.2 prior+decoder (models/kandinsky/testing.py), {SIZE}x{SIZE} px, "
          f"prior {STEPS['prior_steps']} steps / decoder {STEPS['decoder_steps']} steps, guidance 4.0, "
          f"{args.n} prompts ({args.unique} unique), harness batch {args.batch_size}.\n")
    print("| arm | seconds | images/s | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| per-prompt pipeline loop, batch 1 | {loop_s:.2f} | {args.n / loop_s:.1f} | 1.0x |")
    print(f"| harness generate (batched, encodings reused) | {ours_s:.2f} | {args.n / ours_s:.1f} | "
          f"**{loop_s / ours_s:.1f}x** |")
    print("\n| N prompts | peak RSS (MiB) | seconds |")
    print("|---:|---:|---:|")
    for r in rss:
        print(f"| {r['n']:,} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |")
    if len(rss) == 2:
        print(f"\nPeak RSS N={rss[1]['n']:,} / N={rss[0]['n']:,}: **{rss[1]['peak_rss_mib'] / rss[0]['peak_rss_mib']:.3f}**"
              " (goal: within 10 %)")


if __name__ == "__main__":
    main()
