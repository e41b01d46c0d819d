"""`harness push` / `--push-to-hub`: the model card (licence, attribution, metrics with N and intervals, loading
snippet), the staged folder, the upload against a local stand-in of the hub's HTTP API (tests/fake_hub_server.py,
HF_ENDPOINT pointed at it), and the offline line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.io import read_json, write_json
from test_kandinsky_fixtures import mini_data, tiny_config, tiny_kandinsky  # noqa: F401 (fixtures)
from test_sd_fixtures import sd_config, sd_data, tiny_sd  # noqa: F401 (fixtures)

TOKEN = "hf_fake_token"


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A real tiny msdm-vae run (RUN/final/vae in diffusers' layout, a training sample grid)."""
    from harness.families.msdm.config import vae_config
    from harness.families.msdm.train import train
    from harness.sample import sample_dir
    from harness.split import make_split

    root = tmp_path_factory.mktemp("push")
    split = make_split(sample_dir(), val_images=4, seed=0)
    split["train"] = split["train"][:8]
    write_json(root / "split.json", split)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_RUNS_DIR", str(root / "runs"))
        run = train(vae_config("tiny", sample_dir(), root / "split.json", {
            "data": {"jitter": 0.0, "resolution": 32}, "loss": {"perceptual_weight": 0.0},
            "loop": {"batch_size": 4, "checkpoint_every": 0, "val_every": 0, "sample_every": 1, "max_steps": 1,
                     "num_workers": 0}}), run_id="vae")
    return run


def _lora_run(tmp_path) -> "Run":  # noqa: F821
    """A kandinsky-prior run as the family leaves it (final/ adapter + meta, config, data hashes) and a scored
    metrics.json: the card's LoRA case without training a Kandinsky prior."""
    from safetensors.torch import save_file
    import torch

    from harness.runs import create_run

    cfg = {"prior": "kandinsky-community/kandinsky-2-2-prior", "prior_revision": "main",
           "decoder": "kandinsky-community/kandinsky-2-2-decoder", "component": "prior",
           "lora": {"rank": 32, "alpha": 32.0, "dora": False},
           "loop": {"max_steps": 500, "batch_size": 64, "grad_accum": 1, "lr": 1e-4, "seed": 0,
                    "mixed_precision": "bf16", "report_to": "none"},
           "summary": {"rank": 32, "alpha": 32.0, "steps": 500}}
    run = create_run("kandinsky-prior", cfg, {"csv_sha256": "c" * 64, "split_sha256": "s" * 64, "n_images": 1800},
                     run_id="k-prior-r32")
    final = run.dir / "final"
    final.mkdir()
    save_file({"prior.lora_A.weight": torch.zeros(32, 8)}, str(final / "pytorch_lora_weights.safetensors"))
    write_json(final / "adapter_meta.json", {"format": "harness-kandinsky-lora/1", "component": "prior",
                                             "base_model": "kandinsky-community/kandinsky-2-2-prior",
                                             "base_revision": "main", "base_commit": "a" * 40,
                                             "selected": {"metric": "fid", "value": 41.2, "step": 300, "epoch": 60.0,
                                                          "last_step": 500, "last_epoch": 100.0}})
    write_json(run.dir / "train_stats.json", {"steps": 500, "final_loss": 0.0123, "val_loss": 0.0145})
    write_json(run.metrics_path, {
        "format": "harness-metrics/2", "scored": "2026-12-02T07:00:00",
        "real": {"label": "val", "n": 200, "sha256": "r", "preprocess": {"mode": "match", "label": "match",
                                                                          "id": "m"}},
        "generated": {"n": 2000, "sha256": "g", "sample": [{"filename": "00001.png", "prompt": "a polyp"},
                                                           {"filename": "00002.png", "prompt": "no polyps"}]},
        "metrics": {"fid": {"status": "ok", "extractor": "inception-v3-compat", "value": 41.2345,
                            "interval": {"low": 38.5, "high": 44.75}},
                    "prc": {"status": "ok", "extractor": "vgg16", "precision": 0.61, "recall": 0.42, "f1": 0.4975,
                            "intervals": {"f1": {"low": 0.45, "high": 0.55}}},
                    "kid": {"status": "not computed", "reason": "weights missing"}}})
    import numpy as np
    from PIL import Image

    run.images_dir.mkdir()
    for i in (1, 2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(run.images_dir / f"{i:05d}.png")
    return run


def test_stage_has_the_adapter_metrics_and_a_grid_of_the_scored_images(tmp_path):
    from PIL import Image

    from harness.push import stage

    run = _lora_run(tmp_path)
    files = dict(stage(run, "me/kvasir-prior-r32", tmp_path / "st"))
    assert set(files) == {"README.md", "adapter_meta.json", "harness_run.json", "images/samples.png",
                          "metrics.json", "pytorch_lora_weights.safetensors"}
    assert files["pytorch_lora_weights.safetensors"] == (run.dir / "final" / "pytorch_lora_weights.safetensors"
                                                         ).stat().st_size
    with Image.open(tmp_path / "st" / "images" / "samples.png") as im:
        assert im.width > 64  # a grid figure, not one 32 px image
    assert "![samples](images/samples.png)" in (tmp_path / "st" / "README.md").read_text()
    assert read_json(tmp_path / "st" / "metrics.json") == read_json(run.metrics_path)


def test_card_has_licence_metrics_and_loading_snippet(tmp_path):
    from harness.push import render_card

    run = _lora_run(tmp_path)
    card = render_card(run, "me/kvasir-prior-r32", has_grid=True)
    head = card.split("---")[1]
    assert "license: cc-by-nc-4.0" in head and "base_model: kandinsky-community/kandinsky-2-2-prior" in head
    assert "base_model_relation: adapter" in head and "- lora" in head and "library_name: diffusers" in head
    assert "CC BY-NC 4.0" in card and "SimulaMet" in card and "HyperKvasir" in card
    assert "| FID | 41.234 | [38.500, 44.750] | 2000 | 200 | val (match) |" in card
    assert "| F1 | 0.497 | [0.450, 0.550] | 2000 | 200 | val (match) |" in card  # value with its interval
    assert "KID" not in card.split("## Metrics")[1].split("##")[0]  # not computed: not listed
    assert 'prior.prior.load_lora_adapter("me/kvasir-prior-r32", prefix=None, ' \
           'weight_name="pytorch_lora_weights.safetensors")' in card
    assert "LoRA (rank 32) adapter for `kandinsky-community/kandinsky-2-2-prior`" in card
    assert "`main` / `" + "a" * 40 + "`" in card and "c" * 64 in card and "s" * 64 in card
    assert "the best by fid (41.2000) at epoch 60.0, step 300; training ran to epoch 100.0" in card
    assert "![samples](images/samples.png)" in card and '"report_to": "none"' in card
    # the card parses back with huggingface_hub
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.license == "cc-by-nc-4.0"


def test_dry_run_stages_card_and_files_and_offline_is_one_line(vae_run, run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli("push", vae_run.dir, "--repo", "me/msdm-vae", "--dry-run", "--out", tmp_path / "st")
    assert code == 0, err
    st = tmp_path / "st"
    files = sorted(str(p.relative_to(st)) for p in st.rglob("*") if p.is_file())
    assert files == ["README.md", "harness_run.json", "images/samples.png", "msdm_vae.json", "provenance.json",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert (st / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (vae_run.dir / "final" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    card = (st / "README.md").read_text()
    assert "CC BY-NC 4.0" in card and 'MSDMAutoencoder.from_pretrained("me/msdm-vae", subfolder="vae")' in card
    assert "Not scored yet" in card
    assert read_json(st / "harness_run.json")["config"]["family"] == "msdm-vae"
    # offline: nothing uploaded, one line with the repo, every file and its size, exit 2
    code, out, err = run_cli("push", vae_run.dir, "--repo", "me/msdm-vae")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "offline" in err and "nothing uploaded" in err and "me/msdm-vae" in err
    assert "vae/diffusion_pytorch_model.safetensors (" in err and "README.md (" in err
    assert not list(vae_run.dir.glob(".hub-push-*"))  # the staging folder is gone
    code, out, err = run_cli("push", vae_run.dir, "--repo", "not a repo", "--dry-run")
    assert code == 2 and "USER/NAME" in err


def _online(monkeypatch, hub):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(hc, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)  # the stand-in is on localhost
    # huggingface_hub fetches an "agent harnesses" registry for its user agent: keep it from the stand-in and the
    # machine's HF cache
    import huggingface_hub.utils._detect_agent as agent

    monkeypatch.setattr(agent, "_registry", {"standardEnvVars": [], "harnesses": {}}, raising=False)


def test_push_uploads_through_the_hub_api(vae_run, run_cli, monkeypatch, tmp_path):
    """Against a local stand-in of the hub HTTP API: the repo is created private, one commit uploads the staged
    folder byte for byte, the token is sent as the Authorization header and appears nowhere else."""
    from fake_hub_server import FakeHub

    with FakeHub() as hub:
        _online(monkeypatch, hub)
        code, out, err = run_cli("push", vae_run.dir, "--repo", "me/msdm-vae", "--private")
        assert code == 0, err + str(hub.unknown)
        assert f"pushed 7 files to me/msdm-vae: {hub.url}/me/msdm-vae/commit/abc123" in out
    assert hub.private == {"me/msdm-vae": True} and not hub.unknown
    assert hub.validated[0]["license"] == "cc-by-nc-4.0" and "msdm-vae" in hub.validated[0]["tags"]
    up = hub.repos["me/msdm-vae"]
    assert sorted(up) == ["README.md", "harness_run.json", "images/samples.png", "msdm_vae.json", "provenance.json",
                          "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert up["vae/diffusion_pytorch_model.safetensors"] == \
        (vae_run.dir / "final" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert b"cc-by-nc-4.0" in up["README.md"]
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    assert TOKEN not in out + err
    assert not any(TOKEN.encode() in p.read_bytes() for p in vae_run.dir.rglob("*") if p.is_file())
    assert "pushed final/ to the hub model repo me/msdm-vae" in (vae_run.dir / "log.txt").read_text()


def test_push_with_a_bad_token_is_one_line(vae_run, run_cli, monkeypatch):
    from fake_hub_server import FakeHub

    with FakeHub() as hub:
        _online(monkeypatch, hub)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        code, out, err = run_cli("push", vae_run.dir, "--repo", "me/other")
    assert code == 2 and "upload to me/other failed" in err and "hf auth login" in err
    assert "hf_wrong" not in err and len(err.strip().splitlines()) == 1


def test_unreachable_hub_is_the_offline_line(vae_run, run_cli, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    code, out, err = run_cli("push", vae_run.dir, "--repo", "me/msdm-vae")
    assert code == 2 and "unreachable: nothing uploaded" in err and "vae/config.json (" in err


def test_push_to_hub_after_training(tmp_path, run_cli, monkeypatch):
    """`harness train ... --push-to-hub REPO` pushes the run it trained when training ends; offline, it refuses
    before training; sweeps do not take it."""
    from fake_hub_server import FakeHub
    from harness.sample import sample_dir
    from harness.split import make_split

    split = make_split(sample_dir(), val_images=4, seed=0)
    split["train"] = split["train"][:4]
    write_json(tmp_path / "split.json", split)
    args = ["train", "msdm-vae", "--split", tmp_path / "split.json", "--data", sample_dir(), "--preset", "tiny",
            "--max-steps", "1", "--batch-size", "4", "--resolution", "32", "--perceptual-weight", "0",
            "--num-workers", "0", "--checkpoint-every", "0"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(*args, "--run-id", "off", "--push-to-hub", "me/tiny-vae")
    assert code == 2 and "offline or unreachable" in err and "harness push RUN --repo me/tiny-vae" in err
    runs = Path(os.environ["HARNESS_RUNS_DIR"])
    assert not (runs / "off").exists()
    code, out, err = run_cli(*args, "--run-id", "priv", "--hub-private")
    assert code == 2 and "--hub-private applies to --push-to-hub" in err
    with FakeHub() as hub:
        _online(monkeypatch, hub)
        code, out, err = run_cli(*args, "--run-id", "on", "--push-to-hub", "me/tiny-vae")
        assert code == 0, err
    assert "pushed 7 files to me/tiny-vae" in out and "vae/config.json" in hub.repos["me/tiny-vae"]
    code, out, err = run_cli("sweep", "msdm-unet", "--push-to-hub", "me/x")
    assert code == 2 and "No such option" in err


def test_sd_lora_push_folder_loads_in_plain_diffusers(tiny_sd, sd_data, tmp_path, run_cli, monkeypatch):
    """The staged folder of an SD LoRA run is what `pipe.load_lora_weights(REPO)` reads: plain diffusers loads it
    (the hub repo holds exactly these files). A local base is named in the card, not put in `base_model`."""
    from diffusers import StableDiffusionPipeline

    from harness.families.sd.task import train

    run = train(sd_config(tiny_sd, sd_data, tmp_path, steps=1), run_id="sd-lora")
    code, out, err = run_cli("push", run.dir, "--repo", "me/sd-lora", "--dry-run")
    assert code == 0, err
    st = run.dir / "hub-push"
    assert (st / "pytorch_lora_weights.safetensors").is_file()
    card = (st / "README.md").read_text()
    assert 'pipe.load_lora_weights("me/sd-lora")' in card and f'from_pretrained("{tiny_sd}")' in card
    assert "base_model:" not in card.split("---")[1] and "LoRA (rank 4) adapter for" in card
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(str(st), adapter_name="pushed")
    assert pipe.get_list_adapters() == {"unet": ["pushed"]}
    lora_b = [v for k, v in pipe.unet.state_dict().items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b)  # the trained step, not a fresh init


def test_kandinsky_decoder_push_folder_loads_in_plain_diffusers(tiny_kandinsky, mini_data, tmp_path, run_cli):
    """A tiny Kandinsky 2.2 decoder LoRA run: the staged folder is what the card's `load_lora_adapter` reads."""
    from diffusers import KandinskyV22Pipeline

    from harness.families.kandinsky22.train import train

    run = train(tiny_config("decoder", tiny_kandinsky, mini_data, tmp_path, loop={"max_steps": 1}), run_id="k-dec")
    code, out, err = run_cli("push", run.dir, "--repo", "me/k-dec", "--dry-run", "--out", tmp_path / "st")
    assert code == 0, err
    card = (tmp_path / "st" / "README.md").read_text()
    assert 'decoder.unet.load_lora_adapter("me/k-dec", prefix=None, ' \
           'weight_name="pytorch_lora_weights.safetensors")' in card
    assert f'KandinskyV22PriorPipeline.from_pretrained("{tiny_kandinsky[0]}"' in card
    decoder = KandinskyV22Pipeline.from_pretrained(tiny_kandinsky[1])
    decoder.unet.load_lora_adapter(str(tmp_path / "st"), prefix=None, weight_name="pytorch_lora_weights.safetensors",
                                   adapter_name="pushed")
    assert "pushed" in decoder.unet.peft_config
