"""MSDM: Medfusion-style latent diffusion with CLIP text cross-attention (VAE, UNet, diffusion, text encoder)."""

from models.msdm.diffusion import DiffusionConfig, GaussianDiffusion, sample
from models.msdm.presets import PRESETS, get_preset, parameter_table
from models.msdm.text import DEFAULT_TEXT_ENCODER, CLIPText
from models.msdm.unet import MSDMUNet
from models.msdm.vae import MSDMAutoencoder

__all__ = ["CLIPText", "DEFAULT_TEXT_ENCODER", "DiffusionConfig", "GaussianDiffusion", "MSDMAutoencoder", "MSDMUNet",
           "PRESETS", "get_preset", "parameter_table", "sample"]
