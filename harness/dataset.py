"""(image, caption) items for training, over one side of a split.

Preprocessing - `fit="pad"` (default): resize so the LONGER side is `resolution` (aspect kept, bicubic), then pad
to a square with black. The dev images come in 253 sizes (396-1920 px wide, aspect 0.75-1.8) and already have black
borders around the circular field of view, so black padding only widens a border the model must learn anyway,
whereas a centre crop would cut off up to a third of the wider images - including the regions that location
prompts name ("an instrument located in the center-left"). `fit="crop"` (shorter side to `resolution`, then centre
crop) is offered for comparison with pipelines that crop.

Decoding at the training resolution: JPEGs are decoded with PIL's DCT scaling (`Image.draft`) at the smallest
power-of-two reduction that is still at least the size the resize needs (a 1920x1072 dev image decodes at 480x268
for 256 px), then resized; the jitter is applied to the resized image before the padding, so the padding stays
exactly black. This makes an item cost a fraction of a full-size decode and a full-size jitter (see benchmark P5).

Augmentation: optional brightness/contrast jitter (the MSDM paper's text: 0.4), and NO horizontal flip by default:
the prompts name left/right locations, so a flip would teach the model to ignore them. `hflip=True` exists for
experiments; `hflip_uncond=True` is the released MSDM augmentation: a flip (p = 0.5) only for items whose caption was
dropped to "" (an empty prompt names no location, so the flip cannot contradict it).

Captions - `captions="sample"` (default): one item per image per epoch, its caption drawn uniformly from that
image's caption rows, so every image is seen equally often regardless of how many captions it has (7-14), and the
same image is not repeated in one epoch. `captions="all"`: one item per caption row (an image with 14 captions is
seen 14 times per epoch). The seed paper trained on the 20,241 (caption, image) pairs, i.e. "all"; "sample" is the
default here because it balances images and keeps epochs 10x shorter at the same data coverage per step.

Paraphrases (`paraphrase_strategy`, needs a paraphrase map original -> [paraphrases]):
- "none": originals only;
- "add": each image's caption pool is its originals plus all their paraphrases (the seed paper's best setting);
- "replace:P": the drawn caption is swapped, with probability P, for one of its own paraphrases;
- "replace-all": every caption is replaced by one of its paraphrases; captions with no paraphrase keep the
  original (counted in `stats()["captions_without_paraphrase"]`).
Then `caption_dropout` replaces the caption by "" with that probability (classifier-free guidance training).

Pixels: items carry uint8 [3, R, R] tensors (0..255), the exact values of the augmented RGB image - every transform
above (resize, jitter, padding, flip) runs in PIL on 8-bit images, so nothing is lost by not converting in the
loader. The conversion to the model's float range [-1, 1] (`x / 127.5 - 1`) happens on the training device, in the
task, through `to_model_pixels` - the one place that knows the range. A uint8 item is 196 KiB at 256 px instead of
768 KiB as float32: 4x less to copy between DataLoader worker processes, into pinned memory and over PCIe, and no
float pass over every pixel in the workers (benchmark P5).

Every random choice of item i in epoch e comes from a generator seeded by (seed, e, i), so an item does not depend
on worker count, batch order or on what was drawn before - resuming at any step reproduces the same data. Call
`set_epoch(e)` before creating the epoch's DataLoader iterator (workers receive a copy of the dataset when the
iterator starts; with `persistent_workers=True` they would keep the old epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageEnhance

from harness.errors import UserError
from harness.images import to_rgb

Fit = Literal["pad", "crop"]
CaptionMode = Literal["sample", "all"]


@dataclass(frozen=True)
class ParaphraseStrategy:
    kind: Literal["none", "add", "replace", "replace-all"]
    p: float = 0.0  # for "replace"

    @staticmethod
    def parse(text: str) -> "ParaphraseStrategy":
        """'none' | 'add' | 'replace:P' (0 < P <= 1) | 'replace-all'."""
        t = (text or "none").strip()
        if t in ("none", "add", "replace-all"):
            return ParaphraseStrategy(t)  # type: ignore[arg-type]
        if t.startswith("replace:"):
            try:
                p = float(t.split(":", 1)[1])
            except ValueError:
                p = -1.0
            if 0.0 < p <= 1.0:
                return ParaphraseStrategy("replace", p)
            raise UserError(f"paraphrase strategy {text!r}: P in 'replace:P' must be a number in (0, 1]")
        raise UserError(f"unknown paraphrase strategy {text!r}; expected none, add, replace:P (e.g. replace:0.5) "
                        "or replace-all")

    def __str__(self) -> str:
        return f"replace:{self.p:g}" if self.kind == "replace" else self.kind


def downsampling_factor(block_out_channels) -> int:
    """A diffusers encoder / UNet downsamples once between each pair of its blocks."""
    return 2 ** (len(block_out_channels) - 1)


def check_resolution(resolution: int, factor: int, what: str) -> None:
    """The training resolution must be a multiple of the model's total downsampling `factor` (`what` says whose,
    e.g. "the VAE's downsampling factor"): otherwise latents are cropped silently or a UNet's skip connections fail
    mid-step. One line naming the factor and a size that works, before any run folder exists."""
    if resolution % factor:
        good = max(factor, round(resolution / factor) * factor)
        raise UserError(f"--resolution {resolution} must be a multiple of {factor}, {what}; use e.g. {good}")


@dataclass
class DatasetConfig:
    resolution: int = 256
    fit: Fit = "pad"
    jitter: float = 0.0  # brightness and contrast factors drawn uniformly from [1 - jitter, 1 + jitter]
    hflip: bool = False
    hflip_uncond: bool = False  # flip (p = 0.5) only items whose caption was dropped (released MSDM augmentation)
    captions: CaptionMode = "sample"
    caption_dropout: float = 0.0
    paraphrase_strategy: str = "none"
    seed: int = 0

    def validate(self) -> None:
        if self.resolution < 8 or self.resolution > 4096:
            raise UserError(f"DatasetConfig.resolution must be in [8, 4096], got {self.resolution}")
        if self.fit not in ("pad", "crop"):
            raise UserError(f"DatasetConfig.fit must be 'pad' or 'crop', got {self.fit!r}")
        if self.captions not in ("sample", "all"):
            raise UserError(f"DatasetConfig.captions must be 'sample' or 'all', got {self.captions!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise UserError(f"DatasetConfig.jitter must be in [0, 1), got {self.jitter}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise UserError(f"DatasetConfig.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        ParaphraseStrategy.parse(self.paraphrase_strategy)

    def __post_init__(self) -> None:
        self.validate()


def preprocess_image(img: Image.Image, resolution: int, fit: str = "pad") -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, R, R] in [-1, 1] (see module docstring for pad vs crop)."""
    return to_model_pixels(_to_uint8(_place(_resize(img, resolution, fit), resolution, fit)))


def to_model_pixels(pixels: torch.Tensor, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels ([3, H, W] or [B, 3, H, W], as the datasets return them) -> `dtype` in [-1, 1] on `device`
    (default: where they are). Moved first, converted there: on a GPU the float copy never exists on the host.
    Computed in float32 and then cast, so a bf16/fp16 model sees exactly the float32 values rounded once, as it
    did when the items were float32. Refuses anything but uint8 (a float tensor here means a caller converted
    twice or skipped the dataset)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"to_model_pixels expects the datasets' uint8 pixels, got {pixels.dtype}")
    if device is not None:  # asynchronous only host -> GPU (from pinned memory); a copy to the host must be waited for
        x = pixels.to(device, non_blocking=torch.device(device).type == "cuda")
    else:
        x = pixels
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    return x if dtype == torch.float32 else x.to(dtype)


def _scale(size: tuple[int, int], resolution: int, fit: str) -> float:
    w, h = size
    if fit == "pad":
        return resolution / max(w, h)
    if fit == "crop":
        return resolution / min(w, h)
    raise UserError(f"fit must be 'pad' or 'crop', got {fit!r}")


def _resize(img: Image.Image, resolution: int, fit: str) -> Image.Image:
    """Resize (bicubic, aspect kept) so the longer side ("pad") or the shorter side ("crop") is `resolution`."""
    if img.mode != "RGB":
        img = to_rgb(img)
    w, h = img.size
    s = _scale((w, h), resolution, fit)
    if fit == "pad":
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
    else:
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    return img.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else img


def _place(img: Image.Image, resolution: int, fit: str) -> Image.Image:
    """A resized image -> the R x R square: centred on black ("pad") or centre-cropped ("crop")."""
    nw, nh = img.size
    if fit == "pad":
        if (nw, nh) == (resolution, resolution):
            return img
        canvas = Image.new("RGB", (resolution, resolution), (0, 0, 0))
        canvas.paste(img, ((resolution - nw) // 2, (resolution - nh) // 2))
        return canvas
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def open_for_training(path: Path, resolution: int, fit: str) -> Image.Image:
    """Decode `path` as RGB, JPEGs directly at a reduced scale that still covers `resolution` (DCT scaling)."""
    try:
        img = Image.open(path)
        if img.format == "JPEG":
            s = _scale(img.size, resolution, fit)
            img.draft("RGB", (math.ceil(img.size[0] * s), math.ceil(img.size[1] * s)))
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"image does not decode ({e})", path) from None
    return to_rgb(img)


def training_view(path: Path, resolution: int, fit: str = "pad") -> Image.Image:
    """The image at `path` exactly as training sees it before augmentation (decode, resize, pad/crop to R x R):
    what `clean_pixels` caches and what `harness score --real-preprocess match` compares generated images with."""
    return _place(_resize(open_for_training(path, resolution, fit), resolution, fit), resolution, fit)


def _to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous uint8 [3, H, W]. Transposed by numpy in one copy: half the cost of stacking
    channel-first views of the HWC bytes later (measured: 0.14 vs 0.27 ms per 256 px item, convert + stack)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one item: a pure function of (seed, epoch, index) via numpy's SeedSequence."""
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch, index])


class CaptionedImages(torch.utils.data.Dataset):
    """Items {"pixels": [3,R,R] uint8, "caption": str, "image_id": str}; `to_model_pixels` turns a batch's pixels
    into the model's [-1, 1] on the training device. See the module docstring."""

    def __init__(self, devset, image_ids: list[str], cfg: DatasetConfig | None = None,
                 paraphrases: dict[str, list[str]] | None = None):
        self.devset = devset
        self.cfg = cfg or DatasetConfig()
        self.cfg.validate()
        self.strategy = ParaphraseStrategy.parse(self.cfg.paraphrase_strategy)
        if self.strategy.kind != "none" and not paraphrases:
            raise UserError(f"paraphrase strategy {self.strategy} needs a paraphrase file (--paraphrases)")
        self.paraphrases = {k: list(v) for k, v in (paraphrases or {}).items() if v}
        self.image_ids = list(image_ids)
        if not self.image_ids:
            raise UserError("no images on this side of the split")
        by_image = devset.captions_by_image()
        missing = [i for i in self.image_ids if i not in by_image]
        if missing:
            raise UserError(f"{len(missing)} image id(s) have no caption in {devset.csv_path}, e.g. {missing[0]!r}")
        # Caption pool per image. "add" folds the paraphrases in; the other strategies draw from the originals and
        # swap afterwards, so P and "replace-all" act per drawn caption.
        self.pools: list[list[str]] = []
        for img in self.image_ids:
            originals = by_image[img]
            if self.strategy.kind == "add":
                pool = list(originals) + [p for c in originals for p in self.paraphrases.get(c, [])]
            else:
                pool = list(originals)
            self.pools.append(pool)
        # "all": one item per (image, caption) pair, image-major, in CSV order.
        self.pairs: list[tuple[int, int]] = [(i, k) for i, pool in enumerate(self.pools) for k in range(len(pool))]
        originals_used = {c for img in self.image_ids for c in by_image[img]}
        self._n_unique = len(originals_used)
        self._without = sorted(c for c in originals_used if c not in self.paraphrases)
        self._n_rows = sum(len(by_image[i]) for i in self.image_ids)
        self.epoch = 0

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_ids) if self.cfg.captions == "sample" else len(self.pairs)

    def stats(self) -> dict:
        return {
            "n_images": len(self.image_ids),
            "n_items": len(self),
            "n_caption_rows": self._n_rows,
            "unique_captions": self._n_unique,
            "captions": self.cfg.captions,
            "paraphrase_strategy": str(self.strategy),
            # unique original captions of this side that have no paraphrase (they stay original under replace-all)
            "captions_without_paraphrase": len(self._without) if self.strategy.kind != "none" else None,
        }

    # -- items ---------------------------------------------------------------------------------------------------
    def caption_for(self, index: int, rng: np.random.Generator) -> tuple[int, str]:
        """(image position, caption) of item `index`, drawing from `rng` in a fixed order."""
        if self.cfg.captions == "sample":
            i = index
            pool = self.pools[i]
            caption = pool[int(rng.integers(len(pool)))]
        else:
            i, k = self.pairs[index]
            caption = self.pools[i][k]
        u_replace = rng.random()  # always drawn, so later draws do not shift with the strategy
        alts = self.paraphrases.get(caption)
        if alts and (self.strategy.kind == "replace-all" or (self.strategy.kind == "replace"
                                                             and u_replace < self.strategy.p)):
            caption = alts[int(rng.integers(len(alts)))]
        if rng.random() < self.cfg.caption_dropout:
            caption = ""
        return i, caption

    def clean_pixels(self, i: int) -> torch.Tensor:
        """Image at position `i` of `image_ids` as uint8 [3, R, R], decoded exactly as items are, without any
        augmentation (convert with `to_model_pixels`)."""
        path = self.devset.image_path(self.image_ids[i])
        return _to_uint8(training_view(path, self.cfg.resolution, self.cfg.fit))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = item_rng(self.cfg.seed, self.epoch, index)
        i, caption = self.caption_for(index, rng)
        image_id = self.image_ids[i]
        img = _resize(open_for_training(self.devset.image_path(image_id), self.cfg.resolution, self.cfg.fit),
                      self.cfg.resolution, self.cfg.fit)
        if self.cfg.jitter > 0:
            # On the resized image, before padding, so the padding stays exactly black.
            b, c = rng.uniform(1 - self.cfg.jitter, 1 + self.cfg.jitter, size=2)
            img = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(float(b))).enhance(float(c))
        # one draw for the flip whatever the options, so later draws never shift
        flip = rng.random() < 0.5 and (self.cfg.hflip or (self.cfg.hflip_uncond and caption == ""))
        img = _place(img, self.cfg.resolution, self.cfg.fit)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return {"pixels": _to_uint8(img), "caption": caption, "image_id": image_id}


def collate_items(items: list[dict]) -> dict:
    """Default collate: stacked pixels, caption and id lists."""
    return {"pixels": torch.stack([it["pixels"] for it in items]), "caption": [it["caption"] for it in items],
            "image_id": [it["image_id"] for it in items]}


def load_training_data(data_dir: str | Path, split_path: str | Path, side: str, cfg: DatasetConfig | None = None,
                       paraphrases: dict[str, list[str]] | None = None) -> tuple[CaptionedImages, dict]:
    """The dataset of one split side, after checking the split belongs to this prompt-gt.csv; plus the data hashes
    a run records (csv_sha256, split_sha256, side, n_images)."""
    from harness.data import load_devset
    from harness.split import check_split_matches, load_split

    devset = load_devset(data_dir)
    split = load_split(split_path)
    check_split_matches(split, devset)
    ids = split.side(side)
    ds = CaptionedImages(devset, ids, cfg, paraphrases)
    missing = [i for i in ids if not devset.image_path(i).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the {side} side are missing, e.g. {missing[0]!r}",
                        devset.images_dir)
    hashes = {
        "csv_sha256": devset.csv_sha256,
        "split_sha256": split.sha256,
        "side": side,
        "n_images": len(ids),
        "n_items": len(ds),
        "split_seed": split.seed,
    }
    return ds, hashes
