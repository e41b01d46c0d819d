"""The MSDM UNet's training task: epsilon prediction on scaled VAE latents, text cross-attention, context dropout
(done by the dataset), self-conditioning, EMA, latent scale measured on sampled latents.

  * Context dropout happens in ONE place: the dataset (`DatasetConfig.caption_dropout`, default 0.2 for the UNet),
    which replaces the caption by "" per sample; "" is also the unconditional prompt at sampling.
  * Self-conditioning: with probability `self_cond_prob` per batch a first pass with a zero self-condition and no
    gradient predicts x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); that detached estimate (not x_t, the released
    code's bug) is concatenated to the input of the trained pass; otherwise zeros are.
  * Latents are scaled by 1 / std of SAMPLED training latents z = mean + sigma * eps (what the UNet trains on; LDM
    measures it the same way), over up to 256 training images, once when the run starts; the value is stored in
    the run config (`latent_scale`) and in final/msdm.json.
  * `cache_latents`: the posteriors (mean, logvar) of the training images are computed once and z is drawn from
    them every step. Only valid without image augmentation - that combination is refused by the config.
  * EMA of the UNet (decay with warm-up min(decay, (1 + n) / (10 + n))) is saved in checkpoints (the CPU copy is
    made on rank 0 only), used for sample grids and exported as the final UNet.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from harness.config import to_dict
from harness.dataset import to_model_pixels
from harness.errors import UserError
from harness.io import write_json
from harness.families.msdm.config import UNetConfig
from harness.families.msdm.data import MSDMDataTask, save_grid
from harness.families.msdm.sampling import MSDMSampler, TextCache
from harness.trainer import unwrap
from models.msdm.diffusion import GaussianDiffusion
from models.msdm.presets import get_preset
from models.msdm.text import CLIPText

# Fixed prompts of the sample grids: negation, locations, procedures, counts.
SAMPLE_PROMPTS = (
    "Generate an image containing a polyp",
    "Generate an image with no polyps",
    "Generate an image with an instrument located in the lower-right",
    "Generate an image with an instrument located in the upper-left",
    "Generate an image from a gastroscopy procedure",
    "Generate an image from a colonoscopy procedure with no instruments",
)


def measure_latent_scale(means: torch.Tensor, logvars: torch.Tensor, seed: int) -> float:
    """1 / std of latents SAMPLED from the posteriors (mean + sigma * eps, fixed noise seed)."""
    g = torch.Generator().manual_seed(seed)
    z = means + torch.exp(0.5 * logvars) * torch.randn(means.shape, generator=g)
    return float(1.0 / z.float().std().clamp_min(1e-6))


class UNetTask(MSDMDataTask):
    def __init__(self, cfg: UNetConfig, train_ds, val_ds, vae, text: CLIPText, latent_scale: float):
        from models.msdm.unet import MSDMUNet

        self.cfg = cfg
        unet_kw = dict(get_preset(cfg.preset).unet)
        if cfg.dropout is not None:
            unet_kw["dropout"] = cfg.dropout
        self.unet = MSDMUNet(context_dim=text.dim, self_condition=cfg.self_cond_prob > 0,
                             dropout_layout=cfg.dropout_layout, attn_dropout=cfg.attn_dropout, **unet_kw)
        self.vae = vae.requires_grad_(False).eval()
        self.text = text
        self.texts = TextCache(text)
        self.diffusion = GaussianDiffusion(cfg.diffusion)
        self.latent_scale = latent_scale
        self._train, self._val = train_ds, val_ds
        self.ema = [p.detach().clone() for p in self.unet.parameters()] if cfg.ema_decay > 0 else None
        self._fid = None  # (extractor, real statistics), built on first use

    # -- TrainTask API --
    def trainable_parameters(self):
        return list(self.unet.parameters())

    def modules(self):
        return {"unet": self.unet, "vae": self.vae, "text": self.text}

    def use_modules(self, modules):
        super().use_modules(modules)
        self.texts.use(self.text)  # keeps the encodings unless the encoder moved
        if self.ema is not None:
            dev = next(unwrap(self.unet).parameters()).device
            self.ema = [e.to(dev) for e in self.ema]

    def latents(self, batch, generator) -> torch.Tensor:
        """Scaled latents z0 of the batch: a posterior draw, from the cache or by encoding the pixels."""
        if "mean" in batch:
            mean, logvar = batch["mean"], batch["logvar"]
        else:
            with torch.no_grad():
                mean, logvar = self.vae.encode(to_model_pixels(batch["pixels"]))
        noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        return (mean + torch.exp(0.5 * logvar) * noise) * self.latent_scale

    def loss(self, batch, generator):
        z0 = self.latents(batch, generator).float()
        B = z0.shape[0]
        t = torch.randint(0, self.diffusion.T, (B,), generator=generator).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        coin = float(torch.rand((), generator=generator))  # always drawn, so later draws never shift
        ctx, mask = self.texts(batch["caption"])
        x_t = self.diffusion.q_sample(z0, t, noise)
        self_cond = None
        if self.cfg.self_cond_prob > 0 and coin < self.cfg.self_cond_prob:
            with torch.no_grad():
                eps0 = self.unet(x_t, t, ctx, mask, None)  # None = zeros
                self_cond = self.diffusion.predict_x0(x_t, t, eps0.float()).detach()
        eps = self.unet(x_t, t, ctx, mask, self_cond).float()
        err = (eps - noise).abs() if self.cfg.loss == "l1" else (eps - noise).pow(2)
        per_sample = err.flatten(1).mean(1)
        if self.cfg.min_snr_gamma > 0:
            snr = self.diffusion.snr(t)
            per_sample = per_sample * torch.clamp(snr, max=self.cfg.min_snr_gamma) / snr  # eps-target Min-SNR
        return per_sample.mean()

    def on_step_end(self, step):
        if self.ema is None:
            return
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema, unwrap(self.unet).parameters()):
                e.lerp_(p.detach().to(e.dtype), 1 - decay)

    def state_dict(self):  # rank 0 only (see TrainTask.state_dict)
        return {"ema": [e.cpu() for e in self.ema] if self.ema is not None else None,
                "latent_scale": self.latent_scale}

    def load_state_dict(self, state):
        if state.get("ema") is not None and self.ema is not None:
            self.ema = [e.to(cur.device) for e, cur in zip(state["ema"], self.ema)]
        self.latent_scale = float(state.get("latent_scale", self.latent_scale))

    def sampling_unet(self):
        """A copy of the UNet holding the EMA weights (or the raw weights without EMA), in eval mode."""
        net = copy.deepcopy(unwrap(self.unet)).eval()
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(net.parameters(), self.ema):
                    p.copy_(e)
        return net

    def sampler(self) -> MSDMSampler:
        return MSDMSampler(self.sampling_unet(), unwrap(self.vae), self.texts, self.diffusion, self.latent_scale,
                           self.cfg.data.resolution)

    def sample_grid(self, step, path):
        s = self.cfg.sampling  # the run's sampler, fewer steps (deterministic DDIM is poor early in training)
        imgs = self.sampler().generate(list(SAMPLE_PROMPTS), list(range(len(SAMPLE_PROMPTS))),
                                       steps=self.cfg.sample_steps, guidance=s.guidance, sampler_name=s.sampler,
                                       eta=s.eta)
        save_grid(np.stack(imgs), path, cols=len(imgs))
        return True

    # -- model selection by FID (--select-best fid) --
    def prepare_fid(self, weights_path: str | None) -> str:
        """Resolve the Inception weights before training starts (a missing file is a one-line error, not a failure
        hours later); returns a note for the run config."""
        from harness.features import MissingWeights, resolve_weights

        if self._val is None:
            raise UserError("--select-best fid needs validation images (the split has none)")
        try:
            self._fid_weights = resolve_weights("inception-v3-compat", weights_path, allow_unverified=True)
        except MissingWeights as e:
            raise UserError(f"--select-best fid needs the Inception weights: {e}; or use --select-best val_loss") \
                from None
        w = self._fid_weights
        return f"inception {w.path} ({'verified' if w.verified else 'UNVERIFIED: selection only'})"

    def selection_metric(self, name):
        if name != "fid":
            return None
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        from harness.features import TorchFidelityExtractor, uint8_chw

        device = next(unwrap(self.unet).parameters()).device
        if self._fid is None:
            ext = TorchFidelityExtractor("inception-v3-compat", ["2048"], self._fid_weights, device)
            ids = self._val.image_ids
            feats = [ext.forward(uint8_chw(self._val.devset.image_path(i))[None])["2048"] for i in ids]
            self._fid = (ext, fid_features_to_statistics(torch.cat(feats)))
        ext, real = self._fid
        captions = [self._val.pools[i % len(self._val.pools)][0] for i in range(self.cfg.fid_images)]
        sampler, s, feats = self.sampler(), self.cfg.sampling, []
        for b in range(0, len(captions), 16):  # fixed prompts and seeds: successive values are comparable
            imgs = sampler.generate(captions[b : b + 16], list(range(b, min(b + 16, len(captions)))),
                                    steps=s.steps, guidance=s.guidance, sampler_name=s.sampler, eta=s.eta)
            batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
            feats.append(ext.forward(batch)["2048"])
        gen = fid_features_to_statistics(torch.cat(feats))
        return float(fid_statistics_to_metric(gen, real, verbose=False)["frechet_inception_distance"])

    def export(self, out_dir):
        self.sampling_unet().save_pretrained(out_dir / "unet")
        unwrap(self.vae).save_pretrained(out_dir / "vae")
        write_json(out_dir / "msdm.json", {
            "preset": self.cfg.preset, "resolution": self.cfg.data.resolution, "latent_scale": self.latent_scale,
            "text_encoder": self.cfg.text_encoder, "max_length": self.cfg.max_length,
            "diffusion": to_dict(self.cfg.diffusion), "sampling": to_dict(self.cfg.sampling),
            "ema": self.ema is not None, "vae_run": self.cfg.vae_run})
