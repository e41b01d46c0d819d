"""MSDM (Medfusion-style latent diffusion with text cross-attention): VAE, then a UNet on its latents.

One home per part:
    config.py     typed configs, the named presets (model size + training budget) and where their values come from
    data.py       the data sets of both stages, batches, cached latents, image output
    vae_task.py   the autoencoder's task and its losses (Medfusion's per-sample sums)
    unet_task.py  the UNet's task (latent scale, self-conditioning, EMA, FID selection)
    sampling.py   the sampler, the text-encoding cache and the `harness generate` Generator
    train.py      train / resume / --print-config / quickstart entry points
    cli.py        `harness train msdm-vae|msdm-unet`, `harness models info msdm`
See REFERENCE.md section 3 for the published recipe.
"""
