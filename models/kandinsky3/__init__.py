"""Kandinsky 3.0 (diffusers `Kandinsky3Pipeline`): loading, the T5 text encoding the pipeline does, LoRA on the
U-Net through peft, meta-device parameter counting, and tiny offline pipelines for tests. No harness, no click."""
