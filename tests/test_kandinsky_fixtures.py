"""Shared fixtures of the Kandinsky tests (imported by the other test_kandinsky_* files), plus the loader tests.

`tiny_kandinsky`: tiny prior and decoder pipelines written with save_pretrained (once per session) - every test
loads them through the real loaders. `mini_data`: a 6-image dev set in the official layout (real images and
captions from the shipped sample) with a 4/2 split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention (~100x on small matmuls)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_kandinsky(tmp_path_factory) -> tuple[Path, Path]:
    """Written by the user-facing command `harness models make-tiny kandinsky22 DIR`: the tests and a user's offline
    smoke test run on the same models."""
    from harness.cli import main

    out = tmp_path_factory.mktemp("tiny-kandinsky")
    with pytest.raises(SystemExit) as e:
        main(["models", "make-tiny", "kandinsky22", str(out)])
    assert e.value.code == 0
    return out / "prior", out / "decoder"


def make_mini_devset(src: Path, out: Path, n_images: int = 6, n_val: int = 2) -> tuple[Path, Path]:
    """Copy the first `n_images` images of `src` with their caption rows; write a split with `n_val` val images."""
    from harness.data import load_devset
    from harness.io import sha256_file, write_json

    ds = load_devset(src)
    images = ds.images()[:n_images]
    (out / "images").mkdir(parents=True)
    for name in images:
        shutil.copy(ds.image_path(name), out / "images" / name)
    rows = [r for r in ds.rows if r.filename in set(images)]
    (out / "prompt-gt.csv").write_bytes(("Prompt;Filename\r\n" + "".join(
        f"{r.prompt};{r.filename}\r\n" for r in rows)).encode())
    csv_sha = sha256_file(out / "prompt-gt.csv")
    split = {"format": "harness-split/1", "seed": 0, "val_images_requested": n_val, "csv_sha256": csv_sha,
             "counts": {}, "strata": {}, "train": sorted(images[n_val:]), "val": sorted(images[:n_val])}
    write_json(out / "split.json", split)
    return out, out / "split.json"


@pytest.fixture
def mini_data(sample_dir, tmp_path) -> tuple[Path, Path]:
    return make_mini_devset(sample_dir, tmp_path / "mini")


def tiny_config(component: str, tiny_kandinsky, mini_data, tmp_path, **changes):
    """A KandinskyConfig that trains in about a second on the tiny models (32 px images)."""
    from harness.config import to_dict
    from harness.families.kandinsky22.train import config_from_dict, default_config

    prior_dir, decoder_dir = tiny_kandinsky
    d = to_dict(default_config(component))
    d.update(data_dir=str(mini_data[0]), split_path=str(mini_data[1]), prior=str(prior_dir),
             decoder=str(decoder_dir), cache_dir=str(tmp_path / "enc-cache"))
    d["data"]["resolution"] = 32
    d["loop"].update(max_steps=4, batch_size=2, checkpoint_every=0, val_every=0, val_batches=1, log_every=1, lr=1e-3)
    d["generation"].update(prior_steps=3, decoder_steps=3)
    for k, v in changes.items():
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    return config_from_dict(d)


# ----------------------------------------------------------------------------------------------------- loaders


def test_loaders_read_saved_pipelines_and_record_source(tiny_kandinsky):
    from models.kandinsky.loading import load_decoder, load_prior

    prior_dir, decoder_dir = tiny_kandinsky
    p = load_prior(prior_dir, dtype="fp32", device="cpu")
    d = load_decoder(decoder_dir, dtype="bf16", device="cpu")
    assert type(p.prior).__name__ == "PriorTransformer"
    assert type(p.text_encoder).__name__ == "CLIPTextModelWithProjection"
    assert type(p.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert type(p.scheduler).__name__ == "UnCLIPScheduler"
    assert p.tokenizer.model_max_length == 77 and p.prior.config.num_embeddings == 77
    assert torch.equal(p.prior.clip_std, torch.ones_like(p.prior.clip_std))
    assert d.unet.dtype == torch.bfloat16 and d.movq.dtype == torch.bfloat16
    assert p.source.folder == prior_dir.resolve() and p.source.commit is None
    # frozen and in eval mode: nothing here is trained unless a LoRA adapter is added
    assert not any(q.requires_grad for q in p.prior.parameters())
    # dtype is part of the encoder fingerprint (it changes the cached outputs)
    assert load_prior(prior_dir, dtype="bf16").fingerprints["text"] != p.fingerprints["text"]


def test_loader_errors_are_clear(tmp_path):
    from models.kandinsky.loading import load_prior

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_prior(tmp_path / "empty")
    # a hub id with HF_HUB_OFFLINE=1 and nothing cached: the message names the id and the revision
    with pytest.raises(FileNotFoundError, match="kandinsky-community/kandinsky-2-2-prior.*revision main"):
        load_prior()


def test_fingerprint_changes_with_weights(tiny_kandinsky, tmp_path):
    from models.hub import fingerprint

    copy = tmp_path / "prior"
    shutil.copytree(tiny_kandinsky[0], copy)
    before = fingerprint(copy, ["text_encoder"])
    assert fingerprint(copy, ["text_encoder"]) == before
    cfg = copy / "text_encoder" / "config.json"
    d = json.loads(cfg.read_text())
    d["layer_norm_eps"] = 1e-6
    cfg.write_text(json.dumps(d))
    assert fingerprint(copy, ["text_encoder"]) != before


def test_make_tiny_writes_diffusers_layout_and_refuses_to_overwrite(tiny_kandinsky, tmp_path, run_cli):
    """The command's folders are plain diffusers pipelines (model_index.json names the real classes) and load through
    the project's loaders; a second call into the same folder is one clear line, nothing overwritten."""
    from models.kandinsky.loading import load_decoder, load_prior

    prior_dir, decoder_dir = tiny_kandinsky
    assert json.loads((prior_dir / "model_index.json").read_text())["_class_name"] == "KandinskyV22PriorPipeline"
    assert json.loads((decoder_dir / "model_index.json").read_text())["_class_name"] == "KandinskyV22Pipeline"
    for sub in ("prior", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler"):
        assert (prior_dir / sub).is_dir(), sub
    for sub in ("unet", "movq", "scheduler"):
        assert (decoder_dir / sub).is_dir(), sub
    p, d = load_prior(prior_dir), load_decoder(decoder_dir)
    assert d.unet.config.encoder_hid_dim == p.prior.config.embedding_dim  # the two halves fit together
    before = (prior_dir / "prior" / "diffusion_pytorch_model.safetensors").read_bytes()
    code, out, err = run_cli("models", "make-tiny", "kandinsky22", prior_dir.parent)
    assert code == 2 and "already exists" in err and "Traceback" not in err
    assert (prior_dir / "prior" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not [f for f in prior_dir.parent.iterdir() if f.name.startswith(".")]  # no temp folder left


@pytest.mark.parametrize("version,key", [("0.35.0", "torch_dtype"), ("0.39.2", "torch_dtype"),
                                         ("0.40.0", "dtype"), ("0.42.0.dev0", "dtype")])
def test_dtype_keyword_matches_the_installed_diffusers(version, key):
    from models.hub import dtype_kwargs

    assert dtype_kwargs(torch.float16, version) == {key: torch.float16}


def test_half_precision_load_on_a_diffusers_that_ignores_dtype(tiny_kandinsky, monkeypatch):
    """diffusers 0.35-0.39 ignore `dtype=` (only `torch_dtype` is read): emulated by a from_pretrained that drops it.
    The loader must still give bf16 weights there."""
    import diffusers
    from diffusers import KandinskyV22Pipeline

    from models.kandinsky.loading import load_decoder

    real = KandinskyV22Pipeline.from_pretrained.__func__

    def old_from_pretrained(cls, *args, **kwargs):
        kwargs.pop("dtype", None)  # what 0.39 does with an unknown keyword: nothing
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers, "__version__", "0.39.0")
    monkeypatch.setattr(KandinskyV22Pipeline, "from_pretrained", classmethod(old_from_pretrained))
    d = load_decoder(tiny_kandinsky[1], dtype="bf16")
    assert d.unet.dtype == torch.bfloat16 and d.movq.dtype == torch.bfloat16
