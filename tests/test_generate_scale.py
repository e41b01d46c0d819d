"""Submission-scale generation: SIGKILL at random moments then rerun, and multi-process sharding.

Each kill/rerun cycle runs the real CLI in a subprocess. After every kill, every image under its final name must
already be complete and identical to the uninterrupted run's (writes go to a temp name, then rename); at the end the
folder must hold exactly N valid images matching the manifest.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.generate import GENERATION_JSON, MANIFEST, TestPatternGenerator, check_images_dir, generate_images, image_name
from harness.prompts import format_prompt_file, read_prompt_file, shipped_dev_captions, synthesize_test_prompts
from harness.runs import create_run


def _prompt_file(tmp_path: Path, n: int, unique: int) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text(format_prompt_file(synthesize_test_prompts(shipped_dev_captions(), n=n, n_unique=unique, seed=0)),
                 encoding="utf-8")
    return p


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *map(str, args)]


def _env() -> dict[str, str]:
    return {**os.environ, "HARNESS_NO_PROGRESS": "1"}


def _kill_loop(tmp_path: Path, n_prompts: int, min_kills: int, seed: int) -> tuple[int, int]:
    """Kill `harness generate` at random moments until `min_kills` kills landed mid-generation (some images written,
    some not), then let it finish. Returns (kills, kills that landed mid-generation)."""
    prompts_path = _prompt_file(tmp_path, n_prompts, unique=min(60, n_prompts))
    pf = read_prompt_file(prompts_path)
    prompts = pf.prompts
    ref_dir = tmp_path / "reference"
    generate_images(TestPatternGenerator(48), prompts, ref_dir, batch_size=5, prompts_sha256=pf.sha256)
    reference = {i: (ref_dir / image_name(i)).read_bytes() for i in range(1, n_prompts + 1)}

    run = create_run("test-pattern", {"size": 48, "delay_s": 0.01}, run_id="killed")
    rng = random.Random(seed)
    kills = mid = 0
    for _ in range(10 * min_kills):
        if mid >= min_kills:
            break
        proc = subprocess.Popen(_cli("generate", run.dir, "--prompts", prompts_path, "--batch-size", "5"),
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 3.0))
        if proc.poll() is not None:
            break  # finished on its own before this kill: the rest of the images are there
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        done = list(run.images_dir.glob("*.png"))
        mid += 0 < len(done) < n_prompts
        # Invariant after every kill: whatever carries a final name is complete and correct.
        for p in done:
            assert p.read_bytes() == reference[int(p.stem)], f"{p.name} differs after kill {kills}"
    res = subprocess.run(_cli("generate", run.dir, "--prompts", prompts_path, "--batch-size", "5"),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert check_images_dir(run.images_dir, prompts) == []
    pngs = sorted(run.images_dir.glob("*.png"))
    assert [p.name for p in pngs] == [image_name(i) for i in range(1, n_prompts + 1)]
    assert all(p.read_bytes() == reference[int(p.stem)] for p in pngs)
    leftovers = {p.name for p in run.images_dir.iterdir()} - {p.name for p in pngs} - {MANIFEST, GENERATION_JSON}
    assert not leftovers, leftovers
    return kills, mid


def test_sigkill_then_rerun_gives_exact_images(tmp_path):
    kills, mid = _kill_loop(tmp_path, n_prompts=400, min_kills=3, seed=1)
    assert mid >= 3, (kills, mid)


@pytest.mark.slow
def test_sigkill_many_times_at_random_moments(tmp_path):
    kills, mid = _kill_loop(tmp_path, n_prompts=1500, min_kills=12, seed=2)
    assert mid >= 12, (kills, mid)


def test_two_processes_shard_without_overlap(tmp_path):
    """`--num-processes 2` relaunches under `accelerate launch` (gloo on CPU); result equals one process's."""
    prompts_path = _prompt_file(tmp_path, 60, unique=20)
    prompts = read_prompt_file(prompts_path).prompts
    run = create_run("test-pattern", {"size": 32}, run_id="two-proc")
    res = subprocess.run(_cli("generate", run.dir, "--prompts", prompts_path, "--num-processes", "2",
                              "--batch-size", "10"),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "rank 0/2" in res.stderr and "rank 1/2" in res.stderr and "complete" in res.stderr
    assert res.stderr.count("30 generated") == 2  # 6 blocks of 10: each rank did exactly half
    assert check_images_dir(run.images_dir, prompts) == []
    single = tmp_path / "single"
    generate_images(TestPatternGenerator(32), prompts, single, prompts_sha256=read_prompt_file(prompts_path).sha256)
    for i in range(1, 61):
        assert (run.images_dir / image_name(i)).read_bytes() == (single / image_name(i)).read_bytes()
