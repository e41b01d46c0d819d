"""`harness push RUN --repo USER/NAME`: a run's final weights on the Hugging Face hub, with a model card.

The staged folder (written whole by `stage`, then uploaded as one commit):
    <every file of RUN/final/>  the adapter or model exactly as the family wrote it, so plain diffusers loads it
                                from the repo as from the folder (LoRA: pytorch_lora_weights.safetensors at the
                                root, `pipe.load_lora_weights(REPO)`; full fine-tunes: one diffusers folder per
                                trained component)
    README.md                   the model card (huggingface_hub's ModelCard: YAML metadata + text): base model and
                                revision, method and rank, training config and data hashes, the data licence and its
                                attribution, the metrics with N and 95 % intervals (RUN/metrics.json), a sample grid,
                                the snippet that loads it
    harness_run.json            the run's config.json, data.json and train_stats.json (provenance; not named
                                config.json, which diffusers would read as a model config)
    metrics.json                RUN/metrics.json, when the run was scored
    images/samples.png          a grid of the scored (else generated) images, else the last training sample grid

The token comes from huggingface_hub itself (HF_TOKEN or `hf auth login`); nothing here reads, prints or writes
it. Offline (HF_HUB_OFFLINE=1 / HARNESS_OFFLINE=1, or the hub endpoint does not answer a short connection probe)
the push is one line naming the repo and every file with its size, and exit code 2 (nothing was uploaded);
`--dry-run` writes the staged folder for inspection instead of uploading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness.errors import UserError
from harness.io import read_json, write_json, write_text
from harness.runs import Run

DATA_LICENSE = "cc-by-nc-4.0"  # harness/sample/SOURCE.md, shared/data/imageclef2024/SOURCE.md
CARD_TAGS = ("text-to-image", "diffusers", "medical-imaging", "endoscopy", "imageclef", "medvqa-harness")
RUN_FILE = "harness_run.json"
GRID_FILE = "images/samples.png"
PROBE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

ATTRIBUTION = """\
The training images and captions are the ImageCLEFmed MEDVQA-GI 2024 development set (subtask 1, image synthesis),
organised by SimulaMet. No licence is stated for the 2024 challenge data itself; its images and file names are those
of Kvasir-VQA (`SimulaMet-HOST/Kvasir-VQA`, CC BY-NC 4.0), whose underlying HyperKvasir images are CC BY 4.0. These
weights are derived from that data and are released under **CC BY-NC 4.0: non-commercial research use, with
attribution to SimulaMet** (Hicks, Storås, Halvorsen, Riegler, Thambawita). Please cite the ImageCLEFmed
MEDVQA-GI 2024 overview paper and HyperKvasir (Borgli et al., "HyperKvasir, a comprehensive multi-class image and
video dataset for gastrointestinal endoscopy", Scientific Data 7, 283, 2020). The base model's own licence applies
to it as well."""


@dataclass
class Described:
    """What the card says about a run, read from its records (config.json, final/*_meta.json)."""

    family: str
    method: str
    rank: int | None
    alpha: float | None
    base: str | None  # hub id or local folder the run trained from (None: trained from scratch)
    revision: str | None
    commit: str | None
    adapter: bool
    snippet: str


def check_repo(repo: str) -> str:
    from harness.challenges.hub import check_hub_repo

    try:
        return check_hub_repo(repo)
    except UserError:
        raise UserError(f"--repo {repo!r}: expected USER/NAME (letters, digits, '-', '_', '.')") from None


def _final(run: Run) -> Path:
    final = run.dir / "final"
    if not final.is_dir() or not any(final.iterdir()):
        raise UserError("the run has no final/ output (training not finished?); push a finished run", run.dir)
    return final


def _meta(final: Path) -> dict[str, Any]:
    for name in ("adapter_meta.json", "sd_meta.json"):
        if (final / name).is_file():
            return read_json(final / name)
    return {}


def describe(run: Run) -> Described:
    cfg = run.config(resolve=False)
    family = cfg.get("family", "?")
    final = _final(run)
    meta = _meta(final)
    summary = cfg.get("summary") or {}
    rank, alpha = summary.get("rank"), summary.get("alpha")
    adapter = (final / "pytorch_lora_weights.safetensors").is_file()
    if family == "sd":
        src = meta.get("base") or (cfg.get("sources") or {})
        base, revision = cfg.get("base"), cfg.get("revision")
        commit = src.get("commit") if isinstance(src, dict) else None
        method = _SD_METHODS.get(cfg.get("method", "lora"), str(cfg.get("method")))
        comps = meta.get("components") or cfg.get("components") or ["unet"]
        if adapter:
            snippet = (f'pipe = StableDiffusionPipeline.from_pretrained("{base}"{_rev(revision)}).to("cuda")\n'
                       'pipe.load_lora_weights("{repo}")\n')
        else:
            snippet = "".join(f'{c} = {_SD_CLASSES.get(c, "AutoModel")}.from_pretrained("{{repo}}", subfolder="{c}")\n'
                              for c in comps)
            snippet += (f'pipe = StableDiffusionPipeline.from_pretrained("{base}"{_rev(revision)}, '
                        + ", ".join(f"{c}={c}" for c in comps) + ').to("cuda")\n')
        imports = "from diffusers import StableDiffusionPipeline" + (
            "" if adapter else ", " + ", ".join(sorted({_SD_CLASSES.get(c, "AutoModel") for c in comps})))
        snippet = f'{imports}\n\n{snippet}image = pipe("Generate an image containing a polyp.").images[0]\n'
    elif family in ("kandinsky-prior", "kandinsky-decoder"):
        component = family.split("-")[1]
        base = meta.get("base_model") or cfg.get(component)
        revision = meta.get("base_revision") or cfg.get(f"{component}_revision")
        commit = meta.get("base_commit")
        lora = cfg.get("lora") or {}
        method = "DoRA" if lora.get("dora") else "LoRA"
        rank, alpha = rank or lora.get("rank"), alpha or lora.get("alpha")
        other = {"prior": cfg.get("decoder") or "kandinsky-community/kandinsky-2-2-decoder",
                 "decoder": cfg.get("prior") or "kandinsky-community/kandinsky-2-2-prior"}[component]
        prior, decoder = (base, other) if component == "prior" else (other, base)
        target = "prior.prior" if component == "prior" else "decoder.unet"
        snippet = ("import torch\nfrom diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline\n\n"
                   f'prior = KandinskyV22PriorPipeline.from_pretrained("{prior}", torch_dtype=torch.float16)\n'
                   f'decoder = KandinskyV22Pipeline.from_pretrained("{decoder}", torch_dtype=torch.float16)\n'
                   f'{target}.load_lora_adapter("{{repo}}", prefix=None, '
                   'weight_name="pytorch_lora_weights.safetensors")\n'
                   'prior.to("cuda"); decoder.to("cuda")\n'
                   'emb, neg = prior("Generate an image containing a polyp.").to_tuple()\n'
                   "image = decoder(image_embeds=emb, negative_image_embeds=neg, height=256, width=256).images[0]\n")
    elif family == "kandinsky3":
        src = meta.get("base") if isinstance(meta.get("base"), dict) else {}
        base, revision, commit = cfg.get("base"), cfg.get("revision"), src.get("commit")
        lora = cfg.get("lora") or {}
        method = "DoRA" if lora.get("dora") else "LoRA"
        rank, alpha = rank or lora.get("rank"), alpha or lora.get("alpha")
        snippet = ("import json, torch\nfrom diffusers import Kandinsky3Pipeline\nfrom huggingface_hub import "
                   "hf_hub_download\nfrom peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict\n"
                   "from safetensors.torch import load_file\n\n"
                   f'pipe = Kandinsky3Pipeline.from_pretrained("{base}"{_rev(revision)}, torch_dtype=torch.float16)'
                   '.to("cuda")\n'
                   'cfg = json.load(open(hf_hub_download("{repo}", "adapter_config.json")))\n'
                   "inject_adapter_in_model(LoraConfig(**cfg), pipe.unet)\n"
                   'set_peft_model_state_dict(pipe.unet, load_file(hf_hub_download("{repo}", '
                   '"pytorch_lora_weights.safetensors")))\n'
                   'image = pipe("Generate an image containing a polyp.", negative_prompt="", height=256, '
                   "width=256).images[0]\n")
    elif family in ("msdm-vae", "msdm-unet"):
        base = revision = commit = None
        method = "full training from scratch (MSDM)"
        parts = ["vae"] if family == "msdm-vae" else ["unet", "vae"]
        classes = {"vae": ("models.msdm.vae", "MSDMAutoencoder"), "unet": ("models.msdm.unet", "MSDMUNet")}
        snippet = ("# MSDM is not a diffusers pipeline: its models load with medvqa-harness's classes\n"
                   "# (diffusers ModelMixin/ConfigMixin), and `harness generate` samples from a run folder.\n"
                   + "".join(f"from {classes[p][0]} import {classes[p][1]}\n" for p in parts) + "\n"
                   + "".join(f'{p} = {classes[p][1]}.from_pretrained("{{repo}}", subfolder="{p}")\n' for p in parts))
    elif family == "attributes":  # the attribute classifier of adherence / FTER / memorisation (harness/attributes.py)
        base = revision = commit = None
        method = f"multi-label attribute classifier ({cfg.get('backbone', '?')}; {cfg.get('resolved_weights', '?')})"
        snippet = ("# The attribute classifier behind `harness score --metrics adherence,memorisation --classifier`:\n"
                   "# a torchvision backbone saved by medvqa-harness (labels in final/labels.json).\n"
                   "from huggingface_hub import snapshot_download\n"
                   "from models.attributes import AttributeClassifier\n\n"
                   'clf = AttributeClassifier.from_pretrained(snapshot_download("{repo}") + "/classifier")\n')
    else:
        raise UserError(f"harness push does not know the run kind {family!r}", run.config_path)
    return Described(family=family, method=method, rank=rank, alpha=alpha, base=base, revision=revision,
                     commit=commit, adapter=adapter, snippet=snippet)


_SD_METHODS = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning", "bitfit": "BitFit", "difffit": "DiffFit"}
_SD_CLASSES = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel", "vae": "AutoencoderKL"}


def _rev(revision: str | None) -> str:
    return f', revision="{revision}"' if revision else ""


def _is_hub_id(value: str | None) -> bool:
    return bool(value) and bool(_HUB_ID.match(value)) and not Path(value).exists()


# ---------------------------------------------------------------------------------------------------------------
# The card.


def metrics_rows(run: Run) -> list[list[str]]:
    """[metric, value, 95 % interval, N_gen, N_real, real set] for every metric computed (RUN/metrics.json)."""
    from harness.leaderboard import row_from_metrics

    if not run.metrics_path.is_file():
        return []
    data = read_json(run.metrics_path)
    results = data.get("results") if isinstance(data.get("results"), dict) and data["results"] else {"": data}
    out = []
    for _, res in sorted(results.items()):
        r = row_from_metrics(res, run.dir)
        for name, attr, iv_key, digits in (("FID", "fid", "fid", 3), ("KID", "kid", "kid", 5),
                                           ("IS", "is_mean", None, 3), ("precision", "precision", "precision", 3),
                                           ("recall", "recall", "recall", 3), ("F1", "f1", "f1", 3),
                                           ("2024 FD (organisers')", "fd2024", None, 4),
                                           ("2024 IS (organisers')", "is2024", None, 3)):
            v = getattr(r, attr)
            if v is None:
                continue
            iv = r.intervals.get(iv_key or "")
            out.append([name, f"{v:.{digits}f}", f"[{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]" if iv else "—",
                        str(r.n_gen), str(r.n_real), f"{r.real_label} ({r.preprocess})"])
    return out


def render_card(run: Run, repo: str, has_grid: bool = False) -> str:
    """README.md of the hub repo: huggingface_hub ModelCard (YAML metadata + markdown)."""
    from huggingface_hub import ModelCard, ModelCardData

    d = describe(run)
    cfg = run.config(resolve=False)
    data = run.data_hashes()
    stats = read_json(run.dir / "train_stats.json") if (run.dir / "train_stats.json").is_file() else {}
    tags = list(CARD_TAGS) + [d.family] + (["lora"] if d.adapter else [])
    meta = {"license": DATA_LICENSE, "library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    if _is_hub_id(d.base):
        meta["base_model"] = d.base
        meta["base_model_relation"] = "adapter" if d.adapter else "finetune"
    card_data = ModelCardData(**meta)
    loop = cfg.get("loop") or {}
    rows = [("run", f"`{run.id}` ({d.family}, harness {cfg.get('harness_version', '?')})"),
            ("base model", f"`{d.base}`" if d.base else "none (trained from scratch)"),
            ("base revision", " / ".join(f"`{x}`" for x in (d.revision, d.commit) if x) or "—"),
            ("method", d.method + (f", rank {d.rank}" if d.rank is not None else "")
             + (f", alpha {d.alpha:g}" if isinstance(d.alpha, (int, float)) else "")),
            ("training", f"{stats.get('steps', loop.get('max_steps'))} steps, batch {loop.get('batch_size')} x "
                         f"{loop.get('grad_accum')} accumulation, lr {loop.get('lr')}, seed {loop.get('seed')}, "
                         f"mixed precision {loop.get('mixed_precision')}"),
            ("final loss", _num(stats.get("final_loss")) + (f" (validation {_num(stats.get('val_loss'))})"
                                                           if stats.get("val_loss") is not None else "")),
            *([("weights", _selected(meta_sel))] if (meta_sel := _meta(_final(run)).get("selected")) else []),
            ("training data", f"prompt-gt.csv sha256 `{data.get('csv_sha256', '?')}`, split sha256 "
                              f"`{data.get('split_sha256', '?')}`"
                              + (f", {data['n_images']} training images" if data.get("n_images") else ""))]
    lines = [f"# {repo.split('/')[1]}", "",
             f"{_intro(d)} on the ImageCLEFmed MEDVQA-GI 2024 development set "
             "(text-to-image synthesis of gastrointestinal endoscopy images) with medvqa-harness "
             "(`harness push`).", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    m = metrics_rows(run)
    lines += ["## Metrics", ""]
    if m:
        lines += ["Scored with `harness score` against real images; intervals are seeded bootstrap 95 % intervals.",
                  "", "| metric | value | 95 % interval | N_gen | N_real | real set |", "|---|---:|---|---:|---:|---|",
                  *("| " + " | ".join(r) + " |" for r in m), ""]
    else:
        lines += ["Not scored yet (`harness generate RUN ...` then `harness score RUN`).", ""]
    if has_grid:
        lines += ["## Samples", "", f"![samples]({GRID_FILE})", ""]
    lines += ["## How to load", "", "```python", d.snippet.replace("{repo}", repo).rstrip(), "```", ""]
    lines += ["## Data licence and attribution", "", ATTRIBUTION, ""]
    lines += ["## Training config", "",
              f"The run's full records (config.json, data.json, train_stats.json) are in `{RUN_FILE}`.", "",
              "<details><summary>config.json</summary>", "", "```json", json.dumps(cfg, indent=2, default=str),
              "```", "", "</details>", ""]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _selected(sel: dict[str, Any]) -> str:
    """Kandinsky --eval-every-epochs: final/ holds the best epoch's adapter, not the last one."""
    return (f"the best by {sel.get('metric')} ({_num(sel.get('value'))}) at epoch {sel.get('epoch')}, step "
            f"{sel.get('step')}; training ran to epoch {sel.get('last_epoch')}")


def _intro(d: Described) -> str:
    rank = f" (rank {d.rank})" if d.rank is not None else ""
    if d.adapter:
        return f"A {d.method}{rank} adapter for `{d.base}`, trained"
    if d.base:
        return f"`{d.base}` fine-tuned ({d.method})"
    return f"A {d.family} model trained from scratch"


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "—"


# ---------------------------------------------------------------------------------------------------------------
# Staging and upload.


def _sample_grid(run: Run, out: Path) -> bool:
    """The scored images (metrics.json's sample) else the first generated ones, else the last training grid."""
    from harness.generate import MANIFEST, read_manifest

    images: list[tuple[Path, str]] = []
    if run.metrics_path.is_file():
        data = read_json(run.metrics_path)
        sample = (data.get("generated") or {}).get("sample") or []
        images = [(run.images_dir / s["filename"], s.get("prompt", "")) for s in sample
                  if isinstance(s, dict) and s.get("filename")]
    if not images and (run.images_dir / MANIFEST).is_file():
        images = [(run.images_dir / r["filename"], r["prompt"]) for r in read_manifest(run.images_dir / MANIFEST)[:8]]
    images = [(p, q) for p, q in images if p.is_file()]
    out.parent.mkdir(parents=True, exist_ok=True)
    if images:
        from harness.plots import sample_grid

        sample_grid([p for p, _ in images[:8]], [q for _, q in images[:8]], out, title=f"{run.id}: generated images")
        return True
    grids = sorted((run.dir / "samples").glob("step-*.png")) if (run.dir / "samples").is_dir() else []
    if grids:
        shutil.copyfile(grids[-1], out)
        return True
    return False


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # weights can be gigabytes: no second copy on disk while staging
    except OSError:
        shutil.copy2(src, dst)


def stage(run: Run, repo: str, folder: Path) -> list[tuple[str, int]]:
    """Write the folder to upload into `folder` (an empty directory); returns [(relative path, bytes)]."""
    final = _final(run)
    for src in sorted(p for p in final.rglob("*") if p.is_file()):
        _link_or_copy(src, folder / src.relative_to(final))
    has_grid = _sample_grid(run, folder / GRID_FILE)
    records = {"config": run.config(resolve=False), "data": run.data_hashes()}
    if (run.dir / "train_stats.json").is_file():
        records["train_stats"] = read_json(run.dir / "train_stats.json")
    write_json(folder / RUN_FILE, records)
    if run.metrics_path.is_file():
        shutil.copyfile(run.metrics_path, folder / "metrics.json")
    write_text(folder / "README.md", render_card(run, repo, has_grid=has_grid))
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or getattr(constants, "ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds (no request, no token)."""
    url = urlparse(hub_endpoint())
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy a direct connection proves nothing: the library's own timeouts apply
    try:
        with socket.create_connection((url.hostname or "huggingface.co",
                                       url.port or (80 if url.scheme == "http" else 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class PushResult:
    repo: str
    files: list[tuple[str, int]]
    url: str | None = None  # the commit's URL; None for a dry run
    folder: Path | None = None  # the staged folder of a dry run


def push(run: Run, repo: str, private: bool = False, dry_run: bool = False, out: Path | None = None
         ) -> PushResult:
    """Stage the run's final output with its model card and upload it to the model repo `repo` (created if needed,
    private when asked). `dry_run`: write the staged folder to `out` (default RUN/hub-push) and upload nothing.
    Offline or an unreachable hub: a UserError naming every file that would have been uploaded."""
    from harness.features import offline
    from harness.io import atomic_dir

    check_repo(repo)
    _final(run)
    describe(run)  # an unknown run kind fails before anything is written
    if dry_run:
        out = Path(out) if out else run.dir / "hub-push"
        if out.exists() and any(out.iterdir()) and not (out / RUN_FILE).is_file():
            raise UserError("--out exists and is not a staged push folder; name a new or empty folder", out)
        with atomic_dir(out) as tmp:
            files = stage(run, repo, tmp)
        return PushResult(repo, files, folder=out)
    with tempfile.TemporaryDirectory(prefix=".hub-push-", dir=run.dir) as tmp:
        files = stage(run, repo, Path(tmp))
        what = (f"{len(files)} files, {_size(sum(s for _, s in files))}: "
                + ", ".join(f"{p} ({_size(s)})" for p, s in files))
        if offline():
            raise UserError(f"offline (HF_HUB_OFFLINE/HARNESS_OFFLINE set): nothing uploaded; would have uploaded "
                            f"to the {'private ' if private else ''}model repo {repo}: {what}")
        if not hub_reachable():
            raise UserError(f"the hub ({hub_endpoint()}) is unreachable: nothing uploaded; would have uploaded to "
                            f"the {'private ' if private else ''}model repo {repo}: {what}")
        from huggingface_hub import HfApi

        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        try:
            api.create_repo(repo, repo_type="model", private=True if private else None, exist_ok=True)
            commit = api.upload_folder(folder_path=tmp, repo_id=repo, repo_type="model",
                                       commit_message=f"{run.id} (medvqa-harness push)")
        except Exception as e:  # auth (no token, no write access), network, quota: one line, never the token
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"upload to {repo} failed ({type(e).__name__}: {first}); log in with `hf auth login` "
                            "or set HF_TOKEN") from None
    run.log(f"pushed final/ to the hub model repo {repo} ({len(files)} files): {getattr(commit, 'commit_url', '')}")
    return PushResult(repo, files, url=str(getattr(commit, "commit_url", commit)))
