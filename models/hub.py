"""Where a diffusers pipeline comes from, for every family: a hub id resolved to its snapshot commit (the HF cache;
offline when HF_HUB_OFFLINE=1) or a local folder written by save_pretrained, fingerprinted so caches keyed on it never
reuse encodings of another model or revision; and the dtype keyword the installed diffusers reads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def dtype_kwargs(dtype: torch.dtype, version: str | None = None) -> dict[str, torch.dtype]:
    """The `from_pretrained` keyword that sets the dtype on the installed diffusers: `dtype` is read from 0.40 on
    (where `torch_dtype` is deprecated), while 0.35-0.39 read only `torch_dtype` and silently ignore `dtype`
    (fp16/bf16 would load as fp32)."""
    from packaging.version import Version

    if version is None:
        import diffusers

        version = diffusers.__version__
    return {"dtype": dtype} if Version(version).release >= (0, 40) else {"torch_dtype": dtype}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} unknown; choose fp32, bf16 or fp16")
    return DTYPES[dtype]


@dataclass
class Source:
    """Where a pipeline came from: what the user asked for, the folder it was read from, and the resolved commit."""

    requested: str
    folder: Path
    revision: str | None  # the requested revision (branch/tag/commit) for hub ids
    commit: str | None  # the snapshot commit for hub ids, None for plain local folders

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "folder": str(self.folder), "revision": self.revision,
                "commit": self.commit}


def resolve_source(source: str | Path, revision: str | None = None) -> Source:
    """A local pipeline folder as is, or a hub id downloaded (or found in the cache) and resolved to its commit."""
    p = Path(source)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(f"{p}: not a diffusers pipeline folder (no model_index.json)")
        return Source(str(source), p.resolve(), revision, None)
    text = str(source)
    if p.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1:  # a path, not an "org/name" hub id
        raise FileNotFoundError(f"cannot load {text!r}: no such pipeline folder")
    from diffusers import DiffusionPipeline

    try:
        folder = Path(DiffusionPipeline.download(str(source), revision=revision))
    except Exception as e:  # offline without a cached copy, unknown repo, bad revision
        raise FileNotFoundError(
            f"cannot load {source!r} (revision {revision or 'main'}): not a local pipeline folder, and the hub "
            f"download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    commit = folder.name if folder.parent.name == "snapshots" else None
    return Source(str(source), folder, revision, commit)


def fingerprint(folder: Path, subfolders: list[str], commit: str | None = None) -> str:
    """Identity of the named components of a pipeline folder: the commit when known, plus each config's content
    and each weight file's name, size and mtime (hashing gigabytes of weights would cost more than it saves)."""
    h = hashlib.sha256()
    h.update(f"commit={commit}\n".encode())
    for sub in subfolders:
        d = folder / sub
        for f in sorted(d.glob("*")) if d.is_dir() else []:
            if f.suffix == ".json" or f.suffix == ".txt":
                h.update(f"{sub}/{f.name}:".encode() + hashlib.sha256(f.read_bytes()).digest())
            elif f.is_file():
                st = f.stat()
                h.update(f"{sub}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
