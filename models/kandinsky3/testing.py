"""A tiny Kandinsky 3.0 pipeline built offline (tests, benchmark, CPU smoke runs).

U-Net, MoVQ and scheduler: the shapes of diffusers' own fast tests for Kandinsky3Pipeline
(tests/pipelines/kandinsky3/test_kandinsky3.py `get_dummy_components`): Kandinsky3UNet(time_embedding_dim=4,
groups=2, attention_head_dim=4, layers_per_block=3, block_out_channels=(32, 64), cross_attention_dim=4,
encoder_hid_dim=32), a 2-level spatial-norm VQModel, DDPMScheduler(squaredcos_cap_v2, clip_sample). Their text
encoder is the hub's hf-internal-testing/tiny-random-t5 (d_model 32); offline we build a T5EncoderModel of that size
and a real T5 tokenizer (tokenizers Unigram model, sentencepiece-style "▁" pieces, </s> appended) over a vocabulary
learned from a corpus - no sentencepiece package and no download needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

DEFAULT_CORPUS = ("Generate an image containing a polyp", "an endoscopy image with an instrument",
                  "a colonoscopy image of the cecum", "an image with text", "one polyp", "two instruments")


def build_t5_tokenizer(corpus: Iterable[str] | None = None, model_max_length: int = 128):
    """A `T5TokenizerFast` (pad 0, </s> 1, <unk> 2, as T5) whose Unigram vocabulary is every word of `corpus` plus
    single characters, so any text tokenizes."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    words: dict[str, None] = {}
    chars: dict[str, None] = {}
    for text in list(corpus or DEFAULT_CORPUS):
        for w in re.findall(r"\S+", text.lower()):
            words["▁" + w] = None
            chars.update(dict.fromkeys(w))
    chars.update(dict.fromkeys("abcdefghijklmnopqrstuvwxyz0123456789.,"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(w, -1.0) for w in words] + [(c, -5.0) for c in chars if c not in ("▁",)]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)


def tiny_pipeline(corpus: Iterable[str] | None = None, seed: int = 0, encoder_width: int = 32):
    """diffusers' fast-test Kandinsky 3.0 pipeline. `encoder_width` > 32 widens the 2-layer T5 encoder (d_model =
    width, d_ff = 4 x width) and the U-Net's `encoder_hid_dim` with it, for benchmarks that must see the encoder's
    weight in memory (P6)."""
    from diffusers import DDPMScheduler, Kandinsky3Pipeline, Kandinsky3UNet, VQModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer(corpus)
    torch.manual_seed(seed)
    unet = Kandinsky3UNet(in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=3,
                          block_out_channels=(32, 64), cross_attention_dim=4, encoder_hid_dim=encoder_width)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, thresholding=False)
    torch.manual_seed(seed)
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=encoder_width, d_kv=encoder_width // 4,
                                           d_ff=37 if encoder_width == 32 else 4 * encoder_width, num_layers=2,
                                           num_heads=4, is_encoder_decoder=False))
    return Kandinsky3Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                              movq=movq)


def save_tiny_pipeline(out_dir: str | Path, corpus: Iterable[str] | None = None, seed: int = 0,
                       encoder_width: int = 32) -> Path:
    out_dir = Path(out_dir)
    tiny_pipeline(corpus, seed, encoder_width).save_pretrained(out_dir)
    return out_dir
