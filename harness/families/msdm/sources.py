"""Where the `paper` preset's values come from (kept free of torch imports: the CLI builds its --help from it)."""

from __future__ import annotations

# Where each paper value comes from (shown in --help and in --print-config).
PAPER_SOURCES = {
    "vae": [
        ("model", "released VAE blocks, 64/128/256/512, 8 latent channels (13.4 M)", "paper + released code"),
        ("loss", "MSE + LPIPS + (1 - SSIM) + 1e-6 KL, per-sample sums", "paper; sums: released Medfusion VAE"),
        ("batch 8, Adam lr 1e-4 (no weight decay), no augmentation", "", "released VAE training script"),
        ("1001 epochs over the training images", "", "inferred: the released script's max_epochs=1001 "
                                                      "(min_epochs=100); when it stopped is not published"),
        ("no grad clipping", "", "released script (gradient_clip_val unset)"),
    ],
    "unet": [
        ("model", "UNet 256/512/1024, 2 blocks/level, 16 cross-attention blocks, emb_dim 1024", "paper + released"),
        ("AdamW lr 1e-4, batch 64, 256 px padded to square", "", "paper"),
        ("500 epochs, one epoch = one pass over the caption rows (--captions all)", "", "paper"),
        ("weight decay 1e-2", "", "inferred: Medfusion's BasicModel AdamW default; the paper names none"),
        ("jitter 0.4, context dropout 0.2, dropout 0.1, self-conditioning 0.5, L1", "", "paper"),
        ("150 sampling steps, guidance 4.5 (= released 3.5 in its (g+1) form)", "", "paper + released code"),
        ("EMA 0.9999", "", "inferred: lucidrains/Medfusion-style EMA; the paper names none"),
        ("no grad clipping", "", "released script (gradient_clip_val unset)"),
    ],
}


def preset_help(stage: str) -> str:
    """--preset help: what `paper` sets and where each value comes from."""
    rows = "; ".join(f"{a}{(' ' + b) if b else ''} [{c}]" for a, b, c in PAPER_SOURCES[stage])
    return (f"Model size and training budget. paper: {rows}. tiny: CPU-sized model and the quickstart budget "
            "(64 px). Options given on the command line or in --config override the preset.")
