"""Kandinsky 2.2 LoRA (prior and decoder), the seed paper's model: `harness train|sweep kandinsky-prior|-decoder`,
`harness generate` on their runs, `harness models info|make-tiny kandinsky`.

One home per part:
    train.py   typed configs and presets, the TrainTask (prior / decoder objectives on cached encoder outputs),
               train / resume / continue, and the `harness generate` Generator
    cli.py     the click commands and options (train, sweep, models info, make-tiny)
Networks, loaders and LoRA counting live in models/kandinsky/; the frozen-encoder cache is the shared
harness/encoder_cache.py.
"""
