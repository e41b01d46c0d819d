"""CaptionedImages: preprocessing geometry, exact per-(seed, epoch, index) randomness, caption modes, paraphrases;
uint8 items and `to_model_pixels` (same model inputs as the float32 items before, at the MSDM consumers too)."""

from __future__ import annotations

import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import from_dict
from harness.data import load_devset
from harness.dataset import (
    CaptionedImages,
    DatasetConfig,
    ParaphraseStrategy,
    collate_items,
    item_rng,
    load_training_data,
    preprocess_image,
    to_model_pixels,
)
from harness.errors import UserError
from harness.split import write_split


@pytest.fixture
def devset(sample_dir):
    return load_devset(sample_dir)


def _ds(devset, n=12, paraphrases=None, **cfg):
    return CaptionedImages(devset, devset.images()[:n], DatasetConfig(resolution=32, **cfg), paraphrases)


def test_pad_keeps_the_whole_frame_and_pads_black():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    x = preprocess_image(img, 16, "pad")
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.all(x[:, :4] == -1) and torch.all(x[:, 12:] == -1)  # 40x20 -> 16x8, centred: 4 black rows each side
    assert torch.allclose(x[:, 4:12], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 8, 16))


def test_crop_fills_the_square():
    img = Image.new("RGB", (40, 20), (0, 255, 0))
    x = preprocess_image(img, 16, "crop")
    assert x.shape == (3, 16, 16) and torch.all(x[1] == 1) and torch.all(x[0] == -1)


def test_locations_survive_preprocessing():
    """A bright patch in the upper-left stays upper-left (the prompts name locations; nothing flips by default)."""
    a = np.zeros((60, 100, 3), np.uint8)
    a[5:20, 5:25] = 255
    x = preprocess_image(Image.fromarray(a), 32, "pad")
    bright = (x.mean(0) > 0).nonzero().float().mean(0)
    assert bright[0] < 16 and bright[1] < 16


def test_items_are_pure_functions_of_seed_epoch_index(devset):
    cfg = dict(jitter=0.3, caption_dropout=0.2, hflip=True)
    a, b = _ds(devset, **cfg), _ds(devset, **cfg)
    order_a = [a[i] for i in range(len(a))]
    order_b = [b[i] for i in reversed(range(len(b)))][::-1]  # access order does not matter
    for x, y in zip(order_a, order_b):
        assert x["caption"] == y["caption"] and x["image_id"] == y["image_id"]
        assert torch.equal(x["pixels"], y["pixels"])
    a.set_epoch(1)
    assert [a[i]["caption"] for i in range(len(a))] != [x["caption"] for x in order_a]
    c = _ds(devset, seed=1, **cfg)
    assert [c[i]["caption"] for i in range(len(c))] != [x["caption"] for x in order_a]


def test_sample_mode_draws_uniformly_from_the_image_captions(devset):
    ds = _ds(devset, n=1)
    caps = devset.captions_by_image()[ds.image_ids[0]]
    seen = Counter()
    for epoch in range(400):
        ds.set_epoch(epoch)
        seen[ds.caption_for(0, item_rng(0, epoch, 0))[1]] += 1
    assert set(seen) == set(caps)
    assert max(seen.values()) < 3 * min(seen.values())
    assert len(ds) == 1


def test_all_mode_is_one_item_per_row(devset):
    ds = _ds(devset, n=3, captions="all")
    by = devset.captions_by_image()
    rows = [(i, c) for i in ds.image_ids for c in by[i]]
    assert len(ds) == len(rows)
    assert [(ds.image_ids[i], ds.pools[i][k]) for i, k in ds.pairs] == rows
    assert ds[len(ds) - 1]["caption"] == rows[-1][1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def _paraphrases(devset, ids, skip_every=3):
    by = devset.captions_by_image()
    caps = sorted({c for i in ids for c in by[i]})
    return {c: [f"P1 {c}", f"P2 {c}"] for k, c in enumerate(caps) if k % skip_every}, caps


def test_paraphrase_strategies(devset):
    ids = devset.images()[:6]
    para, caps = _paraphrases(devset, ids)
    cfg = dict(resolution=32, captions="all")

    add = CaptionedImages(devset, ids, DatasetConfig(**cfg, paraphrase_strategy="add"), para)
    got = {add.pools[i][k] for i, k in add.pairs}
    assert set(caps) <= got and {p for c in caps for p in para.get(c, [])} <= got

    ra = CaptionedImages(devset, ids, DatasetConfig(**cfg, paraphrase_strategy="replace-all"), para)
    out = [ra.caption_for(i, np.random.default_rng(i))[1] for i in range(len(ra))]
    assert all(o.startswith("P") or o not in para for o in out)  # originals only where no paraphrase exists
    assert ra.stats()["captions_without_paraphrase"] == len([c for c in caps if c not in para]) > 0

    half = CaptionedImages(devset, ids, DatasetConfig(**cfg, paraphrase_strategy="replace:0.5"), para)
    has_para = [i for i, (j, k) in enumerate(half.pairs) if half.pools[j][k] in para]
    swapped = [half.caption_for(i, np.random.default_rng(100 + i))[1].startswith("P") for i in has_para]
    assert 0.3 < sum(swapped) / len(swapped) < 0.7


@pytest.mark.parametrize("text", ["replace", "replace:0", "replace:1.5", "replace:x", "sometimes", "add:0.5"])
def test_bad_strategy_strings(text):
    with pytest.raises(UserError, match="paraphrase strategy"):
        ParaphraseStrategy.parse(text)


def test_strategy_needs_paraphrases(devset):
    with pytest.raises(UserError, match="needs a paraphrase file"):
        CaptionedImages(devset, devset.images()[:2], DatasetConfig(paraphrase_strategy="add"), None)
    assert str(ParaphraseStrategy.parse("replace:0.25")) == "replace:0.25"


def test_caption_dropout(devset):
    ds = _ds(devset, n=48, caption_dropout=1.0)
    assert all(ds[i]["caption"] == "" for i in range(4))
    ds = CaptionedImages(devset, devset.images(), DatasetConfig(resolution=32, captions="all", caption_dropout=0.2))
    n = sum(ds.caption_for(i, np.random.default_rng(i))[1] == "" for i in range(len(ds)))
    assert 0.12 < n / len(ds) < 0.28


def test_jitter_changes_content_but_not_the_padding(devset):
    plain, jit = _ds(devset), _ds(devset, jitter=0.4)
    differs = padded = 0
    for i in range(6):
        a, b = plain[i]["pixels"], jit[i]["pixels"]
        differs += not torch.equal(a, b)
        w, h = Image.open(devset.image_path(plain.image_ids[i])).size
        nh, nw = round(h * 32 / max(w, h)), round(w * 32 / max(w, h))
        top, left = (32 - nh) // 2, (32 - nw) // 2
        pad = torch.ones(32, 32, dtype=torch.bool)
        pad[top:top + nh, left:left + nw] = False
        padded += int(pad.any())
        assert torch.all(b[:, pad] == 0)  # jitter happens before padding: the padding stays exactly black
    assert differs >= 5 and padded >= 3


def test_config_is_typed_and_validated():
    cfg = from_dict(DatasetConfig, {"resolution": 64, "fit": "crop", "paraphrase_strategy": "replace:0.3"})
    assert cfg.resolution == 64 and cfg.fit == "crop"
    with pytest.raises(UserError, match="unknown key"):
        from_dict(DatasetConfig, {"resolutoin": 64})
    with pytest.raises(UserError, match="fit"):
        from_dict(DatasetConfig, {"fit": "stretch"})
    with pytest.raises(UserError, match="jitter"):
        DatasetConfig(jitter=1.5)
    with pytest.raises(UserError, match="paraphrase strategy"):
        DatasetConfig(paraphrase_strategy="bogus")


def test_load_training_data_and_loader(sample_dir, tmp_path):
    split = tmp_path / "split.json"
    write_split(sample_dir, split, val_images=8)
    ds, hashes = load_training_data(sample_dir, split, "val", DatasetConfig(resolution=32))
    assert len(ds) == 8 and hashes["side"] == "val" and hashes["n_images"] == 8
    assert hashes["csv_sha256"] == load_devset(sample_dir).csv_sha256 and len(hashes["split_sha256"]) == 64
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_items)))
    assert batch["pixels"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    assert batch["pixels"].dtype == torch.uint8  # converted to [-1, 1] on the training device (to_model_pixels)
    tr, h = load_training_data(sample_dir, split, "train")
    assert len(tr) == 40 and not set(tr.image_ids) & set(ds.image_ids)
    with pytest.raises(UserError, match="'train' or 'val'"):
        load_training_data(sample_dir, split, "test")


def test_load_training_data_refuses_a_missing_image(sample_dir, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sample_dir, root, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    split = tmp_path / "split.json"
    write_split(root, split, val_images=8)
    from harness.split import load_split

    (root / "images" / load_split(split).val[0]).unlink()
    with pytest.raises(UserError, match="missing"):
        load_training_data(root, split, "val")


def test_items_do_not_depend_on_worker_count(devset):
    ds = _ds(devset, n=8, jitter=0.2, caption_dropout=0.3)
    ds.set_epoch(3)
    direct = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_items)
    batched = [(c, p) for b in loader for c, p in zip(b["caption"], b["pixels"])]
    assert [c for c, _ in batched] == [d["caption"] for d in direct]
    assert all(torch.equal(p, d["pixels"]) for (_, p), d in zip(batched, direct))


def test_flip_only_when_the_caption_was_dropped(devset):
    ids = devset.images()[:6]
    plain = CaptionedImages(devset, ids, DatasetConfig(resolution=32))
    always_dropped = CaptionedImages(devset, ids, DatasetConfig(resolution=32, caption_dropout=1.0, hflip_uncond=True))
    never_dropped = CaptionedImages(devset, ids, DatasetConfig(resolution=32, caption_dropout=0.0, hflip_uncond=True))
    flipped = 0
    for i in range(6):
        ref = plain[i]["pixels"]
        assert torch.equal(never_dropped[i]["pixels"], ref)  # a kept caption is never flipped (it may name a side)
        d = always_dropped[i]
        assert d["caption"] == ""
        if torch.equal(d["pixels"], ref.flip(-1)) and not torch.equal(ref, ref.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(d["pixels"], ref)
    assert 0 < flipped < 6  # p = 0.5 per item (seeded)


def test_jpeg_decoded_at_training_resolution_matches_full_decode(fullres_dir):
    import numpy as np
    from PIL import Image

    from harness.dataset import open_for_training, preprocess_image
    from harness.images import open_rgb

    path = sorted((fullres_dir / "images").glob("*.jpg"))[0]
    full = open_rgb(path)
    small = open_for_training(path, 256, "pad")
    assert max(small.size) < max(full.size) and max(small.size) >= 256  # DCT-scaled decode, still covers 256 px
    a, b = preprocess_image(full, 256), preprocess_image(small, 256)
    # same image up to the decoder's scaling filter: mean abs difference under 1.5 grey levels of 255
    assert float((a - b).abs().mean()) * 127.5 < 1.5
    assert isinstance(small, Image.Image) and np.asarray(small).dtype == np.uint8


def _old_float_item(ds, index):
    """The item path before uint8 items, written out: decode at the training scale, resize, PIL jitter, pad, flip,
    then float32 in [-1, 1] in the loader (`x / 127.5 - 1`)."""
    from PIL import ImageEnhance

    from harness.dataset import _place, _resize, open_for_training

    rng = item_rng(ds.cfg.seed, ds.epoch, index)
    i, caption = ds.caption_for(index, rng)
    r, fit = ds.cfg.resolution, ds.cfg.fit
    img = _resize(open_for_training(ds.devset.image_path(ds.image_ids[i]), r, fit), r, fit)
    if ds.cfg.jitter > 0:
        b, c = rng.uniform(1 - ds.cfg.jitter, 1 + ds.cfg.jitter, size=2)
        img = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(float(b))).enhance(float(c))
    flip = rng.random() < 0.5 and (ds.cfg.hflip or (ds.cfg.hflip_uncond and caption == ""))
    img = _place(img, r, fit)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_uint8_items_give_the_float_path_batch(devset, fit):
    """Items are uint8 and `to_model_pixels` makes the model input on the device. Every augmentation (resize,
    brightness/contrast jitter, padding, flip) already ran on 8-bit PIL images, so the new path is not just within
    the 1/127.5 quantisation step of the old float path: it is the same float32 batch, bit for bit."""
    ds = _ds(devset, n=8, fit=fit, jitter=0.4, caption_dropout=0.5, hflip_uncond=True)
    ds.set_epoch(2)
    batch = collate_items([ds[i] for i in range(len(ds))])
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (8, 3, 32, 32)
    old = torch.stack([_old_float_item(ds, i) for i in range(len(ds))])
    new = to_model_pixels(batch["pixels"], "cpu")
    assert new.dtype == torch.float32 and new.is_contiguous()
    assert float((new - old).abs().max()) <= 1 / 127.5  # the contract: at most one uint8 step
    assert torch.equal(new, old)  # and in fact identical
    # clean_pixels (what the encoder caches and the MSDM latents encode) follows the same contract
    clean = _ds(devset, n=2, fit=fit)
    assert clean.clean_pixels(0).dtype == torch.uint8
    assert torch.equal(to_model_pixels(clean.clean_pixels(0)), _old_float_item(clean, 0))


def test_to_model_pixels_range_dtype_and_refusal():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    y = to_model_pixels(x)
    assert y.dtype == torch.float32 and float(y.min()) == -1.0 and float(y.max()) == 1.0
    assert torch.equal(y.flatten()[:256], torch.arange(256).float() / 127.5 - 1)
    # bf16: the float32 value rounded once, as a float32 item cast by the model used to be
    assert torch.equal(to_model_pixels(x, dtype=torch.bfloat16), y.to(torch.bfloat16))
    cl = to_model_pixels(x.contiguous(memory_format=torch.channels_last))  # the trainer's --channels-last survives
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, y)
    with pytest.raises(TypeError, match="uint8"):
        to_model_pixels(y)  # converting twice would squash the range


# -- the uint8 contract at its consumers: the MSDM stages see the same model inputs as with the float32 items
# (the Kandinsky 2.2, Kandinsky 3.0 and SD tasks are checked by their own cache-vs-pixels tests).
def _tiny_vae():
    from models.msdm.presets import get_preset
    from models.msdm.vae import MSDMAutoencoder

    torch.manual_seed(0)
    return MSDMAutoencoder(**get_preset("tiny").vae).eval()


def test_msdm_unet_latents_from_pixels_match_the_cache_and_the_float_path(sample_dir):
    """UNetTask.latents on a pixel batch (--no-cache-latents / augmentation), on the cached posteriors
    (`encode_images` over `clean_pixels`) and the VAE on the old float32 items: the same latents."""
    from harness.families.msdm.data import CachedLatents, encode_images
    from harness.families.msdm.unet_task import UNetTask

    dev = load_devset(sample_dir)
    ds = CaptionedImages(dev, dev.images()[:4], DatasetConfig(resolution=32))
    vae = _tiny_vae()
    means, logvars = encode_images(vae, ds, "cpu", batch_size=3)
    cached = CachedLatents(ds, means, logvars)
    task = types.SimpleNamespace(vae=vae, latent_scale=0.7)  # the two attributes UNetTask.latents reads
    pixel_batch = collate_items([ds[i] for i in range(4)])
    assert pixel_batch["pixels"].dtype == torch.uint8
    cache_batch = {k: torch.stack([cached[i][k] for i in range(4)]) for k in ("mean", "logvar")}
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    z_pixels = UNetTask.latents(task, pixel_batch, gen())
    z_cache = UNetTask.latents(task, cache_batch, gen())
    assert torch.allclose(z_pixels, z_cache, atol=1e-6)  # batch 4 vs 3: conv kernels may sum in another order
    with torch.no_grad():
        old_mean, _ = vae.encode(torch.stack([_old_float_item(ds, i) for i in range(4)]))
        new_mean, _ = vae.encode(to_model_pixels(pixel_batch["pixels"]))
    assert torch.equal(old_mean, new_mean)


def test_msdm_vae_loss_on_uint8_batch_equals_the_float_path(sample_dir, tmp_path):
    from harness.families.msdm.config import vae_config
    from harness.families.msdm.data import load_sides
    from harness.families.msdm.vae_task import VAETask, vae_loss
    from harness.split import write_split

    split = tmp_path / "split.json"
    write_split(sample_dir, split, val_images=4)
    cfg = vae_config("tiny", sample_dir, split, {"data": {"resolution": 32, "jitter": 0.3},
                                                 "loss": {"perceptual_weight": 0.0}})
    train_ds, val_ds, _ = load_sides(cfg.data_dir, cfg.split_path, cfg.data)
    torch.manual_seed(0)
    task = VAETask(cfg, train_ds, val_ds)
    assert task.grid_pixels.dtype == torch.uint8
    batch = collate_items([train_ds[i] for i in range(3)])
    loss, _ = task.loss(batch, torch.Generator().manual_seed(1))
    # by hand, from the old float32 items, with the noise the task draws
    x = torch.stack([_old_float_item(train_ds, i) for i in range(3)])
    v = task.vae
    f = v.downsample_factor
    noise = torch.randn((3, v.config.latent_channels, 32 // f, 32 // f), generator=torch.Generator().manual_seed(1))
    recon, mean, logvar, aux = v(x, noise)
    ref, _ = vae_loss(x, recon, mean, logvar, aux, cfg.loss, None)
    assert torch.equal(loss, ref)
    assert task.sample_grid(0, tmp_path / "grid.png") and (tmp_path / "grid.png").is_file()
