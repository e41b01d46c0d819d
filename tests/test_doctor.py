"""`harness doctor`: the table on this CPU-only offline machine, `--for` exit codes, where weights are looked for,
and no network call offline."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from harness import doctor


@pytest.fixture(autouse=True)
def _empty_caches(tmp_path, monkeypatch):
    """No weights anywhere: an empty torch home (conftest) and an empty HF cache; offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails the test."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network call while offline: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return calls


def _torch_checkpoints(tmp_path):
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def _put_score_weights(tmp_path):
    from harness.features import WEIGHTS

    d = _torch_checkpoints(tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    for name in ("inception-v3-compat", "vgg16", "imageclef2024"):
        (d / WEIGHTS[name].filename).write_bytes(b"fake weights")


def _put_hub_pipeline(tmp_path, repo_id: str, with_unet_weights: bool = True):
    """A diffusers pipeline in the HF cache layout (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for sub, files in (("unet", ["config.json"] + (["diffusion_pytorch_model.safetensors"] if with_unet_weights
                                                  else [])),
                       ("vae", ["config.json", "diffusion_pytorch_model.safetensors"]),
                       ("text_encoder", ["config.json", "model.safetensors"]),
                       ("tokenizer", ["tokenizer_config.json", "vocab.json"]),
                       ("scheduler", ["scheduler_config.json"])):
        (snap / sub).mkdir()
        for f in files:
            (snap / sub / f).write_text("{}")
    return snap


def test_table_renders_offline_on_cpu_and_names_what_is_missing(run_cli, no_network):
    code, out, err = run_cli("doctor")
    assert code == 0, err
    text = " ".join(out.split())
    for expected in ("python", "torch", "diffusers", "Inception", "VGG16", "organisers' InceptionV3",
                     "Kandinsky 2.2 prior", "Stable Diffusion", "Kandinsky 3.0", "CLIP text encoder",
                     "offline (HF_HUB_OFFLINE)", "free of"):
        assert expected in text, expected
    assert "missing" in out and "CPU only" in text
    assert not no_network


def test_package_floors_come_from_the_installed_metadata():
    from importlib.metadata import requires

    rows = {c.name: c for c in doctor.package_checks()}
    core = [r.split(";")[0] for r in requires("medvqa-harness") if "extra ==" not in r and "python_version" not in r]
    for line in core:
        name = line.split(">")[0].split("<")[0].split("=")[0].strip()
        assert name in rows, name
        assert rows[name].status == "ok", rows[name]
    assert "needs >=0.35" in rows["diffusers"].detail


def test_for_score_exits_1_naming_inception_then_0_once_the_files_are_where_score_looks(tmp_path, run_cli,
                                                                                      no_network):
    code, out, _ = run_cli("doctor", "--for", "score")
    assert code == 1
    miss = out[out.index("score will miss"):]
    assert "Inception" in miss and "VGG16" in miss and str(_torch_checkpoints(tmp_path)) in " ".join(out.split())
    assert "Stable Diffusion" not in out  # --for lists only what the command needs

    _put_score_weights(tmp_path)
    code, out, _ = run_cli("doctor", "--for", "score")
    assert code == 0 and "everything it needs is here" in out


def test_a_single_transformers_model_is_found_by_its_config_and_weights(tmp_path, run_cli, no_network):
    from models.msdm.text import DEFAULT_TEXT_ENCODER

    snap = _put_hub_pipeline(tmp_path, DEFAULT_TEXT_ENCODER)
    (snap / "model_index.json").unlink()
    (snap / "config.json").write_text("{}")
    (item,) = doctor.weights_checks(("clip-text",))
    assert item.status == "missing" and "no weights in" in item.detail  # config.json alone is not a model
    (snap / "model.safetensors").write_text("{}")
    code, out, _ = run_cli("doctor", "--for", "train-msdm-unet")
    assert code == 0, out


def test_hub_models_are_found_in_the_hf_cache_and_incomplete_snapshots_are_missing(tmp_path, run_cli, no_network):
    from models.sd.loading import DEFAULT_BASE

    code, out, _ = run_cli("doctor", "--for", "train-sd")
    miss = out[out.index("train-sd will miss"):]
    assert code == 1 and f"models--{DEFAULT_BASE.replace('/', '--')}" in miss

    snap = _put_hub_pipeline(tmp_path, DEFAULT_BASE, with_unet_weights=False)
    (item,) = doctor.weights_checks(("sd",))
    assert item.status == "missing" and "no weights in unet" in item.detail

    (snap / "unet" / "diffusion_pytorch_model.safetensors").write_text("{}")
    (item,) = doctor.weights_checks(("sd",))
    assert item.status == "ok" and item.where == str(snap)
    code, out, _ = run_cli("doctor", "--for", "train-sd")
    assert code == 0, out


def test_hub_probe_is_not_made_offline_and_never_hangs_online(monkeypatch, no_network):
    assert doctor.probe_hub() == (None, "offline (HF_HUB_OFFLINE)")
    assert not no_network


def test_hub_probe_reports_a_local_endpoint_and_a_closed_port(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        ok, detail = doctor.probe_hub(timeout=5)
        assert ok is True and "answered 200" in detail
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    ok, detail = doctor.probe_hub(timeout=2)
    assert ok is False and "not reachable" in detail


def test_unknown_target_is_a_usage_error(run_cli):
    code, _, err = run_cli("doctor", "--for", "train-everything")
    assert code == 2 and "train-sd" in err


def test_cuda_devices_show_name_and_free_and_total_memory(monkeypatch):
    """The GPU branch on this CPU machine: torch.cuda's answers stood in for one 80 GiB device."""
    import types

    import torch

    gib = 1024 ** 3
    props = types.SimpleNamespace(name="Stand-in H100", total_memory=80 * gib, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (60 * gib, 80 * gib))
    rows = {c.name: c for c in doctor.device_checks()}
    assert rows["cuda:0"].status == "ok"
    assert rows["cuda:0"].detail == "Stand-in H100, 60.0 GiB free of 80.0 GiB, compute capability 9.0"


def test_verify_hashes_the_torch_hub_files_against_their_published_sha256(tmp_path, run_cli, no_network):
    _put_score_weights(tmp_path)  # present, but not the published bytes
    code, out, _ = run_cli("doctor", "--for", "score")
    assert code == 0
    code, out, _ = run_cli("doctor", "--for", "score", "--verify")
    assert code == 1 and "is not the published file's" in " ".join(out.split())
