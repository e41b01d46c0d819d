"""Frozen-encoder cache: hits, misses, invalidation on changed image bytes, refusal with augmentation, and the
cached data stream giving the same losses as recomputing the encoders."""

from __future__ import annotations

import pytest
import torch
from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_config, tiny_kandinsky  # noqa: F401 (fixtures)

from harness.errors import UserError


def _stats(cfg):
    from harness.families.kandinsky22.train import build_task

    task, hashes = build_task(cfg)
    return task, hashes["encoder_cache"]


def test_hit_miss_and_invalidation_on_image_bytes(tiny_kandinsky, mini_data, tmp_path):
    from PIL import Image

    cfg = tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path)
    _, first = _stats(cfg)
    assert first["images"] == {"hits": 0, "misses": 6} and first["text"] is None  # the decoder needs no text
    _, second = _stats(cfg)
    assert second["images"] == {"hits": 6, "misses": 0}

    # Change one image's bytes (same name, same size): exactly that image is recomputed.
    data_dir = mini_data[0]
    victim = sorted((data_dir / "images").iterdir())[3]
    im = Image.open(victim).convert("RGB")
    im.putpixel((0, 0), (255, 0, 255))
    im.save(victim, format="JPEG", quality=95)
    _, third = _stats(cfg)
    assert third["images"] == {"hits": 5, "misses": 1}

    # A truncated entry (a crash of something outside our atomic writes, a full disk) is detected by its header.
    task, _ = _stats(cfg)
    store, key = task.train_dataset().store, task.train_dataset().image_keys[victim.name][1]
    store.path(key).write_bytes(store.path(key).read_bytes()[:-7])
    _, fifth = _stats(cfg)
    assert fifth["images"] == {"hits": 5, "misses": 1}

    # Another preprocessing (resolution) is another key: all miss.
    cfg64 = tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path, data={"resolution": 64})
    _, fourth = _stats(cfg64)
    assert fourth["images"]["misses"] == 6


def test_prior_caches_every_caption_and_the_empty_one(tiny_kandinsky, mini_data, tmp_path):
    from harness.data import load_devset

    cfg = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path)
    task, first = _stats(cfg)
    n_unique = len({r.prompt for r in load_devset(mini_data[0]).rows})
    assert first["n_captions"] == n_unique + 1  # + "" for caption dropout
    assert first["text"] == {"hits": 0, "misses": n_unique + 1, "corrupt": 0}
    _, second = _stats(cfg)
    assert second["text"]["hits"] == n_unique + 1 and second["text"]["misses"] == 0

    # A damaged entry is a miss, recomputed, never a crash or a silently wrong tensor.
    store = task.train_dataset().store
    key = task.train_dataset().text_keys[""]
    store.path(key).write_bytes(b"garbage")
    assert store.get(key) is None and store.stats.corrupt == 1
    _, third = _stats(cfg)
    assert third["text"]["misses"] == 1
    assert store.get(key)["text_hidden"].shape == (77, 32)


def test_cache_refused_with_augmentation(tiny_kandinsky, mini_data, tmp_path):
    with pytest.raises(UserError, match="--no-cache"):
        tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, data={"jitter": 0.2}).validate()
    with pytest.raises(UserError, match="--no-cache"):
        tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path, data={"hflip": True}).validate()
    # without the cache, augmentation is fine (the encoders run on the augmented pixels every step)
    tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, cache=False, data={"jitter": 0.2}).validate()


@pytest.mark.parametrize("component", ["prior", "decoder"])
def test_cached_and_recomputed_streams_give_the_same_loss(component, tiny_kandinsky, mini_data, tmp_path):
    from harness.families.kandinsky22.train import build_task
    from harness.trainer import cpu_generator

    extra = {"image_embed_dropout": 0.5} if component == "decoder" else {}
    cached, _ = build_task(tiny_config(component, tiny_kandinsky, mini_data, tmp_path, **extra))
    plain, _ = build_task(tiny_config(component, tiny_kandinsky, mini_data, tmp_path, cache=False, **extra))
    for epoch in (0, 3):
        for ds in (cached.train_dataset(), plain.train_dataset()):
            ds.set_epoch(epoch)
        a = cached.collate([cached.train_dataset()[i] for i in range(4)])
        b = plain.collate([plain.train_dataset()[i] for i in range(4)])
        assert a["caption"] == b["caption"] and a["image_id"] == b["image_id"]  # same draws, same items
        with torch.no_grad():
            la = cached.loss(a, cpu_generator(epoch))
            lb = plain.loss(b, cpu_generator(epoch))
        assert torch.allclose(la, lb, rtol=1e-4, atol=1e-6), (float(la), float(lb))


def test_paraphrases_are_encoded_up_front_and_recorded(tiny_kandinsky, mini_data, tmp_path):
    pytest.importorskip("harness.paraphrase")
    import json

    from harness.data import load_devset

    originals = sorted({r.prompt for r in load_devset(mini_data[0]).rows})
    para = tmp_path / "para.jsonl"
    para.write_text("".join(json.dumps({"original": o, "paraphrases": [f"{o} (rephrased {k})" for k in range(2)]})
                            + "\n" for o in originals[:3]))
    for strategy, extra in (("add", 6), ("replace:0.5", 6)):
        cfg = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, paraphrases_path=str(para),
                          data={"paraphrase_strategy": strategy})
        task, hashes = _stats_full(cfg)
        # every original, the 6 paraphrases of the 3 covered captions, and "": nothing is encoded mid-training
        assert hashes["encoder_cache"]["n_captions"] == len(originals) + extra + 1
        assert len(hashes["paraphrases_sha256"]) == 64
        ds = task.train_dataset()
        for epoch in range(3):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                assert ds[i]["text_hidden"].shape == (77, 32)


def _stats_full(cfg):
    from harness.families.kandinsky22.train import build_task

    return build_task(cfg)
