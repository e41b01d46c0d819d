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
5. Keras InceptionV3 (ImageNet) with its top: the 1,000-way softmax is the feature vector. Here a PyTorch port
   (torchvision's Inception3 graph with Keras' average pooling, see "network" below) taking Keras-style [-1, 1]
   input directly. Its weights: Keras' own file (`inception_v3_weights_tf_dim_ordering_tf_kernels.h5`, the legacy
   HDF5 layout, read with h5py) - then the port computes the organisers' network up to float32 kernel differences
   (docs/imageclef2024.md) - or, the labelled fallback, torchvision's ImageNet weights
   (`inception_v3_google-0cc3c7bd.pth`, Google's weights, not Keras'), whose numbers only *approximate* the official
   score. The file's content decides which (HDF5 signature), not its name; `label_for` names it in the result.
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
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux, InceptionB, InceptionC,
                                          InceptionD, InceptionE)

from harness.errors import UserError
from harness.features import Extractor, ResolvedWeights

OFFICIAL_SUFFIXES = ("png", "jpg", "jpeg")
SIZE = (299, 299, 3)
IS_SPLITS = 10
IS_EPS = 1e-16
LABEL = ("approximates the official 2024 score: organisers' preprocessing and formulas, torchvision ImageNet "
         "InceptionV3 instead of Keras' weights")
LABEL_KERAS = ("official 2024 metric: organisers' preprocessing and formulas on Keras' InceptionV3 ImageNet weights "
               "(PyTorch port; kernel-level float differences only, see docs/imageclef2024.md)")


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
#
# The port is torchvision's Inception3 with Keras' pooling semantics. Keras' InceptionV3 and torchvision's share the
# layer graph (same convolutions, paddings, branch and concatenation order; 'valid' stem convs and 3x3/2 max pools
# without padding; 'same' convs with odd kernels at stride 1 = symmetric padding; BatchNormalization epsilon 1e-3
# = BasicConv2d's eps=0.001; global average pool; Dense(1000) + softmax = fc + softmax). One difference is real:
# Keras' AveragePooling2D(3, strides=1, padding='same') averages over the in-image pixels only (TensorFlow's SAME
# pooling, and Keras' torch backend calls avg_pool2d(count_include_pad=False)), while torchvision's InceptionA/C/E
# call avg_pool2d(padding=1) counting the padded zeros, which darkens every border pixel of the pool branch. The
# blocks below differ from torchvision's only in that call (pytorch-fid's FID-Inception patches the same thing).


def keras_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Keras `AveragePooling2D((3, 3), strides=(1, 1), padding="same")`: padded positions are not counted."""
    return torch.nn.functional.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class KerasInceptionA(InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(keras_avg_pool(x))]


class KerasInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(keras_avg_pool(x))]


class KerasInceptionE(InceptionE):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return [self.branch1x1(x), b3, d, self.branch_pool(keras_avg_pool(x))]


def inception_v3_port(aux_logits: bool = False) -> torch.nn.Module:
    """Keras' InceptionV3 (with its 1,000-class top) as a torchvision Inception3 with Keras' average pooling,
    randomly initialised, taking Keras-style [-1, 1] NCHW input. `aux_logits` only keeps the (unused at inference)
    auxiliary head so that torchvision's state dicts load."""
    blocks = [BasicConv2d, KerasInceptionA, InceptionB, KerasInceptionC, InceptionD, KerasInceptionE, InceptionAux]
    return Inception3(num_classes=1000, aux_logits=aux_logits, transform_input=False, inception_blocks=blocks,
                      init_weights=False)


# The Keras layers' creation order (= their auto names conv2d_1 ... conv2d_94 and batch_normalization_1 ... _94 in
# the published file) and the port's BasicConv2d that each conv2d_bn() call of keras.applications.InceptionV3 is.
_A = ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool")
_B = ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")
_C = ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3",
      "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool")
_D = ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4")
_E = ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")
KERAS_CONV_ORDER: tuple[str, ...] = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
    + tuple(f"{block}.{n}" for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d") for n in _A)
    + tuple(f"Mixed_6a.{n}" for n in _B)
    + tuple(f"{block}.{n}" for block in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e") for n in _C)
    + tuple(f"Mixed_7a.{n}" for n in _D)
    + tuple(f"{block}.{n}" for block in ("Mixed_7b", "Mixed_7c") for n in _E))
KERAS_DENSE = "predictions"

# The published file: keras.applications.inception_v3 downloads it with this md5 (`file_hash`).
KERAS_H5_NAME = "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
KERAS_H5_MD5 = "9a0d58056eeedaa3f26cb7ebd46da564"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path: str | Path) -> bool:
    """HDF5 signature at offset 0 or at a user-block boundary (512, 1024, ...): the file decides, not its name."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset + 8 <= size:
                f.seek(offset)
                if f.read(8) == _HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False


def weights_kind(path: str | Path) -> str:
    """'keras-h5' for an HDF5 file (Keras' own weights), else 'torchvision' (a torchvision state dict)."""
    return "keras-h5" if is_hdf5(path) else "torchvision"


def keras_h5_is_published(path: str | Path) -> bool:
    """Whether `path` is byte-identical to the file Keras publishes (its md5, as Keras itself checks it)."""
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() == KERAS_H5_MD5


def label_for(path: str | Path) -> str:
    """The label a 2024 result carries, naming the network weights it was computed with."""
    return LABEL_KERAS if weights_kind(path) == "keras-h5" else LABEL


def _h5_names(group: Any, attr: str) -> list[str] | None:
    """A list-of-names attribute, also in the chunked form (`attr0`, `attr1`, ...) Keras uses for long lists."""
    if attr in group.attrs:
        values = list(group.attrs[attr])
    elif f"{attr}0" in group.attrs:
        values, k = [], 0
        while f"{attr}{k}" in group.attrs:
            values += list(group.attrs[f"{attr}{k}"])
            k += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _h5_layer(root: Any, name: str, expected: dict[str, tuple[int, ...]], path: Path) -> dict[str, np.ndarray]:
    """The weights of one layer of the legacy layout (group `name`, attribute `weight_names`, one dataset per
    name), by role (`conv2d_1/kernel:0` -> kernel), checked against the expected roles and shapes."""
    if name not in root or _h5_names(root[name], "weight_names") is None:
        raise UserError(f"layer {name} is missing: not Keras' InceptionV3 weights with its top ({KERAS_H5_NAME})",
                        path)
    group = root[name]
    out: dict[str, np.ndarray] = {}
    for wname in _h5_names(group, "weight_names") or []:
        role = wname.rsplit("/", 1)[-1].split(":", 1)[0]
        if role not in expected:
            raise UserError(f"layer {name} has an unexpected weight {wname!r} (expected {', '.join(expected)})", path)
        if wname not in group:
            raise UserError(f"layer {name}: weight {wname!r} is listed but has no data", path)
        value = np.asarray(group[wname], dtype=np.float32)
        if value.shape != expected[role]:
            raise UserError(f"layer {name}: weight {role} has shape {value.shape}, Keras' InceptionV3 has "
                            f"{expected[role]}", path)
        out[role] = value
    lacking = [r for r in expected if r not in out]
    if lacking:
        raise UserError(f"layer {name} lacks weight(s) {', '.join(lacking)}", path)
    return out


def load_keras_h5(model: torch.nn.Module, path: str | Path) -> None:
    """Copy Keras' InceptionV3 weights from a legacy-layout HDF5 file (the published
    `inception_v3_weights_tf_dim_ordering_tf_kernels.h5`) into `inception_v3_port()`.

    Layout: root attribute `layer_names`; one group per layer with attribute `weight_names` and one dataset per
    name (`conv2d_1/kernel:0`). A file saved as a whole model keeps the same under `model_weights`. Mapping:
    conv2d_k (kernel HWIO, no bias) -> the k-th conv2d_bn's Conv2d (OIHW); batch_normalization_k (beta,
    moving_mean, moving_variance; `scale=False` so no gamma, i.e. weight 1) -> its BatchNorm2d; predictions
    (kernel in x out, bias) -> fc (out x in). Every other layer of the file has no weights.
    """
    path = Path(path)
    try:
        import h5py
    except ImportError:
        raise UserError("reading Keras .h5 weights needs h5py (pip install h5py)", path) from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"not a readable HDF5 file ({e})", path) from None
    with f:
        root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        listed = _h5_names(root, "layer_names")
        if listed is None:
            raise UserError("no 'layer_names' attribute: not Keras weights in the legacy HDF5 layout "
                            f"({KERAS_H5_NAME})", path)
        modules = dict(model.named_modules())
        state = {k: v.clone() for k, v in model.state_dict().items()}
        expected_layers = {KERAS_DENSE}
        for k, conv_name in enumerate(KERAS_CONV_ORDER, 1):
            block = modules[conv_name]
            o, i, kh, kw = block.conv.weight.shape
            conv = _h5_layer(root, f"conv2d_{k}", {"kernel": (kh, kw, i, o)}, path)
            bn = _h5_layer(root, f"batch_normalization_{k}",
                           {"beta": (o,), "moving_mean": (o,), "moving_variance": (o,)}, path)
            expected_layers |= {f"conv2d_{k}", f"batch_normalization_{k}"}
            state[f"{conv_name}.conv.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy())
            state[f"{conv_name}.bn.weight"] = torch.ones(o)
            state[f"{conv_name}.bn.bias"] = torch.from_numpy(bn["beta"])
            state[f"{conv_name}.bn.running_mean"] = torch.from_numpy(bn["moving_mean"])
            state[f"{conv_name}.bn.running_var"] = torch.from_numpy(bn["moving_variance"])
        out_f, in_f = model.fc.weight.shape
        dense = _h5_layer(root, KERAS_DENSE, {"kernel": (in_f, out_f), "bias": (out_f,)}, path)
        state["fc.weight"] = torch.from_numpy(dense["kernel"].T.copy())
        state["fc.bias"] = torch.from_numpy(dense["bias"])
        for name in listed:
            if name not in expected_layers and name in root and _h5_names(root[name], "weight_names"):
                raise UserError(f"layer {name} carries weights that Keras' InceptionV3 does not have", path)
    model.load_state_dict(state)


def write_keras_h5(path: str | Path, layer_names: list[str], weights: dict[str, list[tuple[str, np.ndarray]]],
                   attrs: dict[str, str] | None = None) -> Path:
    """Write weights in the legacy Keras HDF5 layout that `load_keras_h5` reads (what Keras'
    `legacy_h5_format.save_weights_to_hdf5_group` writes): `layer_names` (every layer, in model order), and per
    layer a group with `weight_names` and one dataset per weight name. Tests use it to make such files without the
    published one; `weights` maps a layer name to its (weight name, array) list, layers without weights get none."""
    import h5py

    from harness.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            # Fixed-length byte strings (numpy "S"), as in the published file; empty lists as empty arrays.
            f.attrs["layer_names"] = np.asarray([n.encode("utf8") for n in layer_names])
            for k, v in (attrs or {}).items():
                f.attrs[k] = v.encode("utf8")
            for name in sorted(layer_names):  # sorted, as Keras does, so no group name is a prefix issue
                g = f.create_group(name)
                items = weights.get(name, [])
                g.attrs["weight_names"] = np.asarray([w.encode("utf8") for w, _ in items])
                for wname, value in items:
                    g.create_dataset(wname, data=np.asarray(value))
    return path


def build_network(weights_path: str | Path) -> torch.nn.Module:
    """The port (`inception_v3_port`) with the weights of `weights_path`, chosen by the file's content: an HDF5
    file is Keras' own InceptionV3 weights (`load_keras_h5`); anything else must be torchvision's ImageNet
    InceptionV3 state dict (`inception_v3_google-0cc3c7bd.pth`, Google's weights in torchvision's layout), the
    labelled fallback."""
    if weights_kind(weights_path) == "keras-h5":
        model = inception_v3_port(aux_logits=False)
        load_keras_h5(model, weights_path)
    else:
        model = inception_v3_port(aux_logits=True)
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:
            raise UserError(f"neither Keras HDF5 weights nor a torchvision InceptionV3 state dict "
                            f"({e.__class__.__name__}: {e})", weights_path) from None
    return model.eval().requires_grad_(False)


class OrganisersInception(Extractor):
    """Extractor whose features are the 1,000-way softmax of organisers-preprocessed images."""

    name = "imageclef2024"
    layers = ("softmax",)
    # Part of the feature-cache key: features of the earlier port (torchvision pooling) are not reused.
    preprocess_id = ("organisers-2024: skimage-like read, numpy.resize(299,299,3), x/127.5-1, NHWC->NCHW; "
                     "net: Keras InceptionV3 port (avg pool count_include_pad=False)")

    def __init__(self, weights: ResolvedWeights, device: torch.device):
        self.weights, self.device = weights, device
        self.kind = weights_kind(weights.path)
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
