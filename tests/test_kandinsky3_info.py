"""Kandinsky 3.0 counts on the real architecture (meta device, shipped config) and the --dry-run / info commands."""

from __future__ import annotations

import json


def test_real_unet_is_3b_and_lora_is_linear_in_rank():
    from models.kandinsky3.lora import count_parameters

    c4, c8 = count_parameters(4), count_parameters(8)
    assert c4["unet"] == 3_055_348_228  # diffusers Kandinsky3UNet defaults = the released 3 B U-Net
    assert c8["lora"] == 2 * c4["lora"] == 2 * 1_671_168


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
