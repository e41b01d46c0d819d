"""Tiny CLIP text towers and tokenizers built offline, for tests and the CPU quickstart.

The real CLIP weights and vocabulary cannot be downloaded here, so this builds a genuine `CLIPTokenizer`
(byte-level BPE, `</w>` end-of-word suffix, `<|startoftext|>`/`<|endoftext|>`) from merges learned on a small corpus,
and a randomly initialised `CLIPTextModel` of a few thousand parameters. Both are saved with `save_pretrained`, so
the code under test loads them through exactly the same `from_pretrained` path it uses for the real hub models.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

DEFAULT_CORPUS = (
    "Generate an image containing a polyp. Generate an image with no polyps. "
    "Generate an image from a colonoscopy procedure. Generate an image from a gastroscopy procedure. "
    "Generate an image with an an instrument located in the upper-left, lower-right and center. "
    "Generate an image with polyps of size 5-10mm and >20mm. Generate an image with no instruments. "
    "Generate an image with 2 findings. Generate an image containing text. Generate polyps of type paris is."
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2/CLIP reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(corpus: Iterable[str], num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-style byte-level BPE vocabulary and merge list from `corpus` (greedy, most frequent pair)."""
    import re

    byte_map = _bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    pattern = re.compile(r"[^\W\d_]+|\d|[^\s\w]+", re.UNICODE)
    for text in corpus:
        for w in pattern.findall(text.lower()):
            chars = [byte_map[b] for b in w.encode("utf-8")]
            chars[-1] = chars[-1] + "</w>"
            words[tuple(chars)] += 1

    base = list(byte_map.values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for sym, count in words.items():
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        vocab_list.append(a + b)
        merged: Counter[tuple[str, ...]] = Counter()
        for sym, count in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and sym[i] == a and sym[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return vocab, merges


def build_clip_tokenizer(corpus: Iterable[str] | None = None, num_merges: int = 400, model_max_length: int = 77):
    """A real `CLIPTokenizer` over a vocabulary learned offline from `corpus`."""
    from transformers import CLIPTokenizer

    vocab, merges = learn_bpe(corpus if corpus is not None else [DEFAULT_CORPUS], num_merges)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_clip_text_config(vocab_size: int, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                          projection_dim: int = 32, max_positions: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=projection_dim,
        max_position_embeddings=max_positions,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def save_tiny_clip_text(out_dir: str | Path, corpus: Iterable[str] | None = None, hidden_size: int = 32,
                        seed: int = 0, with_projection: bool = False) -> Path:
    """Write `tokenizer/` and `text_encoder/` under `out_dir` (the layout of a diffusers pipeline folder)."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    tok = build_clip_tokenizer(corpus)
    tok.save_pretrained(out_dir / "tokenizer")
    cfg = tiny_clip_text_config(len(tok), hidden_size=hidden_size)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)
    model.save_pretrained(out_dir / "text_encoder")
    return out_dir
