"""`harness quickstart`: the whole pipeline, offline on CPU, on the real sample shipped inside the package.

data check -> split -> train (tiny MSDM: VAE then UNet) -> generate -> score -> package -> validate.

Each step calls the same stage function the individual commands call, so a working quickstart means a working
pipeline. Everything is written under WORKDIR (default ./quickstart).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from harness.errors import UserError
from harness.progress import console

N_PROMPTS = 16  # images generated and packaged: enough to exercise every stage, small enough for a CPU


def run_quickstart(workdir: Path, model: str = "msdm", seed: int = 0) -> dict:
    import os

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Runs of the quickstart stay inside its folder unless the user points HARNESS_RUNS_DIR elsewhere.
    previous = os.environ.get("HARNESS_RUNS_DIR")
    os.environ.setdefault("HARNESS_RUNS_DIR", str(workdir / "runs"))
    try:
        return _pipeline(workdir, model, seed)
    finally:
        if previous is None:
            os.environ.pop("HARNESS_RUNS_DIR", None)


def _pipeline(workdir: Path, model: str, seed: int) -> dict:
    from harness.data import check_devset
    from harness.generate import generate_images, load_generator
    from harness.io import write_text
    from harness.package import package_run, validate_zip, zip_summary
    from harness.prompts import format_prompt_file, read_prompt_file
    from harness.sample import sample_dir
    from harness.split import load_split, write_split

    data = sample_dir()
    steps: list[tuple[str, str, float]] = []

    def step(name: str):
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    t = step("1/7 data check")
    report = check_devset(data)
    if report.rows == 0:
        raise UserError("the shipped sample has no rows", data)
    from harness.data import WARNING_KINDS

    defects = [p for p in report.problems if p.kind not in WARNING_KINDS]
    if defects:
        raise UserError(f"the shipped sample has {len(defects)} defect(s); first: {defects[0].message}", data)
    steps.append(("data check", f"{report.rows} rows, {report.unique_prompts} prompts, {report.unique_images} images, "
                  f"{len(report.problems)} caption contradiction warning(s)", time.perf_counter() - t))

    t = step("2/7 split")
    split_path = workdir / "split.json"
    content = write_split(data, split_path, val_images=8, seed=seed)
    split = load_split(split_path)
    steps.append(("split", f"{content['counts']['train']['images']} train / {content['counts']['val']['images']} val "
                  f"images -> {split_path}", time.perf_counter() - t))

    # Test prompts: the validation images' captions, in the test file's format (one per line).
    from harness.data import load_devset

    captions = load_devset(data).captions_by_image()
    val_caps = [c for img in split.val for c in captions[img]]
    prompts_path = workdir / "prompts.txt"
    write_text(prompts_path, format_prompt_file(val_caps[:N_PROMPTS]))
    pf = read_prompt_file(prompts_path)

    t = step("3/7 train")
    if model == "msdm":
        run, detail = _train_tiny_msdm(data, split_path, workdir, seed)
    else:
        from harness.runs import create_run

        run, detail = create_run("test-pattern", {"size": 64}, tag="quickstart"), "no training (test pattern)"
    steps.append(("train", detail, time.perf_counter() - t))

    t = step("4/7 generate")
    gen = load_generator(run, {"device": "cpu"})
    rep = generate_images(gen, pf.prompts, run.images_dir, base_seed=seed, batch_size=8, prompts_sha256=pf.sha256)
    steps.append(("generate", f"{rep.total} images -> {run.images_dir}", time.perf_counter() - t))

    t = step("5/7 score")
    steps.append(("score", _score(run, split_path, data), time.perf_counter() - t))

    t = step("6/7 package")
    zpath, _ = package_run(run.images_dir, pf.prompts, "quickstart", workdir / "submissions")
    s = zip_summary(zpath)
    steps.append(("package", f"{zpath} ({s['bytes']:,} bytes)", time.perf_counter() - t))

    t = step("7/7 validate")
    v = validate_zip(zpath, pf.prompts)
    if not v.ok:
        raise UserError(f"quickstart zip failed validation: {v.problems[0]}", zpath)
    steps.append(("validate", f"valid, sha256 {str(s['sha256'])[:16]}...", time.perf_counter() - t))

    table = Table(title="quickstart", show_lines=False)
    table.add_column("step")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    for name, detail, secs in steps:
        table.add_row(name, detail, f"{secs:.1f}")
    console.print(table)
    return {"run": str(run.dir), "zip": str(zpath), "steps": steps}


def _score(run, split_path: Path, data: Path) -> str:
    """Score against the split's validation images. Offline without the Inception/VGG weights files every metric
    is recorded as "not computed" (with where to put the files) rather than a number from an untrained network."""
    from harness.score import ScoreConfig, score_run

    # The quickstart is offline by design: use weights already in $TORCH_HOME/hub/checkpoints, never download.
    result = score_run(run, ScoreConfig(split=split_path, data=data, device="cpu", allow_download=False))
    line = result.summary_line()
    missing = sorted({m["reason"].split()[-1] for m in result.metrics.values()
                      if isinstance(m, dict) and m.get("status") == "not computed" and "weights" in m.get("reason", "")})
    if missing:
        line += f"; offline without {', '.join(missing)} (where to put them: {result.path})"
    return line


def _train_tiny_msdm(data: Path, split_path: Path, workdir: Path, seed: int):
    """Tiny VAE, then tiny UNet conditioned on a tiny CLIP text tower whose tokenizer is learned offline from the
    sample's captions (the real CLIP ViT-L/14 cannot be downloaded here; `--text-encoder` takes it on a GPU box)."""
    import json

    from harness.data import load_devset
    from harness.families.msdm.train import train_quickstart
    from models.tiny_clip import save_tiny_clip_text

    text_dir = workdir / "tiny-clip"
    if not (text_dir / "text_encoder").is_dir():
        save_tiny_clip_text(text_dir, load_devset(data).unique_prompts(), seed=seed)
    vae_run, unet_run = train_quickstart(data, split_path, text_dir, seed=seed)
    vae, unet = (json.loads((r.dir / "train_stats.json").read_text()) for r in (vae_run, unet_run))
    detail = (f"VAE {vae['steps']} steps (loss {vae['final_loss']:.3f}), "
              f"UNet {unet['steps']} steps (loss {unet['final_loss']:.3f}) -> {unet_run.dir.name}")
    return unet_run, detail
