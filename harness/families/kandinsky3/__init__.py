"""Kandinsky 3.0 LoRA (`harness train kandinsky3`, `harness generate` on its runs, `harness models info|make-tiny
kandinsky3`).

    train.py     typed config, the TrainTask (epsilon loss on MoVQ latents, T5 embeddings from the cache), train /
                 resume / continue
    generate.py  the `harness generate` Generator (Kandinsky3Pipeline fed cached prompt embeddings)
    cli.py       the click commands
Networks, loading, LoRA and counting live in models/kandinsky3/; the frozen-encoder cache is harness/encoder_cache.py.
"""
