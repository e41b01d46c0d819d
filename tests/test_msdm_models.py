"""MSDM model modules: shapes, published parameter counts (meta device), save/load, text encoder loading."""

from __future__ import annotations

import pytest
import torch

from models.msdm import CLIPText, MSDMAutoencoder, MSDMUNet, get_preset, parameter_table
from models.msdm.blocks import CrossAttention


def _tiny_unet(**kw):
    return MSDMUNet(context_dim=32, **{**get_preset("tiny").unet, **kw})


def test_paper_parameter_counts_on_meta_device():
    rows = {name: n for name, n, _ in parameter_table("paper")}
    # Structure as released (emb_dim 1024, the released VAE blocks); counts reported, not tuned: the UNet lands
    # 0.8 % under the paper's 326.5 M (layers the paper does not describe), the VAE on its 13.4 M.
    assert rows["unet"] == 323_741_960 and rows["unet"] == pytest.approx(326.5e6, rel=0.01)
    assert rows["vae"] == 13_365_094 and round(rows["vae"] / 1e6, 1) == 13.4
    assert rows["text_encoder (frozen)"] == pytest.approx(123.1e6, rel=0.001)
    with torch.device("meta"):
        unet = MSDMUNet(**get_preset("paper").unet)
    assert sum(isinstance(m, CrossAttention) for m in unet.modules()) == 16  # 6 down + 1 mid + 9 up
    assert all(p.device.type == "meta" for p in unet.parameters())  # nothing allocated


def test_tiny_is_small():
    rows = {name: n for name, n, _ in parameter_table("tiny", text_config=None)}
    assert rows["vae"] < 500_000
    assert sum(p.numel() for p in _tiny_unet().parameters()) < 800_000


def test_vae_shapes_and_posterior():
    torch.manual_seed(0)
    vae = MSDMAutoencoder(**get_preset("tiny").vae)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 8, 8, 8)  # x8 downsampling, 8 latent channels
    recon, m2, _, aux = vae(x, noise=None)
    assert recon.shape == x.shape and torch.equal(m2, mean)
    assert [a.shape for a in aux] == [(2, 3, 32, 32)]  # the released deep-supervision head, at half resolution
    assert torch.count_nonzero(recon) == 0  # output conv zero-initialised, as released
    torch.nn.init.normal_(vae.dec_out.weight, std=0.1)
    recon = vae(x, noise=None)[0]
    noisy, _, _, _ = vae(x, noise=torch.randn(2, 8, 8, 8))
    assert not torch.allclose(noisy, recon)  # the noise is really used
    assert (vae.kl(mean, logvar) >= 0).all()


def test_paper_vae_latent_is_8x32x32_at_256px():
    vae = MSDMAutoencoder(**get_preset("paper").vae)
    with torch.no_grad():
        mean, _ = vae.encode(torch.zeros(1, 3, 256, 256))
    assert mean.shape == (1, 8, 32, 32)


def test_unet_shapes_self_condition_and_padding_mask():
    torch.manual_seed(0)
    unet = _tiny_unet().eval()
    # zero-initialised output layers would make every output 0: perturb them so the test sees the inputs' effect
    for p in unet.parameters():
        if p.abs().sum() == 0 and p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 8, 8, 8), torch.tensor([10, 900])
    ctx, mask = torch.randn(2, 6, 32), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = unet(x, t, ctx, mask)
        assert out.shape == x.shape
        assert torch.equal(out, unet(x, t, ctx, mask, torch.zeros_like(x)))  # None == zeros
        assert not torch.allclose(out, unet(x, t, ctx, mask, torch.randn_like(x)))  # the estimate is an input
        ctx2 = ctx.clone()
        ctx2[0, 3:] = torch.randn(3, 32)  # change only padding tokens of sample 0
        out2 = unet(x, t, ctx2, mask)
    assert torch.allclose(out2[0], out[0], atol=1e-6)  # padding never attended to / pooled
    assert unet.conv_in.in_channels == 16 and _tiny_unet(self_condition=False).conv_in.in_channels == 8


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    back = MSDMUNet.from_pretrained(tmp_path / "unet")
    assert list(back.config.block_out_channels) == list(unet.config.block_out_channels)
    for a, b in zip(unet.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def test_text_encoder_loads_both_layouts(tmp_path):
    from models.tiny_clip import save_tiny_clip_text

    root = save_tiny_clip_text(tmp_path / "clip")
    te = CLIPText.from_pretrained(root, max_length=16)  # pipeline layout: tokenizer/ + text_encoder/
    hidden, mask = te(["Generate an image with no polyps", ""])
    assert hidden.shape == (2, 16, te.dim) and mask.dtype == torch.bool
    assert mask[1].sum() == 2 and mask[0].sum() > mask[1].sum()  # "" is BOS+EOS only
    assert not any(p.requires_grad for p in te.parameters())
    te.train()
    assert not te.training  # frozen: stays in eval
    flat = tmp_path / "flat"
    te.tokenizer.save_pretrained(flat)
    te.model.save_pretrained(flat)
    h2, _ = CLIPText.from_pretrained(flat, max_length=16)(["Generate an image with no polyps", ""])
    assert torch.allclose(h2, hidden)


def test_models_info_cli(run_cli):
    code, out, err = run_cli("models", "info", "msdm", "--preset", "paper")
    assert code == 0, err
    assert "323,741,960" in out and "13,365,094" in out and "123,060,480" in out
    assert "326.5 M" in out and "-0.8 %" in out and "not tuned" in out  # against the paper, residual explained


def test_released_dropout_layout_and_attention_output_dropout():
    from models.msdm.blocks import ResBlock

    released = ResBlock(16, 16, 8, dropout=0.5, groups=4)
    assert [type(m).__name__ for m in (released.dropout1, released.dropout)] == ["Dropout2d", "Dropout2d"]
    ddpm = ResBlock(16, 16, 8, dropout=0.5, groups=4, dropout_layout="ddpm")
    assert isinstance(ddpm.dropout, torch.nn.Dropout) and isinstance(ddpm.dropout1, torch.nn.Identity)
    # channel-wise: a dropped channel is zero over the whole map
    torch.manual_seed(0)
    h = released.dropout1(torch.ones(1, 16, 4, 4))
    per_channel = h.flatten(2)
    assert all(bool((c == 0).all() or (c == 2).all()) for c in per_channel[0])
    unet = _tiny_unet(dropout=0.3)
    attn = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    assert attn and all(a.dropout.p == 0.3 for a in attn)  # attn_dropout None = the UNet dropout, as released
    assert all(a.dropout.p == 0.0 for a in _tiny_unet(dropout=0.3, attn_dropout=0.0).modules()
               if isinstance(a, CrossAttention))
    ca = CrossAttention(16, 8, head_dim=8, groups=4, dropout=0.5)
    torch.nn.init.normal_(ca.to_out.weight)
    x, ctx = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 8)
    ca.eval()
    y_eval = ca(x, ctx)
    ca.train()
    assert not torch.allclose(ca(x, ctx), y_eval)  # dropout acts on the attention output in training
