"""The generation driver: per-index seeds, batch-size invariance, resume after partial output, sharding."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from harness.errors import UserError
from harness.generate import (
    TestPatternGenerator,
    check_images_dir,
    generate_images,
    image_name,
    image_seed,
)
from harness.runs import create_run

PROMPTS = [
    "Generate an image containing a polyp.",
    "Generate an image with no polyps.",
    "Generate an image containing a polyp.",  # repeated prompt, different index -> different image
    "Generate an image with an an instrument located in the upper-left.",
    "Generate an image from a gastroscopy procedure.",
    "Generate an image with 2 findings.",
    "Generate an image containing text.",
]


def _bytes(d, n=len(PROMPTS)):
    return [(d / image_name(i)).read_bytes() for i in range(1, n + 1)]


def test_image_seed_is_stable_and_distinct():
    assert image_seed(0, 1) == image_seed(0, 1)
    seeds = {image_seed(0, i) for i in range(1, 5001)}
    assert len(seeds) == 5000
    assert image_seed(0, 1) != image_seed(1, 1)


def test_batch_size_does_not_change_images(tmp_path):
    gen = TestPatternGenerator(size=32)
    a = generate_images(gen, PROMPTS, tmp_path / "a", batch_size=1)
    b = generate_images(gen, PROMPTS, tmp_path / "b", batch_size=3)
    assert a.generated == b.generated == len(PROMPTS)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    # the repeated prompt at index 1 and 3 gets different seeds, hence different images
    assert (tmp_path / "a" / image_name(1)).read_bytes() != (tmp_path / "a" / image_name(3)).read_bytes()
    rows = list(csv.DictReader(open(tmp_path / "a" / "manifest.csv", encoding="utf-8")))
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["filename"] for r in rows] == [image_name(i) for i in range(1, 8)]
    assert check_images_dir(tmp_path / "a", PROMPTS) == []


def test_resume_regenerates_only_missing_or_broken(tmp_path):
    gen = TestPatternGenerator(size=32)
    d = tmp_path / "imgs"
    generate_images(gen, PROMPTS, d, batch_size=4)
    reference = _bytes(d)
    (d / image_name(2)).unlink()                                           # killed before this one
    (d / image_name(5)).write_bytes(reference[4][: len(reference[4]) // 2])  # truncated by an old writer
    (d / ".00006.png.tmp-abc").write_bytes(b"partial")                       # temp left by SIGKILL
    report = generate_images(gen, PROMPTS, d, batch_size=4)
    assert report.generated == 2 and report.skipped == len(PROMPTS) - 2
    assert _bytes(d) == reference
    assert not list(d.glob(".*tmp-*"))


def test_other_prompt_file_is_refused_without_overwrite(tmp_path):
    gen = TestPatternGenerator(size=32)
    d = tmp_path / "imgs"
    generate_images(gen, PROMPTS, d, prompts_sha256="aaa")
    with pytest.raises(UserError, match="different prompt file"):
        generate_images(gen, PROMPTS[:3], d, prompts_sha256="bbb")
    with pytest.raises(UserError, match="different prompt file"):
        generate_images(gen, PROMPTS, d, prompts_sha256="aaa", base_seed=1)
    report = generate_images(gen, PROMPTS[:3], d, prompts_sha256="bbb", overwrite=True)
    assert report.generated == 3


def test_shards_are_disjoint_and_complete(tmp_path):
    gen = TestPatternGenerator(size=32)
    d = tmp_path / "imgs"
    r0 = generate_images(gen, PROMPTS, d, shard=(0, 2), batch_size=2)
    assert check_images_dir(d, PROMPTS)  # half missing
    r1 = generate_images(gen, PROMPTS, d, shard=(1, 2), batch_size=2)
    assert r0.generated + r1.generated == len(PROMPTS)
    assert check_images_dir(d, PROMPTS) == []
    generate_images(gen, PROMPTS, tmp_path / "single")
    assert _bytes(d) == _bytes(tmp_path / "single")


def test_bad_generator_output_is_caught(tmp_path):
    import numpy as np

    class Grey(TestPatternGenerator):
        def generate(self, prompts, seeds):
            return [np.zeros((8, 8), dtype=np.uint8) for _ in prompts]

    with pytest.raises(ValueError, match="expected uint8"):
        generate_images(Grey(), PROMPTS, tmp_path / "g")
    assert not list((tmp_path / "g").glob("*.png"))


def test_generate_cli_end_to_end(tmp_path, run_cli):
    run = create_run("test-pattern", {"size": 32}, tag="t")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    code, out, err = run_cli("generate", run.dir, "--prompts", prompts, "--batch-size", "3")
    assert code == 0, err
    assert check_images_dir(run.images_dir, PROMPTS) == []
    code, _, err = run_cli("generate", run.dir, "--prompts", prompts)  # resume: nothing to do
    assert code == 0 and "0 generated" in err.replace("\n", " ")


class _BatchSensitive(TestPatternGenerator):
    """Like real kernels, the result depends on the batch it was computed in (here: on the batch's seeds)."""

    def generate(self, prompts, seeds):
        shift = sum(seeds) % 7
        return [np.clip(img.astype(np.int16) + shift, 0, 255).astype(np.uint8)
                for img in super().generate(prompts, seeds)]


def test_resume_recomputes_whole_blocks_so_batch_effects_cannot_leak(tmp_path):
    gen = _BatchSensitive(size=16)
    ref, d = tmp_path / "ref", tmp_path / "resumed"
    generate_images(gen, PROMPTS, ref, batch_size=3)
    generate_images(gen, PROMPTS, d, batch_size=3)
    for i in (2, 7):  # one image of block [1,2,3] and the last, partial block [7]
        (d / image_name(i)).unlink()
    report = generate_images(gen, PROMPTS, d, batch_size=3)
    assert report.generated == 2 and report.skipped == len(PROMPTS) - 2
    assert _bytes(d) == _bytes(ref)


class _NaNAt(TestPatternGenerator):
    """A model whose output for one index is NaN, quantized the way the families do (clamp, round, cast to uint8):
    the NaN becomes an all-black image."""

    def __init__(self, bad_prompt_index: int, **kw):
        super().__init__(**kw)
        self.bad = PROMPTS[bad_prompt_index - 1]

    def generate(self, prompts, seeds):
        out = super().generate(prompts, seeds)
        with np.errstate(invalid="ignore"):
            nan = (np.clip(np.full((self.size, self.size, 3), np.nan), 0, 1) * 255).round().astype(np.uint8)
        return [nan if p == self.bad else img for p, img in zip(prompts, out)]


def test_non_finite_output_is_never_written(tmp_path):
    d = tmp_path / "imgs"
    with pytest.raises(UserError, match=r"image 5 \(00005\.png.*constant image \(all black\)"):
        generate_images(_NaNAt(5, size=16), PROMPTS, d, batch_size=2)
    # blocks [1,2] and [3,4] were written; block [5,6] holds the bad image: none of it was written
    assert sorted(p.name for p in d.glob("*.png")) == [image_name(i) for i in (1, 2, 3, 4)]
    assert not list(d.glob(".*tmp-*"))


def test_generate_cli_rejects_non_finite_options_before_loading(tmp_path, run_cli, monkeypatch):
    import harness.generate as G

    run = create_run("test-pattern", {"size": 16})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    monkeypatch.setattr(G, "load_generator", lambda *a: pytest.fail("model loaded before the options were checked"))
    for opt, val in [("--guidance", "nan"), ("--guidance", "-inf"), ("--steps", "0"), ("--batch-size", "0"),
                     ("--seed", "-1"), ("--device", "banana")]:
        code, out, err = run_cli("generate", run.dir, "--prompts", prompts, opt, val)
        assert code == 2 and len(err.strip().splitlines()) == 1 and opt.lstrip("-").split("-")[0] in err, err
    assert not run.images_dir.exists()


def test_overwrite_with_shorter_prompt_file_removes_stale_images(tmp_path):
    gen = TestPatternGenerator(size=16)
    d = tmp_path / "imgs"
    generate_images(gen, PROMPTS, d, prompts_sha256="long")
    report = generate_images(gen, PROMPTS[:3], d, prompts_sha256="short", overwrite=True)
    assert report.generated == 3
    assert sorted(p.name for p in d.glob("*.png")) == [image_name(i) for i in (1, 2, 3)]
    assert check_images_dir(d, PROMPTS[:3]) == []


def test_settings_are_recorded_and_a_changed_resume_warns(tmp_path):
    import json

    import torch  # noqa: F401  (a model family imports torch: the thread count is then recorded)

    gen = TestPatternGenerator(size=16)
    d = tmp_path / "imgs"
    generate_images(gen, PROMPTS, d, batch_size=3, device="cpu")
    rec = json.loads((d / "generation.json").read_text())
    assert rec["settings"] == [{"batch_size": 3, "threads": torch.get_num_threads(), "device": "cpu"}]
    # resume with the same settings: silent
    warned: list[str] = []
    (d / image_name(7)).unlink()
    generate_images(gen, PROMPTS, d, batch_size=3, device="cpu", warn=warned.append)
    assert warned == []
    # resume with another batch size: allowed, warned, and recorded
    (d / image_name(7)).unlink()
    report = generate_images(gen, PROMPTS, d, batch_size=2, device="cpu", warn=warned.append)
    assert report.generated == 1 and len(warned) == 1
    assert "batch_size 3" in warned[0] and "batch_size 2" in warned[0] and "grey level" in warned[0]
    rec = json.loads((d / "generation.json").read_text())
    assert [s["batch_size"] for s in rec["settings"]] == [3, 2]


def test_generate_cli_threads_option_is_applied_and_recorded(tmp_path, run_cli):
    import json

    import torch

    before = torch.get_num_threads()
    run = create_run("test-pattern", {"size": 16})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    try:
        code, out, err = run_cli("generate", run.dir, "--prompts", prompts, "--threads", "1", "--batch-size", "4")
        assert code == 0, err
        rec = json.loads((run.images_dir / "generation.json").read_text())
        assert rec["settings"][-1] == {"batch_size": 4, "threads": 1, "device": "cpu"}
        (run.images_dir / image_name(1)).unlink()
        code, out, err = run_cli("generate", run.dir, "--prompts", prompts, "--threads", "1", "--batch-size", "2")
        assert code == 0 and "warning:" in out + err and "batch_size 4" in out + err
    finally:
        torch.set_num_threads(before)
