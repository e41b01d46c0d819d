"""Frozen-encoder cache for Kandinsky training: encode once, train many steps.

The CLIP text tower, the CLIP image tower and the MoVQ encoder are frozen, and with no image augmentation their
outputs for a given (image, caption) never change - yet the public training scripts recompute them every step, and
for the real models they cost more than the trained network itself (see benchmarks/p1_kandinsky_cache.py). Here each
output is computed once and stored as a safetensors file under a content-hash key:

    text entry   = sha256("text",  text-tower fingerprint, caption)               -> text_embeds, text_hidden, text_mask
    image entry  = sha256(kind,    tower fingerprint, preprocessing, image sha256) -> image_embeds | latents

The fingerprints name the model folder's configs and weight files and the resolved hub commit (plus dtype), the
preprocessing is (resolution, fit) and the image hash is of the file's bytes - so editing an image, changing the
resolution, the padding mode, the model, its revision or its dtype gives new keys (a miss), never a stale hit.
Entries are written atomically (temp file + rename); a damaged entry is treated as a miss and rewritten.

Augmentation: the cache stores the un-augmented image only, so training refuses `--cache` when the dataset jitters
or flips images (use `--no-cache`; the encoders then run every step on the augmented pixels). Caption dropout and
paraphrases are not image augmentation: every caption they can produce ("" included) is encoded up front.

Location: `$HARNESS_CACHE_DIR/kandinsky-encoders/` or `<runs root>/.cache/kandinsky-encoders/`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from harness.errors import UserError
from harness.io import write_bytes
from harness.runs import runs_root

CACHE_FORMAT = 1
SUBDIR = "kandinsky-encoders"


def default_cache_dir() -> Path:
    env = os.environ.get("HARNESS_CACHE_DIR")
    return (Path(env) if env else runs_root() / ".cache") / SUBDIR


def content_key(*parts: str) -> str:
    h = hashlib.sha256(f"harness-encoder-cache:{CACHE_FORMAT}".encode())
    for p in parts:
        b = p.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)  # length-prefixed: ("ab", "c") != ("a", "bc")
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt}


@dataclass
class TensorStore:
    """key -> dict of tensors, one safetensors file per key under root/<key[:2]>/<key>.safetensors."""

    root: Path
    stats: CacheStats = field(default_factory=CacheStats)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """True when the entry exists and is complete (safetensors header parses and the file is as long as the
        header says: a truncated or foreign file is removed and reported missing). Reads only the header."""
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if p.stat().st_size == 8 + n + end:
                return True
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, MemoryError):
            pass
        self.stats.corrupt += 1
        p.unlink(missing_ok=True)
        return False

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return load_file(p)
        except Exception:  # truncated or foreign file: recompute rather than fail the run
            self.stats.corrupt += 1
            p.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta or {})
        return write_bytes(self.path(key), data)

    def fill(self, keys: Sequence[str], compute: Callable[[list[int]], list[dict[str, torch.Tensor]]],
             batch_size: int = 32, on_progress: Callable[[int], None] | None = None,
             meta: Callable[[int], dict[str, str]] | None = None) -> CacheStats:
        """Make sure every key exists; `compute(indices)` returns the entries of the missing `indices`, in order.
        Returns this call's hit/miss counts."""
        local = CacheStats()
        missing = []
        for i, k in enumerate(keys):
            if self.has(k):
                local.hits += 1
                if on_progress:
                    on_progress(1)
            else:
                missing.append(i)
        local.misses = len(missing)
        for start in range(0, len(missing), batch_size):
            idx = missing[start : start + batch_size]
            for i, entry in zip(idx, compute(idx)):
                self.put(keys[i], entry, meta(i) if meta else None)
            if on_progress:
                on_progress(len(idx))
        self.stats.hits += local.hits
        self.stats.misses += local.misses
        return local


def text_key(fingerprint: str, caption: str) -> str:
    return content_key("text", fingerprint, caption)


def image_key(kind: str, fingerprint: str, preprocessing: dict, image_sha256: str) -> str:
    return content_key(kind, fingerprint, json.dumps(preprocessing, sort_keys=True), image_sha256)


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def needed_captions(ds) -> list[str]:
    """Every caption a `harness.dataset.CaptionedImages` can produce: its pools, their paraphrases (replace
    strategies) and "" (caption dropout) - what a frozen text encoder's cache must hold."""
    caps = [c for pool in ds.pools for c in pool]
    caps += [p for c in list(caps) for p in ds.paraphrases.get(c, [])]
    return unique(caps + [""])


class CachedItemsBase(torch.utils.data.Dataset):
    """Items of a `harness.dataset.CaptionedImages` (`base`: the same caption draws for the same (seed, epoch,
    index)) read from a `TensorStore` instead of recomputed by frozen encoders. A family's subclass says in
    `__getitem__` which cached entries (text encodings, latents, image embeddings) make up an item."""

    def __init__(self, base, store: TensorStore):
        self.base, self.store = base, store

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, key: str) -> dict[str, torch.Tensor]:
        entry = self.store.get(key)
        if entry is None:
            raise UserError(f"encoder cache entry {key[:12]}... vanished during training; rerun to refill it",
                            self.store.path(key))
        return entry
