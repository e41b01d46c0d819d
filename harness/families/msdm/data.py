"""What both MSDM stages share: their data sets (train / validation sides), batches, latents cache, image output."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from harness.dataset import CaptionedImages, DatasetConfig, item_rng, load_training_data, to_model_pixels
from harness.errors import UserError
from harness.io import atomic_path
from harness.trainer import TrainTask


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class MSDMDataTask(TrainTask):
    """The datasets both MSDM tasks train and validate on (set as self._train / self._val). One epoch is one
    pass over the dataset's items: the caption rows with `captions="all"` (the paper preset), the images with
    `captions="sample"`."""

    _train: torch.utils.data.Dataset
    _val: torch.utils.data.Dataset | None

    def train_dataset(self):
        return self._train

    def val_dataset(self):
        return self._val

    def collate(self, items):
        return collate(items)


def load_sides(data_dir: str, split_path: str, dcfg: DatasetConfig, paraphrases=None
               ) -> tuple[CaptionedImages, CaptionedImages | None, dict]:
    """(train set, validation set or None when the split has no validation images, data hashes). Validation
    measures the conditional loss on un-augmented images."""
    train, hashes = load_training_data(data_dir, split_path, "train", dcfg, paraphrases)
    vcfg = dataclasses.replace(dcfg, jitter=0.0, hflip=False, hflip_uncond=False, caption_dropout=0.0,
                               paraphrase_strategy="none")
    try:
        val, _ = load_training_data(data_dir, split_path, "val", vcfg)
    except UserError as e:
        if "no images" not in str(e):
            raise
        val = None
    return train, val, hashes


class CachedLatents(torch.utils.data.Dataset):
    """Training items from cached VAE posteriors: {"mean", "logvar", "caption"}. The caption of item i in epoch e
    is drawn exactly as `CaptionedImages` draws it (same generator, same order), so caption sampling, paraphrase
    strategy and context dropout are identical with and without the cache."""

    def __init__(self, base: CaptionedImages, means: torch.Tensor, logvars: torch.Tensor):
        self.base, self.means, self.logvars = base, means, logvars

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        i, caption = self.base.caption_for(index, item_rng(self.base.cfg.seed, self.base.epoch, index))
        return {"mean": self.means[i], "logvar": self.logvars[i], "caption": caption}


@torch.no_grad()
def encode_images(vae, dataset: CaptionedImages, device, batch_size: int = 16, limit: int | None = None):
    """Posterior (mean, logvar) of each image of `dataset` in image order, decoded as the dataset decodes its items
    without augmentation (`clean_pixels`), on `device`; returned on the CPU."""
    from harness.progress import progress

    n = min(limit, len(dataset.image_ids)) if limit else len(dataset.image_ids)
    means, logvars = [], []
    with progress(transient=True) as bar:
        task = bar.add_task("encode latents", total=n)
        for s in range(0, n, batch_size):
            px = torch.stack([dataset.clean_pixels(i) for i in range(s, min(s + batch_size, n))])
            m, lv = vae.encode(to_model_pixels(px, device))
            means.append(m.float().cpu())
            logvars.append(lv.float().cpu())
            bar.update(task, advance=len(px))
    return torch.cat(means), torch.cat(logvars)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]: clamp, no per-image min-max stretch (that would bias FID)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, cols: int) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
