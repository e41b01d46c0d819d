"""Runs the attribute / adherence / FTER tests share: a test-pattern run, a retrieval run (the reference family that
answers each prompt with a training image asking for the same attributes) and a "real copy" run (each real image of
a split side copied as a run's image with one of its own captions as prompt: a perfect copy, for plumbing tests)."""

from __future__ import annotations

from pathlib import Path

from harness.runs import Run, create_run


def pattern_run(data_dir: Path, split_path: Path, side: str, run_id: str, size: int = 32,
                     images_per_prompt: int = 1) -> Run:
    """A test-pattern run generated from `--prompts split:<side>`."""
    from harness.generate import generate_images, load_generator
    from harness.prompts import resolve_prompt_source

    run = create_run("test-pattern", {"size": size, "split_path": str(split_path), "data_dir": str(data_dir)},
                     run_id=run_id)
    pf = resolve_prompt_source(f"split:{side}", run.dir, run.config(), images_per_prompt)
    generate_images(load_generator(run), pf.prompts, run.images_dir, base_seed=0, batch_size=16)
    return run


def real_copy_run(data_dir: Path, split_path: Path, side: str, run_id: str, size: int = 64) -> Run:
    """Image i = the i-th image of the split side (sorted) through the training transform, prompt = one of its own
    captions drawn exactly as `--prompts split:<side>` draws it: a perfect "copy" generator."""
    from harness.data import load_devset
    from harness.dataset import training_view
    from harness.generate import image_name, write_manifest
    from harness.prompts import validation_prompts
    from harness.split import load_split

    run = create_run("real-copy", {"size": size, "split_path": str(split_path), "data_dir": str(data_dir)},
                     run_id=run_id)
    devset = load_devset(data_dir)
    ids = sorted(load_split(split_path).side(side))
    prompts = validation_prompts(data_dir, split_path, 1, side=side)
    run.images_dir.mkdir(parents=True)
    for i, name in enumerate(ids, start=1):
        training_view(devset.image_path(name), size).save(run.images_dir / image_name(i))
    write_manifest(run.images_dir, prompts, 0, "real-copy")
    return run


def retrieval_run(data_dir: Path, split_path: Path, side: str, run_id: str, size: int = 64) -> Run:
    """The retrieval reference family (`harness train retrieval`), generated from `--prompts split:<side>`."""
    from harness.families.retrieval.index import RetrievalConfig, train
    from harness.generate import generate_images, load_generator
    from harness.prompts import resolve_prompt_source

    run, _ = train(RetrievalConfig(data_dir=str(data_dir), split_path=str(split_path), size=size), run_id=run_id)
    pf = resolve_prompt_source(f"split:{side}", run.dir, run.config(), 1)
    generate_images(load_generator(run), pf.prompts, run.images_dir, base_seed=0, batch_size=16)
    return run
