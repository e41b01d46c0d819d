"""The organisers' ImageCLEFmed MEDVQA-GI 2024 subtask-1 evaluator (`evaluate_task_1.py`), re-implemented step by step.

Its steps, and how each is reproduced here:
1. Listing: `os.listdir(folder)`, no recursion, keep names for which `name.endswith(("png", "jpg", "jpeg"))` -
   case-sensitive and without a dot (so "x.PNG" is dropped and "notpng" is kept). `list_images` applies the same
   rule. os.listdir order is filesystem-dependent; we sort, which only decides which images share an IS split.
2. Reading: `skimage.io.imread`, which for PNG/JPEG decodes with Pillow (through imageio) and returns
   `np.asarray(image)` in the file's own mode: RGB -> HxWx3, RGBA -> HxWx4, grey -> HxW, all uint8. `read_like_skimage`
   does exactly that with Pillow directly (scikit-image is not a dependency); like imageio it expands palette images
   to RGB (RGBA when they carry transparency), 1-bit to L and other alpha modes to RGBA. Alpha is NOT composited and
   grey is NOT expanded: the evaluator did not do either, and step 3 scrambles such images - that is the metric.
3. `numpy.resize(img, (299, 299, 3))`: not an image resize. It flattens the array in C order and keeps the first
   299*299*3 = 268,203 values, repeating the sequence from the start when the image has fewer. A large image is
   seen as its top rows re-wrapped into 299-pixel rows; an RGBA image's channels slide (R G B A R G B A ...).
4. Keras `inception_v3.preprocess_input`: cast to float32, x / 127.5 - 1.
5. Keras InceptionV3 (ImageNet) with its top: the 1,000-way softmax is the feature vector. Here torchvision's
   ImageNet InceptionV3 (Google's weights, `inception_v3_google-0cc3c7bd.pth`) takes Keras-style [-1, 1] input
   directly (`transform_input=False`). Its weights are not Keras' weights, so the numbers *approximate* the official
   score; they are labelled so.
6. Frechet distance between the real and generated softmax sets with `scipy.linalg.sqrtm`, real part taken
   (bounded by [0, 4] on probability vectors), and the Inception Score of the generated set over 10 splits of
   floor(N/10) images, eps 1e-16, reported as mean / std / median.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import UserError
from harness.features import Extractor, ResolvedWeights

OFFICIAL_SUFFIXES = ("png", "jpg", "jpeg")
SIZE = (299, 299, 3)
IS_SPLITS = 10
IS_EPS = 1e-16
LABEL = ("approximates the official 2024 score: organisers' preprocessing and formulas, torchvision ImageNet "
         "InceptionV3 instead of Keras' weights")


def official_name(name: str) -> bool:
    return name.endswith(OFFICIAL_SUFFIXES)


def list_images(folder: str | Path) -> list[Path]:
    """The evaluator's listing rule: direct children whose names end in png/jpg/jpeg (case-sensitive), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("image folder not found", folder)
    return [folder / n for n in sorted(os.listdir(folder)) if official_name(n) and (folder / n).is_file()]


def read_like_skimage(path: str | Path) -> np.ndarray:
    """The array `skimage.io.imread` returns for a PNG/JPEG (see module docstring, step 2)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode in ("LA", "PA", "La", "RGBa"):
                im = im.convert("RGBA")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            return np.asarray(im).copy()
    except FileNotFoundError:
        raise UserError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"image does not decode ({e})", path) from None


def organisers_resize(img: np.ndarray) -> np.ndarray:
    """`numpy.resize(img, (299, 299, 3))` - flatten, truncate or repeat (step 3). Kept as the call itself."""
    return np.resize(img, SIZE)


def keras_preprocess(x: np.ndarray) -> np.ndarray:
    """Keras `inception_v3.preprocess_input` on a numpy array: float32, then x /= 127.5; x -= 1 (same op order)."""
    x = x.astype(np.float32)
    x /= 127.5
    x -= 1.0
    return x


def preprocess(path: str | Path) -> np.ndarray:
    """One file -> the float32 299x299x3 array the evaluator feeds its network."""
    return keras_preprocess(organisers_resize(read_like_skimage(path)))


# ------------------------------------------------------------------------------------------------------- network


def build_network(weights_path: str | Path) -> torch.nn.Module:
    """torchvision InceptionV3 (1,000 ImageNet classes) from a local state-dict file, taking [-1, 1] input."""
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise UserError(f"not a torchvision InceptionV3 state dict ({e.__class__.__name__}: {e})", weights_path) \
            from None
    return model.eval().requires_grad_(False)


class OrganisersInception(Extractor):
    """Extractor whose features are the 1,000-way softmax of organisers-preprocessed images."""

    name = "imageclef2024"
    layers = ("softmax",)
    preprocess_id = "organisers-2024: skimage-like read, numpy.resize(299,299,3), x/127.5-1, NHWC->NCHW"

    def __init__(self, weights: ResolvedWeights, device: torch.device):
        self.weights, self.device = weights, device
        self.model = build_network(weights.path).to(device)

    def load(self, path: Path) -> torch.Tensor:
        return torch.from_numpy(preprocess(path))

    def shape_key(self, path: Path) -> Any:
        return SIZE  # every sample is 299x299x3 after step 3

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(batch.to(self.device).permute(0, 3, 1, 2).contiguous())
        return {"softmax": torch.softmax(logits.float(), dim=1).cpu()}


# ------------------------------------------------------------------------------------------------------ formulas


def frechet_distance(act_real: np.ndarray, act_gen: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), sqrtm by scipy, real part kept (step 6)."""
    import warnings

    from scipy.linalg import LinAlgWarning, sqrtm

    if len(act_real) < 2 or len(act_gen) < 2:
        raise ValueError("the Frechet distance needs at least 2 images on each side")
    mu1, mu2 = act_real.mean(axis=0), act_gen.mean(axis=0)
    s1, s2 = np.cov(act_real, rowvar=False), np.cov(act_gen, rowvar=False)
    with warnings.catch_warnings():
        # Softmax rows sum to 1, so both covariances are always singular (the all-ones direction): expected here.
        warnings.simplefilter("ignore", LinAlgWarning)
        root = sqrtm(s1.dot(s2))
    if np.iscomplexobj(root):
        root = root.real
    return float(np.sum((mu1 - mu2) ** 2.0) + np.trace(s1 + s2 - 2.0 * root))


def inception_score(probs: np.ndarray, n_split: int = IS_SPLITS, eps: float = IS_EPS) -> dict[str, Any]:
    """exp(mean KL(p(y|x) || p(y))) on each of `n_split` consecutive chunks of floor(N / n_split) images; the
    N mod n_split images at the end are dropped, as in the evaluator."""
    n_part = len(probs) // n_split
    if n_part < 1:
        raise ValueError(f"the Inception Score over {n_split} splits needs at least {n_split} images")
    scores = []
    for i in range(n_split):
        p_yx = probs[i * n_part:(i + 1) * n_part]
        p_y = p_yx.mean(axis=0, keepdims=True)
        kl = (p_yx * (np.log(p_yx + eps) - np.log(p_y + eps))).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "median": float(np.median(scores)),
            "splits": scores}
