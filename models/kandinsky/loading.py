"""Load the Kandinsky 2.2 prior and decoder parts from a hub id or a local pipeline folder.

    prior = load_prior("kandinsky-community/kandinsky-2-2-prior", revision=None, dtype="fp16", device="cuda")
    decoder = load_decoder("/data/models/kandinsky-2-2-decoder")          # a folder written by save_pretrained

A hub id is first resolved to its snapshot folder (the HF cache; offline when HF_HUB_OFFLINE=1), so the exact commit
is known and recorded with every run; a local folder is fingerprinted from its configs and weight-file sizes and
times. The fingerprint keys the frozen-encoder cache: a different model or revision never reuses stale encodings.
Tests build tiny components (models/kandinsky/testing.py), save them with save_pretrained and come back through
these same functions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"

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


@dataclass
class PriorParts:
    prior: Any  # PriorTransformer
    text_encoder: Any  # CLIPTextModelWithProjection
    tokenizer: Any  # CLIPTokenizer
    image_encoder: Any  # CLIPVisionModelWithProjection
    image_processor: Any  # CLIPImageProcessor
    scheduler: Any  # UnCLIPScheduler (sampling)
    source: Source
    dtype: torch.dtype = torch.float32
    fingerprints: dict[str, str] = field(default_factory=dict)  # text / image encoder identities

    def to(self, device: str | torch.device) -> "PriorParts":
        for m in (self.prior, self.text_encoder, self.image_encoder):
            m.to(device)
        return self


@dataclass
class DecoderParts:
    unet: Any  # UNet2DConditionModel
    movq: Any  # VQModel
    scheduler: Any  # DDPMScheduler (training noise and sampling)
    source: Source
    dtype: torch.dtype = torch.float32
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def movq_scale_factor(self) -> int:
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    def to(self, device: str | torch.device) -> "DecoderParts":
        self.unet.to(device)
        self.movq.to(device)
        return self


def load_prior(source: str | Path = DEFAULT_PRIOR, revision: str | None = None, dtype: str | torch.dtype = "fp32",
               device: str | torch.device = "cpu") -> PriorParts:
    """The prior pipeline's parts (prior, CLIP text and image towers, tokenizer, image processor, UnCLIP scheduler)."""
    from diffusers import KandinskyV22PriorPipeline

    src = resolve_source(source, revision)
    dt = to_dtype(dtype)
    pipe = KandinskyV22PriorPipeline.from_pretrained(src.folder, **dtype_kwargs(dt))
    parts = PriorParts(
        prior=pipe.prior, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, image_encoder=pipe.image_encoder,
        image_processor=pipe.image_processor, scheduler=pipe.scheduler, source=src, dtype=dt,
        fingerprints={
            "text": fingerprint(src.folder, ["text_encoder", "tokenizer"], src.commit) + f":{dt}",
            "image": fingerprint(src.folder, ["image_encoder", "image_processor"], src.commit) + f":{dt}",
        },
    )
    for m in (parts.prior, parts.text_encoder, parts.image_encoder):
        m.eval().requires_grad_(False)
    return parts.to(device)


def load_decoder(source: str | Path = DEFAULT_DECODER, revision: str | None = None, dtype: str | torch.dtype = "fp32",
                 device: str | torch.device = "cpu") -> DecoderParts:
    """The decoder pipeline's parts (UNet, MoVQ, scheduler)."""
    from diffusers import KandinskyV22Pipeline

    src = resolve_source(source, revision)
    dt = to_dtype(dtype)
    pipe = KandinskyV22Pipeline.from_pretrained(src.folder, **dtype_kwargs(dt))
    parts = DecoderParts(unet=pipe.unet, movq=pipe.movq, scheduler=pipe.scheduler, source=src, dtype=dt,
                         fingerprints={"movq": fingerprint(src.folder, ["movq"], src.commit) + f":{dt}"})
    for m in (parts.unet, parts.movq):
        m.eval().requires_grad_(False)
    return parts.to(device)


def scheduler_config(scheduler) -> dict[str, Any]:
    return json.loads(json.dumps(dict(scheduler.config), default=str))


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute activations in the backward pass instead of storing them (the memory of a large batch).

    The UNet has diffusers' own switch (`enable_gradient_checkpointing`, as diffusers' Kandinsky decoder trainer
    uses). `PriorTransformer` has none, so each of its transformer blocks is wrapped here: the block's `forward` runs
    under non-reentrant `torch.utils.checkpoint` while the model trains with gradients on. Parameter names do not
    change, so checkpoints and exported adapters are the same; the gradients are the same up to float rounding.
    """
    if getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing()
        return model
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no gradient-checkpointing support")
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_harness_checkpointed", False):
            continue
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            if model.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward
        block._harness_checkpointed = True
    return model
