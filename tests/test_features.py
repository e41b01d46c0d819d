"""Feature cache and batching (harness/features.py), with a cheap stand-in extractor (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.distributed import pick_device
from harness.errors import UserError
from harness.features import (
    Extractor,
    ImageSet,
    ResolvedWeights,
    cache_path,
    cache_root,
    extract_features,
    features_dir,
    run_extractor,
    uint8_chw,
)


class MeanColour(Extractor):
    """Per-image mean colour and size: enough to see order, batching and caching."""

    name = "mean-colour"
    layers = ("rgb", "hw")
    preprocess_id = "uint8_chw"

    def __init__(self):
        self.weights = ResolvedWeights(Path("none"), "0" * 64, True, "explicit")
        self.batches: list[tuple[int, ...]] = []

    def load(self, path: Path) -> torch.Tensor:
        return uint8_chw(path)

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches.append(tuple(batch.shape))
        hw = torch.tensor([[batch.shape[2], batch.shape[3]]] * len(batch), dtype=torch.float32)
        return {"rgb": batch.float().mean(dim=(2, 3)), "hw": hw}


IDENTITY = {"extractor": "mean-colour", "layers": ["hw", "rgb"], "weights_sha256": "0" * 64, "preprocess": "x"}


def _images(folder: Path, sizes, seed=0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_batches_by_size_and_keeps_input_order(tmp_path):
    sizes = [(40, 30), (32, 32), (40, 30), (32, 32), (50, 20), (40, 30), (40, 30), (32, 32)]
    paths = _images(tmp_path, sizes)
    ex = MeanColour()
    feats = run_extractor(ex, paths, batch_size=2)
    assert all(len(b) == 4 and b[0] <= 2 for b in ex.batches)  # stacked batches, never above batch_size
    assert len(ex.batches) == 5  # 4 of 40x30 -> 2 batches, 3 of 32x32 -> 2, 1 of 50x20 -> 1
    for i, p in enumerate(paths):
        one = MeanColour().forward(uint8_chw(p).unsqueeze(0))
        assert torch.equal(feats["rgb"][i], one["rgb"][0])
        assert feats["hw"][i].tolist() == [sizes[i][1], sizes[i][0]]


def test_uint8_chw_is_what_torch_fidelity_receives(tmp_path):
    rgba = np.zeros((6, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((6, 5), 77, np.uint8), "L").save(tmp_path / "g.png")
    a, g = uint8_chw(tmp_path / "a.png"), uint8_chw(tmp_path / "g.png")
    assert a.dtype == torch.uint8 and a.shape == (3, 6, 5) and g.shape == (3, 6, 5)
    assert int(a[0, 0, 0]) == round(200 * 128 / 255) and int(a[1, 0, 0]) == 0  # alpha composited on black
    assert (g == 77).all()


def test_image_set_hash_follows_names_and_bytes(tmp_path):
    paths = _images(tmp_path / "a", [(8, 8)] * 3)
    h = ImageSet("a", paths).sha256
    copy = tmp_path / "b"
    shutil.copytree(tmp_path / "a", copy)
    assert ImageSet("b", sorted(copy.iterdir())).sha256 == h  # same content elsewhere: same key
    assert ImageSet("a", paths[::-1]).sha256 != h  # order matters (IS splits, KID subsets)
    (copy / "001.png").rename(copy / "009.png")
    assert ImageSet("b", sorted(copy.iterdir())).sha256 != h
    with pytest.raises(UserError, match="not found"):
        ImageSet("x", [tmp_path / "missing.png"])
    with pytest.raises(UserError, match="empty"):
        ImageSet("x", [])


def test_cache_hit_miss_and_invalidation(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    assert features_dir() == tmp_path / "cache" / "features"
    paths = _images(tmp_path / "imgs", [(16, 16)] * 4)
    built = []

    def make():
        built.append(MeanColour())
        return built[-1]

    first = extract_features(ImageSet("s", paths), IDENTITY, make)
    assert not first.hit and first.path.is_file() and len(built) == 1
    second = extract_features(ImageSet("s", paths), IDENTITY, make)
    assert second.hit and len(built) == 1 and torch.equal(second.features["rgb"], first.features["rgb"])
    assert second.meta["images_sha256"] == ImageSet("s", paths).sha256

    # Other weights -> other key; a changed image -> other key.
    other = extract_features(ImageSet("s", paths), {**IDENTITY, "weights_sha256": "1" * 64}, make)
    assert not other.hit and other.key != first.key
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(paths[2])
    changed = extract_features(ImageSet("s", paths), IDENTITY, make)
    assert not changed.hit and float(changed.features["rgb"][2].sum()) == 0.0

    # A corrupt entry is recomputed and replaced, not trusted.
    cache_path(changed.key).write_bytes(b"garbage")
    again = extract_features(ImageSet("s", paths), IDENTITY, make)
    assert not again.hit and torch.equal(again.features["rgb"], changed.features["rgb"])
    assert extract_features(ImageSet("s", paths), IDENTITY, make).hit

    # use_cache=False neither reads nor writes
    n = len(built)
    assert not extract_features(ImageSet("s", paths), IDENTITY, make, use_cache=False).hit and len(built) == n + 1
    assert not list((tmp_path / "cache" / "features").rglob("*.tmp-*"))


def test_default_cache_lives_under_the_runs_root(monkeypatch, tmp_path):
    monkeypatch.delenv("HARNESS_CACHE_DIR", raising=False)
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "r"))
    assert cache_root() == tmp_path / "r" / ".cache"


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError, match="not a torch device"):
        pick_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            pick_device("cuda")
