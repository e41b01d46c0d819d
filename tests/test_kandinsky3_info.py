"""Kandinsky 3.0 counts on the real architecture (meta device, shipped config) and the --dry-run / info commands."""

from __future__ import annotations

import json


def test_real_unet_is_3b_and_lora_is_linear_in_rank():
    from models.kandinsky3.lora import count_parameters

    c4, c8 = count_parameters(4), count_parameters(8)
    assert c4["unet"] == 3_055_348_228  # diffusers Kandinsky3UNet defaults = the released 3 B U-Net
    assert c8["lora"] == 2 * c4["lora"] == 2 * 1_671_168


def test_text_encoder_is_the_hub_flan_ul2_encoder():
    """configs/text_encoder_config.json = kandinsky-community/kandinsky-3 text_encoder/config.json (= google/flan-ul2):
    8,721,797,632 parameters, x 4 B = the hub's 34.9 GB fp32 pytorch_model.bin (configs/SOURCES.md)."""
    from models.kandinsky3.lora import count_text_encoder, real_text_encoder_config

    cfg = real_text_encoder_config()
    assert (cfg["d_model"], cfg["d_ff"], cfg["num_layers"], cfg["num_heads"], cfg["d_kv"], cfg["vocab_size"]) == (
        4096, 16384, 32, 16, 256, 32128)
    assert cfg["feed_forward_proj"] == "gated-silu"  # UL2's SwiGLU, not T5 v1.1's gated-GELU
    assert (cfg["relative_attention_num_buckets"], cfg["relative_attention_max_distance"]) == (32, 128)
    n = count_text_encoder()
    assert n == 8_721_797_632
    assert round(n * 4 / 1e9, 1) == 34.9
    from models.kandinsky3.lora import real_unet_config

    assert real_unet_config()["encoder_hid_dim"] == cfg["d_model"]


def test_dry_run_prints_counts_and_memory_without_data(run_cli, tmp_path):
    split = tmp_path / "split.json"
    split.write_text("{}")
    code, out, err = run_cli("train", "kandinsky3", "--data", str(tmp_path), "--split", str(split), "--rank", "16",
                             "--dry-run")
    assert code == 0, err
    est = json.loads(out)["estimate"]
    assert est["lora_parameters"] == 4 * 1_671_168
    assert est["encoder_resident_gib"] - est["cached_gib"] > 16  # the 8.7 B fp32 encoder is what the cache removes


def test_models_info_and_help(run_cli):
    code, out, err = run_cli("models", "info", "kandinsky3", "--ranks", "4")
    assert code == 0, err
    assert "1,671,168" in out + err and "3.055 B" in out + err
    code, out, _ = run_cli("train", "kandinsky3", "--help")
    assert "to_q,to_k,to_v,to_out.0" in out and "--dora" in out and "--rslora" in out


def test_sweep_dry_run_plans_each_rank(run_cli):
    code, out, err = run_cli("sweep", "kandinsky3", "--grid", "rank=4,16", "--dry-run")
    assert code == 0, err
    assert "1,671,168" in out + err and "6,684,672" in out + err
