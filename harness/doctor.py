"""`harness doctor`: what this machine has for the harness, checked without loading a model or downloading a byte.

One list of checks: Python and torch, the CUDA devices and their memory, every installed dependency against the
floors the installed distribution declares (`importlib.metadata.requires("medvqa-harness")`: pyproject.toml is the
one list), the weights files each command loads (torch-fidelity's Inception, VGG16, the organisers' Inception in
torch.hub's checkpoint folder, where `harness score` looks; the families' default hub models in the Hugging Face
cache, where `from_pretrained` looks), whether the hub answers (a short HEAD request in a thread that is abandoned
after its timeout; nothing at all under HF_HUB_OFFLINE) and the free space where the caches grow.

`requirements(target)` names what one command needs (`harness doctor --for score`), so a user learns about a
missing weights file before a long job rather than at the step that loads it.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DIST = "medvqa-harness"
HUB_TIMEOUT_S = 3.0  # a reachable hub answers a HEAD in well under a second; a firewall drops it silently

OK, MISSING, WARN, INFO = "ok", "missing", "warn", "info"


@dataclass
class Check:
    """One row of the table."""

    section: str
    name: str
    status: str  # ok | missing | warn | info
    detail: str
    where: str = ""


# ------------------------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class TorchHubFile:
    """A weights file `harness score` (or a trainer) reads from $TORCH_HOME/hub/checkpoints (harness.features)."""

    key: str
    label: str
    extractor: str  # key of harness.features.WEIGHTS
    also: str = ""  # other ways to give it

    def locate(self, verify: bool = False) -> tuple[bool, str, str]:
        from harness.features import WEIGHTS, file_sha256_memo, torch_hub_checkpoints

        spec = WEIGHTS[self.extractor]
        path = torch_hub_checkpoints() / spec.filename
        where = str(path) + (f" (or {self.also})" if self.also else f" (or {spec.option} PATH)")
        if not path.is_file():
            return False, f"{spec.filename} not found; download it from {spec.url}", where
        detail = f"{spec.filename}, {_size(path.stat().st_size)}"
        if verify:  # the check `harness score` makes before using the file (memoised by size and mtime)
            digest = file_sha256_memo(path)
            if not digest.startswith(spec.sha256_prefix):
                return False, (f"{detail}: sha256 {digest[:12]}... is not the published file's (prefix "
                               f"{spec.sha256_prefix}); download it again from {spec.url}"), where
            detail += ", sha256 verified"
        return True, detail, where


@dataclass(frozen=True)
class HubModel:
    """A model the families load by hub id (their default base); looked for in the Hugging Face cache the way
    `from_pretrained` finds it offline."""

    key: str
    label: str
    repo_id: str
    pipeline: bool  # a diffusers pipeline (model_index.json + component folders) or a single transformers model

    def locate(self, verify: bool = False) -> tuple[bool, str, str]:
        """`verify` does not apply: the hub publishes no hash to check a snapshot against here."""
        cache = hf_cache_dir()
        where = str(cache / f"models--{self.repo_id.replace('/', '--')}")
        snapshot = _cached_snapshot(self.repo_id, "model_index.json" if self.pipeline else "config.json", cache)
        if snapshot is None:
            return False, f"{self.repo_id} not in the cache", where
        absent = _absent_weights(snapshot, self.pipeline)
        if absent:
            return False, f"{self.repo_id} incomplete: no weights in {', '.join(absent)}", str(snapshot)
        return True, f"{self.repo_id} @ {snapshot.name[:12]}, {_size(_tree_size(snapshot))}", str(snapshot)


def _weights_items() -> tuple:
    from models.kandinsky.loading import DEFAULT_DECODER, DEFAULT_PRIOR
    from models.kandinsky3.loading import DEFAULT_BASE as K3_BASE
    from models.msdm.text import DEFAULT_TEXT_ENCODER
    from models.sd.loading import DEFAULT_BASE as SD_BASE

    return (
        TorchHubFile("inception", "Inception (FID, KID, IS; torch-fidelity)", "inception-v3-compat"),
        TorchHubFile("vgg16", "VGG16 (precision/recall; MSDM VAE perceptual loss)", "vgg16"),
        TorchHubFile("imageclef2024", "organisers' InceptionV3 (imageclef2024 metric)", "imageclef2024",
                     also="Keras' inception_v3_weights_tf_dim_ordering_tf_kernels.h5 via --imageclef-weights"),
        TorchHubFile("clip-vit-l-14", "CLIP ViT-L/14 (--metrics fd-clip)", "clip-vit-l-14"),
        HubModel("clip-text", "CLIP text encoder (MSDM UNet default --text-encoder)", DEFAULT_TEXT_ENCODER, False),
        HubModel("kandinsky-prior", "Kandinsky 2.2 prior (default --prior)", DEFAULT_PRIOR, True),
        HubModel("kandinsky-decoder", "Kandinsky 2.2 decoder (default --decoder)", DEFAULT_DECODER, True),
        HubModel("sd", "Stable Diffusion (default --base of train sd)", SD_BASE, True),
        HubModel("kandinsky3", "Kandinsky 3.0 (default --base of train kandinsky3)", K3_BASE, True),
    )


@dataclass(frozen=True)
class Target:
    """What one command needs on disk (`--for NAME`)."""

    name: str
    needs: tuple[str, ...]  # keys of the weights items
    why: str


_SCORE = ("inception", "vgg16", "imageclef2024")
TARGETS: tuple[Target, ...] = (
    Target("score", _SCORE, "harness score with its default metrics (fid, is, prc, kid, imageclef2024)"),
    Target("train-msdm-vae", ("vgg16",), "the perceptual term of the paper preset (skipped without VGG16)"),
    Target("train-msdm-unet", ("clip-text",), "the default --text-encoder"),
    Target("train-msdm", ("vgg16", "clip-text"), "train msdm-vae then msdm-unet"),
    Target("train-kandinsky-prior", ("kandinsky-prior",), "the default --prior (its CLIP towers encode the data)"),
    Target("train-kandinsky-decoder", ("kandinsky-prior", "kandinsky-decoder"),
           "the default --decoder, and the prior's CLIP image tower for the image embeddings"),
    Target("train-kandinsky", ("kandinsky-prior", "kandinsky-decoder"), "train kandinsky-prior and kandinsky-decoder"),
    Target("train-sd", ("sd",), "the default --base"),
    Target("train-kandinsky3", ("kandinsky3",), "the default --base (U-Net, MoVQ and the FLAN-UL2 encoder)"),
    Target("generate-msdm", ("clip-text",), "an msdm-unet run trained with the default text encoder"),
    Target("generate-kandinsky", ("kandinsky-prior", "kandinsky-decoder"), "a Kandinsky 2.2 run on the default bases"),
    Target("generate-sd", ("sd",), "an SD run on the default base"),
    Target("generate-kandinsky3", ("kandinsky3",), "a Kandinsky 3.0 run on the default base"),
    Target("sweep-msdm-unet", ("clip-text", *_SCORE), "train, generate and score each cell"),
    Target("sweep-kandinsky-prior", ("kandinsky-prior", "kandinsky-decoder", *_SCORE),
           "train, generate and score each cell"),
    Target("sweep-kandinsky-decoder", ("kandinsky-prior", "kandinsky-decoder", *_SCORE),
           "train, generate and score each cell"),
    Target("sweep-sd", ("sd", *_SCORE), "train, generate and score each cell"),
    Target("sweep-kandinsky3", ("kandinsky3", *_SCORE), "train, generate and score each cell"),
)
TARGET_NAMES = tuple(t.name for t in TARGETS)


def target(name: str) -> Target:
    from harness.errors import UserError

    for t in TARGETS:
        if t.name == name:
            return t
    raise UserError(f"--for {name!r}: unknown; choose from {', '.join(TARGET_NAMES)}")


# ------------------------------------------------------------------------------------------------ the checks


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once at import):
    $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """huggingface_hub's own reading of HF_HUB_OFFLINE (1/ON/YES/TRUE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe_hub(timeout: float = HUB_TIMEOUT_S) -> tuple[bool | None, str]:
    """(reachable, detail). None = not tried (offline). A HEAD request in a daemon thread given `timeout` seconds:
    name resolution ignores socket timeouts, so the thread is abandoned rather than waited for."""
    if hub_offline():
        return None, "offline (HF_HUB_OFFLINE)"
    import urllib.error
    import urllib.request

    url = hub_endpoint()
    result: list[tuple[bool, str]] = []

    def head() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                result.append((True, f"{url} answered {r.status}"))
        except urllib.error.HTTPError as e:  # an answer all the same
            result.append((True, f"{url} answered {e.code}"))
        except Exception as e:  # DNS, refused, TLS, timeout: all mean "not reachable from here"
            result.append((False, f"{url} not reachable ({type(e).__name__}: {e})"))

    t = threading.Thread(target=head, daemon=True)
    t.start()
    t.join(timeout + 1)
    if not result:
        return False, f"{url} did not answer within {timeout:g} s"
    return result[0]


def _cached_snapshot(repo_id: str, filename: str, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
    return Path(found).parent if isinstance(found, str) else None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".msgpack", ".h5")


def _absent_weights(folder: Path, pipeline: bool) -> list[str]:
    """The model folders without a weights file: a pipeline's components that hold a model's config.json
    (tokenizers, schedulers and image processors have none), or the snapshot itself for a single model."""
    models = [d for d in sorted(folder.iterdir()) if d.is_dir() and (d / "config.json").is_file()] if pipeline \
        else [folder]
    return [d.name for d in models if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in d.iterdir())]


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size  # follows the cache's symlinks into blobs/
            except OSError:
                pass
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def python_checks() -> list[Check]:
    from packaging.specifiers import SpecifierSet

    try:
        wanted = md.metadata(DIST).get("Requires-Python") or ""
    except md.PackageNotFoundError:
        wanted = ""
    ver = platform.python_version()
    ok = not wanted or SpecifierSet(wanted).contains(ver, prereleases=True)
    return [Check("system", "python", OK if ok else MISSING, f"{ver} ({sys.executable})",
                  f"requires {wanted}" if wanted else "")]


def device_checks() -> list[Check]:
    import torch

    out = [Check("system", "torch", INFO, f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            try:  # what other processes already hold matters before a long job
                free = f"{_size(torch.cuda.mem_get_info(i)[0])} free of "
            except RuntimeError:
                free = ""
            out.append(Check("system", f"cuda:{i}", OK, f"{p.name}, {free}{_size(p.total_memory)}, "
                                                       f"compute capability {p.major}.{p.minor}"))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append(Check("system", "device", OK, "mps (Apple GPU)"))
    else:
        out.append(Check("system", "device", WARN, "CPU only: no CUDA device (training at scale needs a GPU)"))
    return out


def package_checks() -> list[Check]:
    """Every requirement of the installed distribution: the core ones must be met, an extra's are reported."""
    from packaging.requirements import Requirement

    try:
        reqs = md.requires(DIST) or []
        extras = md.metadata(DIST).get_all("Provides-Extra") or []
    except md.PackageNotFoundError:
        return [Check("packages", DIST, MISSING, "not installed: no metadata to read the floors from",
                      "pip install -e .")]
    out = []
    seen = set()
    for line in reqs:
        req = Requirement(line)
        if req.name == DIST:  # [dev] lists the other extras through the distribution itself
            continue
        extra = None
        if req.marker is not None:
            if req.marker.evaluate({"extra": ""}):
                pass
            else:
                extra = next((e for e in extras if req.marker.evaluate({"extra": e})), None)
                if extra is None:  # a marker for another Python version
                    continue
        if req.name.lower() in seen:
            continue
        seen.add(req.name.lower())
        spec = str(req.specifier) or "any"
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            status = INFO if extra else MISSING
            where = f'pip install -e ".[{extra}]"' if extra else "pip install -e ."
            out.append(Check("packages", req.name, status, f"not installed (needs {spec})"
                             + (f"; optional, extra [{extra}]" if extra else ""), where))
            continue
        ok = req.specifier.contains(have, prereleases=True)
        out.append(Check("packages", req.name, OK if ok else (WARN if extra else MISSING),
                         f"{have} (needs {spec})" + (f"; extra [{extra}]" if extra else ""),
                         "" if ok else f'pip install "{req}"'))
    return out


def weights_checks(only: tuple[str, ...] | None = None, verify: bool = False) -> list[Check]:
    out = []
    for item in _weights_items():
        if only is not None and item.key not in only:
            continue
        present, detail, where = item.locate(verify)
        out.append(Check("weights", item.label, OK if present else MISSING, detail, where))
    return out


def hub_checks(probe: Callable[[], tuple[bool | None, str]] = probe_hub) -> list[Check]:
    reachable, detail = probe()
    status = INFO if reachable is None else (OK if reachable else WARN)
    return [Check("network", "hub", status, detail, hub_endpoint())]


def disk_checks() -> list[Check]:
    """Free space on the file systems holding the caches that grow (one row per distinct file system)."""
    from harness.features import cache_root, torch_hub_checkpoints
    from harness.runs import runs_root

    places = [("HF cache", hf_cache_dir()), ("torch.hub", torch_hub_checkpoints().parent),
              ("harness cache", cache_root()), ("runs", runs_root())]
    out, seen = [], {}
    for what, path in places:
        anc = Path(path).absolute()
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        try:
            dev = anc.stat().st_dev
            usage = shutil.disk_usage(anc)
        except OSError as e:
            out.append(Check("disk", what, WARN, f"cannot read ({e.strerror})", str(path)))
            continue
        if dev in seen:
            seen[dev].name += f", {what}"
            seen[dev].where += f"; {path}"
            continue
        seen[dev] = Check("disk", what, INFO, f"{_size(usage.free)} free of {_size(usage.total)}", str(path))
        out.append(seen[dev])
    return out


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    target: Target | None = None

    def missing(self) -> list[Check]:
        """What is missing: with a target, only its weights are listed (with the Python and the core packages
        every command needs)."""
        return [c for c in self.checks if c.status == MISSING]


def run_checks(for_target: str | None = None, probe: Callable[[], tuple[bool | None, str]] = probe_hub,
               verify: bool = False) -> Report:
    t = target(for_target) if for_target else None
    checks = python_checks() + device_checks() + package_checks()
    checks += weights_checks(t.needs if t else None, verify)
    checks += hub_checks(probe) + disk_checks()
    return Report(checks, t)


def table(report: Report):
    from rich.markup import escape
    from rich.table import Table

    style = {OK: "green", MISSING: "bold red", WARN: "yellow", INFO: "dim"}
    title = "harness doctor" + (f" --for {report.target.name}: {report.target.why}" if report.target else "")
    tab = Table(title=title, show_lines=False)
    for col in ("section", "check", "status", "detail", "looked for in / fix"):
        tab.add_column(col, overflow="fold")
    for c in report.checks:
        tab.add_row(escape(c.section), escape(c.name), f"[{style[c.status]}]{c.status}[/]", escape(c.detail),
                    escape(c.where))
    return tab
