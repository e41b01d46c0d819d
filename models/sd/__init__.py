"""Stable Diffusion 1.x/2.x family: shipped SD 1.5 architecture configs (meta-device counts), loading, the
fine-tuning methods (full, LoRA, DoRA, BitFit, DiffFit), kohya-style noise and Min-SNR weights, adapter export
(diffusers and kohya/A1111 layouts) and a tiny offline pipeline for tests. Pure torch/diffusers/peft code: nothing
here imports harness or click."""
