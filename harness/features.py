"""Feature extraction for scoring, done once per (image set, extractor, weights) and cached on disk.

Why not let torch-fidelity run end to end:
- its statistics cache is keyed by a *name* only, so a folder whose images changed silently reuses stale features;
- `calculate_metrics` takes one `feature_extractor_weights_path` for all extractors of a call, so FID (Inception)
  and precision/recall (VGG16) cannot both be given local weights in one call;
- its DataLoader stacks samples, so it cannot take the dev set's 253 different image sizes.

So the harness builds torch-fidelity's own extractor modules (`create_feature_extractor`, the exact modules and the
exact in-network resize that `calculate_metrics` uses), feeds them uint8 3xHxW tensors at native size (batched by
equal size, which is what torch-fidelity's stacking would do for a same-size folder), caches the features keyed by a
content hash, and computes metrics from the cached features with torch-fidelity's feature->metric functions
(harness/score.py).

Two cache levels, both under `$HARNESS_CACHE_DIR/features/` or `<runs root>/.cache/features/`:
- per image: `images/<identity>/<image sha256>.pt`, keyed by the image's *content* (not its name) and the
  extractor identity, so regenerating one image of 5,000 costs one extraction;
- per set: `<key[:2]>/<key>.pt` = all features of an ordered set (key = identity + names and bytes in order), the
  fast path of a re-score (one file read instead of 5,000).
The identity holds the extractor, layers, weights sha256, a preprocessing id derived from the code that turns a file
into network input (`code_id`), torch / torchvision / Pillow / torch-fidelity versions and the device type (GPU and
CPU kernels differ in the last bits). `harness cache info|prune` inspects and trims both levels.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from harness.errors import UserError
from harness.io import atomic_path, dumps_json, sha256_bytes, sha256_file, write_json
from harness.runs import runs_root

FEATURES_FORMAT = 1

# ----------------------------------------------------------------------------------------------------- locations


def cache_root() -> Path:
    """`$HARNESS_CACHE_DIR` or `<runs root>/.cache` (holds features/ and the weights-hash memo)."""
    env = os.environ.get("HARNESS_CACHE_DIR")
    return Path(env) if env else runs_root() / ".cache"


def features_dir() -> Path:
    return cache_root() / "features"


def torch_hub_checkpoints() -> Path:
    """Where torch.hub (and torch-fidelity) keep downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


# ------------------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightsSpec:
    """A published weights file. Its name embeds the first 8 hex digits of its sha256 (torch.hub convention)."""

    extractor: str
    filename: str
    url: str
    option: str  # the CLI option that points at a local copy

    @property
    def sha256_prefix(self) -> str:
        return self.filename.rsplit("-", 1)[1].split(".")[0]


WEIGHTS: dict[str, WeightsSpec] = {
    "inception-v3-compat": WeightsSpec(
        "inception-v3-compat", "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "--inception-weights"),
    "vgg16": WeightsSpec(
        "vgg16", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", "--vgg-weights"),
    # torchvision's ImageNet InceptionV3 (Google's weights): the stand-in for Keras' InceptionV3 in imageclef2024.
    "imageclef2024": WeightsSpec(
        "imageclef2024", "inception_v3_google-0cc3c7bd.pth",
        "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth", "--imageclef-weights"),
    # `--metrics fd-clip`: torch-fidelity's CLIP ViT-L/14 (OpenAI's TorchScript file, named with its full sha256).
    "clip-vit-l-14": WeightsSpec(
        "clip-vit-l-14", "clip-vit-l-14-b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836.pt",
        "https://openaipublic.azureedge.net/clip/models/"
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt", "--clip-weights"),
    # `--metrics fd-dinov2`: torch-fidelity 0.4 loads DINOv2 only through torch.hub (facebookresearch/dinov2 code +
    # this checkpoint in the hub cache); Meta publishes no hash for it.
    "dinov2-vit-l-14": WeightsSpec(
        "dinov2-vit-l-14", "dinov2_vitl14_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth", "(torch.hub cache)"),
}
HUB_REPOS = {"dinov2-vit-l-14": "facebookresearch_dinov2_main"}  # torch.hub's folder name for the code


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    sha256: str
    verified: bool  # sha256 starts with the published prefix
    source: str  # "explicit" | "torch-home" | "downloaded"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "verified": self.verified, "source": self.source}


class MissingWeights(Exception):
    """No weights file for an extractor: the metrics that need it are recorded as "not computed"."""


def offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HARNESS_OFFLINE", "HF_HUB_OFFLINE"))


def file_sha256_memo(path: Path) -> str:
    """sha256 of a large file, memoised by (real path, size, mtime_ns): weights files are 100-550 MB and are hashed
    on every `score`, which would otherwise dominate a re-score from cached features."""
    path = Path(path).resolve()
    st = path.stat()
    memo_path = cache_root() / "sha256-memo.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = sha256_file(path)
    memo[str(path)] = {"stamp": stamp, "sha256": digest}
    try:
        write_json(memo_path, memo)
    except OSError:
        pass  # a read-only cache only costs speed
    return digest


def resolve_weights(extractor: str, explicit: Path | None = None, *, allow_download: bool = True,
                    allow_unverified: bool = False) -> ResolvedWeights:
    """Find and verify the weights of `extractor`.

    Order: an explicit path (must exist), then `$TORCH_HOME/hub/checkpoints/<published name>`, then a download (when
    allowed and not offline). A file whose sha256 does not start with the published prefix is refused unless
    `allow_unverified` (tests with randomly initialised extractors); such results are labelled and kept off the
    leaderboard. Raises MissingWeights (not an error: the metric becomes "not computed") when nothing is found.
    """
    spec = WEIGHTS[extractor]
    if extractor in HUB_REPOS:
        return _resolve_hub(extractor, spec, allow_download)

    def check(path: Path, source: str) -> ResolvedWeights:
        digest = file_sha256_memo(path)
        ok = digest.startswith(spec.sha256_prefix)
        expected = f"the published {spec.filename} (sha256 prefix {spec.sha256_prefix})"
        if extractor == "imageclef2024":
            # The organisers' network: Keras' own HDF5 file (published with an md5) or torchvision's port weights.
            from harness.imageclef2024 import KERAS_H5_MD5, KERAS_H5_NAME, keras_h5_is_published, weights_kind

            if weights_kind(path) == "keras-h5":
                ok, expected = keras_h5_is_published(path), f"Keras' published {KERAS_H5_NAME} (md5 {KERAS_H5_MD5})"
        if not ok and not allow_unverified:
            raise UserError(f"sha256 {digest[:12]}... is not {expected}; refusing to score with unknown weights",
                            path)
        return ResolvedWeights(path=path.resolve(), sha256=digest, verified=ok, source=source)

    if explicit is not None:
        explicit = Path(explicit)
        if not explicit.is_file():
            raise UserError(f"weights file for {extractor} not found (given with {spec.option})", explicit)
        return check(explicit, "explicit")
    home = torch_hub_checkpoints() / spec.filename
    if home.is_file():
        return check(home, "torch-home")
    where = (f"{spec.filename} not found: download it from {spec.url} and pass {spec.option} PATH, "
             f"or put it at {home}")
    if not allow_download or offline():
        raise MissingWeights(where + " (offline: no download attempted)")
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(spec.url, str(home), hash_prefix=spec.sha256_prefix, progress=False)
    except Exception as e:  # network errors come in many types; any of them means "not available"
        raise MissingWeights(f"{where} (download failed: {e.__class__.__name__}: {e})") from None
    return check(home, "downloaded")


def _resolve_hub(extractor: str, spec: WeightsSpec, allow_download: bool) -> ResolvedWeights:
    """Weights torch-fidelity loads through torch.hub (code + checkpoint in $TORCH_HOME/hub). No published hash:
    "verified" here means "the hub's own file", recorded with its sha256."""
    hub = Path(torch.hub.get_dir())
    ckpt, code = torch_hub_checkpoints() / spec.filename, hub / HUB_REPOS[extractor]
    if ckpt.is_file() and code.is_dir():
        return ResolvedWeights(path=ckpt.resolve(), sha256=file_sha256_memo(ckpt), verified=True, source="torch-hub")
    absent = " and ".join(str(p) for p in (ckpt, code) if not p.exists())
    where = f"{spec.filename} (torch.hub) not found: missing {absent}; run once online to fill the torch.hub cache"
    if not allow_download or offline():
        raise MissingWeights(where + " (offline: no download attempted)")
    try:
        torch.hub.list("facebookresearch/dinov2", trust_repo=True)  # fetches the code into the hub cache
        if not ckpt.is_file():
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(ckpt), progress=False)
    except Exception as e:  # network errors come in many types; any of them means "not available"
        raise MissingWeights(f"{where} (download failed: {e.__class__.__name__}: {e})") from None
    return ResolvedWeights(path=ckpt.resolve(), sha256=file_sha256_memo(ckpt), verified=True, source="torch-hub")


# ---------------------------------------------------------------------------------------------------- image sets


@dataclass
class ImageSet:
    """An ordered list of image files and the hash of their names and bytes."""

    label: str
    paths: list[Path]
    sha256: str = ""
    hashes: list[str] = field(default_factory=list)  # sha256 of each file's bytes, in order

    def __post_init__(self) -> None:
        if not self.paths:
            raise UserError(f"image set {self.label!r} is empty")
        if not self.hashes:
            for p in self.paths:
                if not p.is_file():
                    raise UserError("image file not found", p)
            self.hashes = [sha256_file(p) for p in self.paths]
        if not self.sha256:
            h = hashlib.sha256()
            for p, digest in zip(self.paths, self.hashes):
                h.update(p.name.encode("utf-8") + b"\0" + digest.encode("ascii"))
            self.sha256 = h.hexdigest()

    def __len__(self) -> int:
        return len(self.paths)


def stat_fingerprint(paths: list[Path]) -> str:
    """Hash of (name, size, mtime) of files: a cheap "unchanged since" check before hashing their bytes."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- extractors


class Extractor(ABC):
    """A frozen network that turns a batch of loaded samples into named feature tensors (float32, on CPU)."""

    name: str
    layers: tuple[str, ...]
    preprocess_id: str  # part of the cache key: how files become network input
    weights: ResolvedWeights

    @abstractmethod
    def load(self, path: Path) -> torch.Tensor:
        """One sample, ready to be stacked with samples of the same shape."""

    def shape_key(self, path: Path) -> Any:
        """Samples with equal keys can share a batch (default: the image size from the header, no decoding)."""
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.size
        except Exception:
            return None  # the decode in `load` raises the clear error

    @abstractmethod
    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]: ...


def uint8_chw(path: Path) -> torch.Tensor:
    """An image as torch-fidelity receives it: uint8 3xHxW at native size, read with harness.images.open_rgb (the
    harness-wide reader; for RGBA files it composites on black where torch-fidelity's folder reader would drop
    alpha - generated PNGs and the dev-set JPEGs are RGB, so the two agree on every image we score)."""
    from harness.images import open_rgb

    img = open_rgb(path)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def code_id(*objects: Any) -> str:
    """Short hash of the source code of functions/classes (plus any plain values): a preprocessing id that changes
    whenever the code that turns a file into network input changes, without anyone remembering to bump a string."""
    h = hashlib.sha256()
    for obj in objects:
        try:
            text = inspect.getsource(obj)
        except (TypeError, OSError):
            text = repr(obj)
        h.update(text.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def runtime_identity(device: torch.device | str) -> dict[str, str]:
    """Library versions and device type that features depend on (part of every feature-cache key)."""
    import PIL
    import torch_fidelity
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "pillow": PIL.__version__,
            "torch_fidelity": torch_fidelity.__version__, "device_type": torch.device(device).type}


class TorchFidelityExtractor(Extractor):
    """torch-fidelity's own extractor module (`inception-v3-compat`, `vgg16`, `dinov2-vit-*`, `clip-*`), built as
    `calculate_metrics` builds it; the resize to the network's size (TF1-compatible bilinear) happens inside the
    module, exactly as there."""

    preprocess_id = "harness.images.open_rgb -> uint8 3xHxW native size -> torch-fidelity in-network resize"

    def __init__(self, name: str, layers: Iterable[str], weights: ResolvedWeights, device: torch.device):
        from torch_fidelity.utils import create_feature_extractor

        self.name, self.layers, self.weights, self.device = name, tuple(layers), weights, device
        # DINOv2 takes no local path in torch-fidelity 0.4 (it loads through torch.hub's cache): path None there.
        path = None if weights.source == "torch-hub" else str(weights.path)
        self.module = create_feature_extractor(name, list(self.layers), cuda=False,
                                               feature_extractor_weights_path=path, verbose=False)
        self.module.to(device)

    def load(self, path: Path) -> torch.Tensor:
        return uint8_chw(path)

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.module(batch.to(self.device, non_blocking=True))
        return {k: v.float().cpu() for k, v in self.module.convert_features_tuple_to_dict(out).items()}


def write_random_weights(extractor: str, path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised state dict for `extractor` (tests and offline benchmarks only).

    Its sha256 never matches the published file, so it is only accepted with allow_unverified_weights and its
    results are labelled and kept off the leaderboard. Convolutions get He-normal weights (torch's default init
    makes InceptionV3's activations vanish to ~1e-8, which would make every metric degenerate).
    """
    import torchvision

    g = torch.Generator().manual_seed(seed)
    if extractor == "inception-v3-compat":
        from unittest import mock

        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # The constructor insists on loading weights; skip that step to get the bare architecture.
        with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}), \
                mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
            model = FeatureExtractorInceptionV3(extractor, ["2048"])
    elif extractor == "vgg16":
        model = torchvision.models.vgg16(weights=None)
    elif extractor == "imageclef2024":
        model = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=False,
                                                init_weights=False)
    else:
        raise ValueError(f"unknown extractor {extractor!r}")
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=2.0 / m.in_features ** 0.5, generator=g)
            torch.nn.init.zeros_(m.bias)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return path


def default_layer(extractor: str, metric: str) -> str:
    """torch-fidelity's default feature layer of an extractor for a metric (e.g. vgg16/prc -> fc2_relu)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric(metric)


# --------------------------------------------------------------------------------------------- cached extraction


@dataclass
class CachedFeatures:
    features: dict[str, torch.Tensor]
    key: str
    hit: bool
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)


def identity_key(identity: dict[str, Any]) -> str:
    return sha256_bytes(dumps_json({"format": FEATURES_FORMAT, **identity}).encode("utf-8"))


def cache_key(image_set: ImageSet, identity: dict[str, Any]) -> str:
    material = {"format": FEATURES_FORMAT, "images_sha256": image_set.sha256, "n": len(image_set), **identity}
    return sha256_bytes(dumps_json(material).encode("utf-8"))


def cache_path(key: str) -> Path:
    return features_dir() / key[:2] / f"{key}.pt"


def image_cache_path(ident_key: str, image_sha256: str) -> Path:
    return features_dir() / "images" / ident_key[:32] / f"{image_sha256}.pt"


def _load_blob(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # unreadable entry (e.g. from another torch version): recompute and overwrite
    if not isinstance(blob, dict) or blob.get("format") != FEATURES_FORMAT:
        return None
    try:
        os.utime(path)  # mtime = last use, for `harness cache prune --older-than`
    except OSError:
        pass
    return blob


def load_cached(key: str) -> dict[str, Any] | None:
    return _load_blob(cache_path(key))


def extract_features(image_set: ImageSet, identity: dict[str, Any], make_extractor: Callable[[], Extractor], *,
                     batch_size: int = 64, use_cache: bool = True, workers: int = 4,
                     load: Callable[[Path], torch.Tensor] | None = None, shape_key: Callable[[Path], Any] | None = None,
                     on_progress: Callable[[int], None] | None = None) -> CachedFeatures:
    """Features of `image_set`: the set's cache entry, else each image's entry, else computed for the images that
    have none (the extractor is only built then). `load`/`shape_key` replace the extractor's own (e.g. the real
    images' preprocessing); they must be part of `identity`."""
    key = cache_key(image_set, identity)
    path = cache_path(key)
    n = len(image_set)
    if use_cache:
        blob = load_cached(key)
        if blob is not None and len(next(iter(blob["features"].values()))) == n:
            if on_progress:
                on_progress(n)
            return CachedFeatures(blob["features"], key, True, path, {**blob.get("meta", {}), "images_extracted": 0})
    ident = identity_key(identity)
    per_image: list[dict[str, torch.Tensor] | None] = [None] * n
    if use_cache:
        for i, digest in enumerate(image_set.hashes):
            got = _load_blob(image_cache_path(ident, digest))
            if got is not None and isinstance(got.get("features"), dict):
                per_image[i] = got["features"]
    todo = [i for i in range(n) if per_image[i] is None]
    if on_progress and n - len(todo):
        on_progress(n - len(todo))
    weights: dict[str, Any] = {}
    if todo:
        extractor = make_extractor()
        weights = extractor.weights.to_dict()
        # Duplicate files (same content) are extracted once.
        first: dict[str, int] = {}
        for i in todo:
            first.setdefault(image_set.hashes[i], i)
        unique = list(first.values())
        feats = run_extractor(extractor, [image_set.paths[i] for i in unique], batch_size=batch_size, workers=workers,
                              load=load, shape_key=shape_key, on_progress=on_progress)
        by_hash = {image_set.hashes[i]: {k: v[j].clone() for k, v in feats.items()} for j, i in enumerate(unique)}
        for i in todo:
            per_image[i] = by_hash[image_set.hashes[i]]
        if use_cache:
            for digest, f in by_hash.items():
                p = image_cache_path(ident, digest)
                p.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(p) as tmp:
                    torch.save({"format": FEATURES_FORMAT, "features": f}, tmp)
    features = {k: torch.stack([f[k] for f in per_image]) for k in per_image[0]}  # type: ignore[index]
    meta = {"label": image_set.label, "images_sha256": image_set.sha256, "n": n, **identity,
            "identity_key": ident, "images_extracted": len(todo)}
    if weights:
        meta["weights"] = weights
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"format": FEATURES_FORMAT, "features": features, "meta": meta}, tmp)
    return CachedFeatures(features, key, False, path, meta)


def run_extractor(extractor: Extractor, paths: list[Path], *, batch_size: int = 64, workers: int = 4,
                  load: Callable[[Path], torch.Tensor] | None = None, shape_key: Callable[[Path], Any] | None = None,
                  on_progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Features for `paths` in their order. Samples are batched by equal shape (sorted by shape, then by index), so
    a same-size folder is batched exactly as torch-fidelity's DataLoader would batch it."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    load = load or extractor.load
    keys = [(shape_key or extractor.shape_key)(p) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: (str(keys[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and keys[batches[-1][0]] == keys[i] and len(batches[-1]) < batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    out: dict[str, list[torch.Tensor | None]] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # Decode the next batch while the network runs on the current one (PIL releases the GIL while decoding).
        pending = pool.map(load, [paths[i] for i in batches[0]]) if batches else None
        for b, idx in enumerate(batches):
            samples = list(pending)
            if b + 1 < len(batches):
                pending = pool.map(load, [paths[i] for i in batches[b + 1]])
            shapes = {tuple(s.shape) for s in samples}
            if len(shapes) != 1:  # header size disagreed with decoded size: run one by one
                feats = [extractor.forward(s.unsqueeze(0)) for s in samples]
                res = {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
            else:
                res = extractor.forward(torch.stack(samples))
            for k, v in res.items():
                slot = out.setdefault(k, [None] * len(paths))
                for j, i in enumerate(idx):
                    slot[i] = v[j]
            if on_progress:
                on_progress(len(idx))
    return {k: torch.stack(v) for k, v in out.items()}  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ cache upkeep


def _cache_files() -> dict[str, list[Path]]:
    """Cache files by kind: per-set features, per-image features, reused metric values."""
    root = features_dir()
    out: dict[str, list[Path]] = {"sets": [], "images": [], "metrics": []}
    if root.is_dir():
        for p in root.rglob("*.pt"):
            out["images" if (root / "images") in p.parents else "sets"].append(p)
    metrics = cache_root() / "metrics"
    if metrics.is_dir():
        out["metrics"] = list(metrics.glob("*.json"))
    return out


def cache_info() -> dict[str, Any]:
    """Count, size and age of each kind of cache entry (`harness cache info`)."""
    now = time.time()
    info: dict[str, Any] = {"root": str(cache_root())}
    for kind, files in _cache_files().items():
        stats = [f.stat() for f in files if f.is_file()]
        info[kind] = {"files": len(stats), "bytes": sum(s.st_size for s in stats),
                      "oldest_days": round(max(((now - s.st_mtime) / 86400 for s in stats), default=0.0), 2)}
    img_root = features_dir() / "images"
    info["images"]["extractor_identities"] = len([d for d in img_root.iterdir() if d.is_dir()]) \
        if img_root.is_dir() else 0
    return info


def prune_cache(older_than_days: float | None = None) -> tuple[int, int]:
    """Delete cache entries not used for `older_than_days` days (all entries when None); returns (files, bytes).
    Entries are touched on every use, so this keeps what current runs read."""
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    files = n_bytes = 0
    for paths in _cache_files().values():
        for p in paths:
            try:
                st = p.stat()
                if cutoff is None or st.st_mtime < cutoff:
                    p.unlink()
                    files += 1
                    n_bytes += st.st_size
            except FileNotFoundError:
                continue
    root = features_dir()
    if root.is_dir():  # drop emptied folders, deepest first
        for d in sorted((d for d in root.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            try:
                d.rmdir()
            except OSError:
                pass
    return files, n_bytes
