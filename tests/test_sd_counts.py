"""SD 1.5 parameter counts on the meta device from the shipped configs (REFERENCE.md §6), per method."""

from __future__ import annotations

import pytest

UNET, UNET_BIASES, TEXT_ENCODER, VAE = 859_520_964, 343_684, 123_060_480, 83_653_863
LORA_R4 = 797_184


@pytest.fixture(scope="module")
def sizes():
    from models.sd.architecture import sizes

    return sizes()


def test_network_sizes_equal_reference(sizes):
    assert sizes["unet"] == {"parameters": UNET, "biases": UNET_BIASES}
    assert sizes["text_encoder"]["parameters"] == TEXT_ENCODER
    assert sizes["vae"]["parameters"] == VAE


def test_method_counts_on_the_real_unet():
    from models.sd.architecture import build_on_meta, shipped_config, trainable_counts
    from models.sd.methods import _norm_weights, count

    lora = trainable_counts("lora", ["unet"], rank=4)["unet"]
    assert lora["trainable"] == LORA_R4 and lora["total"] == UNET + LORA_R4
    assert trainable_counts("lora", ["unet"], rank=16, alpha=32)["unet"]["trainable"] == LORA_R4 * 4
    # DoRA adds one magnitude per output feature of each adapted layer: 99,840 on SD 1.5
    assert trainable_counts("dora", ["unet"], rank=4)["unet"]["trainable"] == LORA_R4 + 99_840
    assert trainable_counts("bitfit", ["unet"])["unet"]["trainable"] == UNET_BIASES
    # DiffFit: biases + GroupNorm/LayerNorm weights + 3 channel scales in each of the 16 transformer blocks
    # (widths 320 x 2, 640 x 2, 1280 x 2 down, 1280 mid, 1280/640/320 x 3 up: 12,480 channels)
    norms = count(_norm_weights(build_on_meta("unet", shipped_config("unet"))))
    assert norms == 100_160
    difffit = trainable_counts("difffit", ["unet"])["unet"]
    assert difffit["trainable"] == UNET_BIASES + norms + 3 * 12_480 == 481_284
    assert difffit["total"] == UNET + 3 * 12_480
    assert trainable_counts("full", ["unet", "vae"]) == {"unet": {"total": UNET, "trainable": UNET},
                                                         "vae": {"total": VAE, "trainable": VAE}}
    te = trainable_counts("lora", ["text_encoder"], rank=4)["text_encoder"]["trainable"]
    assert te == 12 * 4 * 4 * (768 + 768)  # q,k,v,out of 12 layers, r x (in + out) each


def test_models_info_sd_prints_the_counts(run_cli):
    code, out, err = run_cli("models", "info", "sd")
    assert code == 0, err
    for n in ("859,520,964", "343,684", "123,060,480", "83,653,863", "797,184", "897,024", "481,284"):
        assert n in out, n


def test_models_info_sd_reads_a_pipeline_folder(run_cli, tmp_path):
    code, _, err = run_cli("models", "info", "sd", "--base", str(tmp_path))
    assert code == 2 and "model_index.json" in err


def test_models_info_sd_counts_a_pipeline_folder(run_cli, tmp_path):
    from models.sd.tiny import save_tiny_sd

    tiny = save_tiny_sd(tmp_path / "tiny")
    code, out, err = run_cli("models", "info", "sd", "--base", str(tiny), "--rank", "2")
    assert code == 0, err
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    assert f"{sum(p.numel() for p in unet.parameters()):,}" in out and str(tiny) in "".join(out.split())
