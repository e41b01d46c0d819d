"""LoRA counts on the real architectures (meta device), the dry-run plan, and LoRA option checking."""

from __future__ import annotations

import pytest

PAPER_RANKS = (4, 8, 16, 24, 32, 40, 48, 56, 64, 128)
# The seed paper's Tables 1 and 2 (its rank-48 prior entry has a typo; 15,728,640 is right).
PAPER_PRIOR = {4: 1_310_720, 8: 2_621_440, 16: 5_242_880, 24: 7_864_320, 32: 10_485_760, 40: 13_107_200,
               48: 15_728_640, 56: 18_350_080, 64: 20_971_520, 128: 41_943_040}
PAPER_DECODER = {4: 823_296, 8: 1_646_592, 16: 3_293_184, 24: 4_939_776, 32: 6_586_368, 40: 8_232_960,
                 48: 9_879_552, 56: 11_526_144, 64: 13_172_736, 128: 26_345_472}


@pytest.mark.parametrize("component,table", [("prior", PAPER_PRIOR), ("decoder", PAPER_DECODER)])
def test_meta_device_counts_equal_the_paper(component, table):
    from models.kandinsky.counting import count_lora
    from models.kandinsky.lora import LoraSpec

    for r in PAPER_RANKS:
        c = count_lora(component, LoraSpec(rank=r))
        assert c.trainable == table[r], (component, r)
        assert c.alpha == r  # alpha defaults to the rank
    # the real sizes, recovered from the shipped configs with no weights
    assert count_lora("prior", LoraSpec(rank=4)).base == 1_026_225_920
    assert count_lora("decoder", LoraSpec(rank=4)).base == 1_253_057_288


def test_added_kv_targets_and_dora_change_the_count():
    from models.kandinsky.counting import count_lora
    from models.kandinsky.lora import LoraSpec

    assert count_lora("decoder", LoraSpec(rank=8, targets="paper+added-kv")).trainable == 291_072 * 8
    # DoRA adds one magnitude vector per adapted layer (the out_features of each target)
    dora = count_lora("decoder", LoraSpec(rank=4, dora=True)).trainable
    assert dora > PAPER_DECODER[4]
    # the prior has no added k/v projections: the preset adds nothing there
    assert count_lora("prior", LoraSpec(rank=4, targets="paper+added-kv")).trainable == PAPER_PRIOR[4]


def test_lora_spec_rejects_bad_values():
    from models.kandinsky.lora import LoraSpec

    for bad in ({"rank": 0}, {"targets": "everything"}, {"alpha": -1.0}, {"init_lora_weights": "zeros"}):
        with pytest.raises(ValueError):
            LoraSpec(**bad)
    spec = LoraSpec(rank=16, alpha=8)
    assert spec.lora_alpha == 8.0 and spec.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


def test_sweep_dry_run_prints_plan_without_data(run_cli):
    code, out, err = run_cli("sweep", "kandinsky-prior", "--ranks", "4,48,64,128", "--dry-run")
    assert code == 0, err
    for n in ("1,310,720", "15,728,640", "20,971,520", "41,943,040"):
        assert n in out
    assert "AdamW memory" in out and "paper" in out
    code, out, err = run_cli("sweep", "kandinsky-decoder", "--ranks", "4,64,128", "--dry-run")
    assert code == 0, err
    for n in ("823,296", "13,172,736", "26,345,472"):
        assert n in out
    # AdamW fp32 state for r=128 on the prior: 41,943,040 x 16 bytes = 640 MiB
    code, out, _ = run_cli("sweep", "kandinsky-prior", "--ranks", "128", "--dry-run")
    assert "640.0 MiB" in out


def test_sweep_options_are_checked(run_cli):
    code, _, err = run_cli("sweep", "kandinsky-prior", "--ranks", "4,x", "--dry-run")
    assert code == 2 and "--ranks" in err
    code, _, err = run_cli("sweep", "kandinsky-prior", "--ranks", "4")
    assert code == 2 and "--split is required" in err


def test_models_kandinsky_table(run_cli):
    code, out, err = run_cli("models", "info", "kandinsky", "--ranks", "4")
    assert code == 0, err
    assert "1,026,225,920" in out and "1,253,057,288" in out and "823,296" in out


def test_help_has_examples(run_cli):
    for cmd in (("train", "kandinsky-prior"), ("train", "kandinsky-decoder"), ("sweep", "kandinsky-prior"),
                ("sweep", "kandinsky-decoder"), ("models", "info", "kandinsky")):
        code, out, _ = run_cli(*cmd, "--help")
        assert code == 0 and "Example" in out, cmd


def test_save_adapter_roundtrip_is_atomic_and_exact(tmp_path):
    import json

    import torch

    from models.kandinsky.lora import (LoraSpec, add_lora, adapter_content_hash, load_adapter, lora_parameters,
                                       save_adapter)
    from models.kandinsky.testing import tiny_prior_pipeline

    torch.manual_seed(0)
    prior = tiny_prior_pipeline().prior
    add_lora(prior, LoraSpec(rank=2, dora=True))
    with torch.no_grad():
        for p in lora_parameters(prior):
            p.add_(torch.randn_like(p) * 0.1)  # a non-identity adapter
    out = save_adapter(prior, tmp_path / "adapter", {"rank": 2})
    assert sorted(x.name for x in tmp_path.iterdir()) == ["adapter"]  # no temp folder left behind
    assert json.loads((out / "adapter_meta.json").read_text()) == {"rank": 2}
    h = adapter_content_hash(out)
    save_adapter(prior, out, {"rank": 2})  # replacing an existing adapter
    assert adapter_content_hash(out) == h and sorted(x.name for x in tmp_path.iterdir()) == ["adapter"]

    fresh = tiny_prior_pipeline().prior
    load_adapter(fresh, out)  # DoRA/rank come from the safetensors metadata, not from us
    x = torch.randn(2, 32)
    args = dict(timestep=torch.tensor([3, 900]), proj_embedding=torch.randn(2, 32),
                encoder_hidden_states=torch.randn(2, 77, 32), attention_mask=torch.ones(2, 77, dtype=torch.bool))
    with torch.no_grad():
        assert torch.allclose(prior(x, **args).predicted_image_embedding,
                              fresh(x, **args).predicted_image_embedding, atol=1e-6)
