"""MSDM entry points: train (VAE or UNet), resume, --print-config, and the quickstart.

    harness train msdm-vae  --split S --data D --preset paper|tiny        -> runs/msdm-vae-.../final/vae/
    harness train msdm-unet --split S --data D --vae runs/msdm-vae-...    -> runs/msdm-unet-.../final/{unet,vae}/

`train(cfg)` builds the task from a typed config and runs the shared loop; `resume(run)` reads the run's config
back and goes through the same `train` path with the existing run (so a resumed run is built exactly as it started).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from harness.config import to_dict
from harness.dataset import ParaphraseStrategy, load_training_data
from harness.errors import UserError
from harness.io import write_json
from harness.families.msdm.config import (PAPER_SOURCES, RUN_KEYS, UNET_FAMILY, VAE_FAMILY, UNetConfig, VAEConfig,
                                 config_from_run, merge, unet_config, vae_config)
from harness.families.msdm.data import CachedLatents, encode_images, load_sides
from harness.runs import Run, create_run, open_run
from harness.trainer import check_resumable, loop_description, resolve_loop, run_training, start_run
from models.msdm.presets import get_preset

LATENT_SCALE_IMAGES = 256  # training images whose sampled latents set the scale (LDM: one batch; more is steadier)


def _load_paraphrases(path: str | None) -> dict[str, list[str]] | None:
    if not path:
        return None
    from harness.paraphrase import load_paraphrases

    return load_paraphrases(path)


def _describe_text(source: str) -> str:
    from models.msdm.text import resolve_text_source

    root, layout = resolve_text_source(source)
    return f"{Path(root).resolve()} ({layout} layout)" if layout else f"hub:{root}"


def _build_vae(cfg: VAEConfig):
    from harness.families.msdm.vae_task import VAETask, VGGPerceptual, find_vgg16

    train_ds, val_ds, hashes = load_sides(cfg.data_dir, cfg.split_path, cfg.data)
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        path, note = find_vgg16(cfg.loss.perceptual_weights)
        if path is None and cfg.perceptual.startswith("on"):  # resuming without the term would change the loss
            raise UserError(f"this run trained with the perceptual term, but now it is {note}")
        perceptual = VGGPerceptual(path) if path else None
        if path is None and not cfg.perceptual:
            from harness.progress import console

            console.print(f"[yellow]note:[/] perceptual loss {note}")
    else:
        note = "off (perceptual_weight = 0)"
    cfg = dataclasses.replace(cfg, perceptual=cfg.perceptual or note)
    torch.manual_seed(cfg.loop.seed)  # model init
    return VAETask(cfg, train_ds, val_ds, perceptual=perceptual), hashes, cfg, {}


def _prepare_latents(cfg: UNetConfig, train_ds, vae) -> tuple[Any, float]:
    """(training dataset, latent scale). Every rank encodes on its own device; rank 0 first (`main_process_first`),
    and rank 0's measured scale is broadcast so all ranks train on the same scale."""
    from accelerate.utils import broadcast_object_list

    from harness.distributed import state

    st = state()
    device = st.device
    means = logvars = None
    scale = cfg.latent_scale
    with st.main_process_first():
        vae = vae.to(device)
        if cfg.cache_latents:
            means, logvars = encode_images(vae, train_ds, device)
        if scale <= 0:
            if means is not None:
                m, lv = means[:LATENT_SCALE_IMAGES], logvars[:LATENT_SCALE_IMAGES]
            else:
                m, lv = encode_images(vae, train_ds, device, limit=LATENT_SCALE_IMAGES)
            from harness.families.msdm.unet_task import measure_latent_scale

            scale = measure_latent_scale(m, lv, cfg.loop.seed)
        vae.to("cpu")
    if st.num_processes > 1:
        holder = [scale]
        broadcast_object_list(holder)
        scale = holder[0]
    return (CachedLatents(train_ds, means, logvars) if means is not None else train_ds), scale


def _build_unet(cfg: UNetConfig):
    from harness.families.msdm.sampling import load_text
    from harness.families.msdm.unet_task import UNetTask
    from models.msdm.vae import MSDMAutoencoder

    train_ds, val_ds, hashes = load_sides(cfg.data_dir, cfg.split_path, cfg.data,
                                          _load_paraphrases(cfg.paraphrases_path))
    hashes = {**hashes, "vae_run": cfg.vae_run, "vae_data": open_run(cfg.vae_run).data_hashes()}
    if cfg.paraphrases_path:
        from harness.paraphrase import paraphrases_sha256

        hashes["paraphrases_sha256"] = paraphrases_sha256(cfg.paraphrases_path)
    vae = MSDMAutoencoder.from_pretrained(Path(cfg.vae_run) / "final" / "vae")
    text = load_text(cfg.text_encoder, cfg.max_length)
    data, scale = _prepare_latents(cfg, train_ds, vae)
    cfg = dataclasses.replace(cfg, latent_scale=scale)
    torch.manual_seed(cfg.loop.seed)
    task = UNetTask(cfg, data, val_ds, vae, text, latent_scale=scale)
    extra = {"text_encoder_resolved": _describe_text(cfg.text_encoder)}
    if cfg.loop.select_best == "fid":
        extra["fid_weights"] = task.prepare_fid(None)
    return task, hashes, cfg, extra


def _summary(cfg: VAEConfig | UNetConfig) -> dict:
    strategy = cfg.data.paraphrase_strategy if isinstance(cfg, UNetConfig) else "none"
    return {"preset": cfg.preset, "steps": cfg.loop.max_steps, "epochs": cfg.loop.epochs,
            "paraphrase_strategy": str(ParaphraseStrategy.parse(strategy))}


def train(cfg: VAEConfig | UNetConfig, run_id: str | None = None, tag: str = "", run: Run | None = None,
          on_run=None, resume: bool = True) -> Run:
    """Train `cfg` into a new run, or (with `run`) continue that run exactly from its last checkpoint (`resume`) or
    train it again from step 0 in its own directory (not `resume`: a run killed before its first checkpoint).

    `on_run(run)` is called once a new run's directory exists, before the first step (the sweep records it there,
    so a kill during training leaves a record pointing at the run to continue)."""
    family = VAE_FAMILY if isinstance(cfg, VAEConfig) else UNET_FAMILY
    cfg.validate()
    task, hashes, cfg, extra = (_build_vae if family == VAE_FAMILY else _build_unet)(cfg)
    if run is None:
        config = {**to_dict(cfg), **extra, "summary": _summary(cfg)}
        run = start_run(lambda: create_run(family, config, hashes, tag=tag or cfg.preset, run_id=run_id),
                        on_run=on_run)
        run_training(task, cfg.loop, run)
    else:
        run_training(task, cfg.loop, run, resume=resume)
    return run


def continue_run(run: Run) -> Run:
    """Finish the training of `run` in its own directory: from its last checkpoint, or from step 0 when it was
    stopped before its first checkpoint (what a sweep rerun does after a kill)."""
    from harness.trainer import TRAIN_LOG, latest_checkpoint

    if latest_checkpoint(run) is not None:
        return resume(run.dir)
    cfg = config_from_run(run.config(), run.family)
    (run.dir / TRAIN_LOG).unlink(missing_ok=True)  # lines of the killed attempt; this one logs the same steps again
    run.log("no checkpoint yet: training again from step 0 in the same run")
    return train(cfg, run=run, resume=False)


def resume(run_dir: str | Path, loop_overrides: dict | None = None) -> Run:
    """Continue an msdm-vae / msdm-unet run from its last checkpoint; `loop_overrides` may extend the training
    (max_steps / epochs, as `pop_loop_overrides` returns them) or change loop options that do not affect the data
    order (the trainer refuses seed / batch / accumulation / world-size changes)."""
    run = open_run(run_dir)
    if run.family not in (VAE_FAMILY, UNET_FAMILY):
        raise UserError(f"not an MSDM run (family {run.family!r})", run.config_path)
    check_resumable(run)  # before data, text encoder and latents are loaded
    raw = run.config()
    for key in ("seed", "batch_size", "grad_accum"):  # checked before config.json is touched
        if loop_overrides and key in loop_overrides and loop_overrides[key] != raw.get("loop", {}).get(key):
            raise UserError(f"cannot resume exactly with another {key} (the run has {raw['loop'].get(key)}); "
                            "start a new run instead", run.config_path)
    if loop_overrides:
        raw = merge(raw, {"loop": loop_overrides})
    cfg = config_from_run(raw, run.family)
    if loop_overrides:  # the run records what it now trains to (the trainer fills in derived max_steps)
        write_json(run.config_path, {**raw, "loop": to_dict(cfg.loop), "summary": {**raw.get("summary", {}),
                                                                                  **_summary(cfg)}})
    return train(cfg, run=run)


def resolved_config(cfg: VAEConfig | UNetConfig) -> dict:
    """--print-config: the typed config, the preset's model and where its paper values come from, and the loop
    with its derived numbers (steps per epoch, total steps). Reads the CSV and the split only (no image, no
    weights): the number of items per epoch depends on the split and the caption rows."""
    family = VAE_FAMILY if isinstance(cfg, VAEConfig) else UNET_FAMILY
    ds, hashes = load_training_data(cfg.data_dir, cfg.split_path, "train", cfg.data,
                                    _load_paraphrases(getattr(cfg, "paraphrases_path", None)))
    loop, plan = resolve_loop(cfg.loop, len(ds))
    p = get_preset(cfg.preset)
    out = {"family": family, **{k: v for k, v in to_dict(cfg).items() if k not in RUN_KEYS},
           "loop": loop_description(loop, plan),
           "model": {"preset": cfg.preset, "resolution": p.resolution, "description": p.description,
                     "config": p.vae if family == VAE_FAMILY else p.unet},
           "data_counts": {"train_images": hashes["n_images"], "train_items": len(ds),
                           "caption_rows": ds.stats()["n_caption_rows"], "epoch_unit": cfg.data.captions}}
    if cfg.preset == "paper":
        out["paper_sources"] = [{"value": f"{a} {b}".strip(), "source": c}
                                for a, b, c in PAPER_SOURCES["vae" if family == VAE_FAMILY else "unet"]]
    return out


def train_quickstart(data_dir: str | Path, split_path: str | Path, text_encoder: str | Path, seed: int = 0,
                     vae_steps: int | None = None, unet_steps: int | None = None) -> tuple[Run, Run]:
    """Tiny VAE then tiny UNet (for `harness quickstart`); `text_encoder` is a dir from
    `models.tiny_clip.save_tiny_clip_text`. Returns (vae_run, unet_run)."""
    vo = {"loop": {"seed": seed, **({"max_steps": vae_steps} if vae_steps else {})}}
    vae_run = train(vae_config("tiny", data_dir, split_path, vo))
    uo = {"text_encoder": str(Path(text_encoder).resolve()),
          "loop": {"seed": seed, **({"max_steps": unet_steps} if unet_steps else {})}}
    unet_run = train(unet_config("tiny", data_dir, split_path, vae_run.dir, uo))
    return vae_run, unet_run
