"""The MEDVQA-GI 2025 task-2 metrics, on BiomedCLIP image features (the CLS token of the vision tower).

Prompts come in pairs (0,1), (2,3), ... describing the same content two ways. For a pair (A, B):
- agreement: mean cosine similarity over every (image of A, image of B) pair;
- diversity: mean pairwise L2 distance between the L2-normalised features of one prompt's images (each unordered
  pair once), for A and for B;
- FID(A, real A) and FID(B, real B): Fréchet distance between a prompt's images and the real images mapped to it.
Global: fidelity = mean over the scored prompts of 1000 / (1 + FID) (100 / (1 + FID) before 2025-05-09),
agreement and diversity = means over the scored pairs / prompts, FBD = Fréchet distance between all generated and
all real features.

The organisers' public script loops `for i in range(0, len(prompts) // 2, 2)`, which scores only the first half of
the pairs. `organiser_quirks=False` (the default) is the intended metric, over every pair; True reproduces the
script. Every result carries `variant` saying which one it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from harness.errors import UserError

BIOMEDCLIP = "ikim-uk-essen/BiomedCLIP_ViT_patch16_224"
FIDELITY_SCALE = 1000.0  # the organisers' constant since 2025-05-09 (100 before)
INTENDED = "intended (every pair)"
QUIRKS = "organiser-quirks (the public script's loop: first half of the pairs only)"


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), scipy sqrtm, real part: the 2024 evaluator's formula."""
    from harness.imageclef2024 import frechet_distance

    return frechet_distance(np.asarray(a, np.float64), np.asarray(b, np.float64))


def scored_pairs(n_prompts: int, organiser_quirks: bool = False) -> list[tuple[int, int]]:
    """0-based (A, B) prompt indices of the pairs that are scored."""
    if n_prompts % 2:
        raise UserError(f"{n_prompts} prompts: the 2025 prompts come in pairs, so their number must be even")
    stop = n_prompts // 2 if organiser_quirks else n_prompts
    return [(i, i + 1) for i in range(0, stop, 2)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((_unit(a) @ _unit(b).T).mean())


def diversity(x: np.ndarray) -> float:
    u = _unit(x)
    d = np.sqrt(np.maximum(((u[:, None, :] - u[None, :, :]) ** 2).sum(-1), 0.0))
    iu = np.triu_indices(len(u), k=1)
    return float(d[iu].mean())


@dataclass
class Result2025:
    fidelity: float
    agreement: float
    diversity: float
    fbd: float
    variant: str
    pairs_scored: int
    pairs_total: int
    fid_per_prompt: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        return {"fidelity": self.fidelity, "agreement": self.agreement, "diversity": self.diversity,
                "FBD": self.fbd, "variant": self.variant, "pairs_scored": self.pairs_scored,
                "pairs_total": self.pairs_total,
                "fid_per_prompt": {str(k + 1): v for k, v in self.fid_per_prompt.items()}}


def metrics_2025(gen: Sequence[np.ndarray], real: Sequence[np.ndarray], real_all: np.ndarray | None = None, *,
                 organiser_quirks: bool = False) -> Result2025:
    """`gen[p]`: features (K, D) of prompt p's images; `real[p]`: features of the real images mapped to prompt p;
    `real_all`: the whole real reference set for FBD (default: every row of `real`, concatenated)."""
    n = len(gen)
    if len(real) != n:
        raise ValueError(f"{len(real)} real sets for {n} prompts")
    pairs = scored_pairs(n, organiser_quirks)
    agree, div, fids = [], [], {}
    for a, b in pairs:
        agree.append(agreement(gen[a], gen[b]))
        for p in (a, b):
            div.append(diversity(gen[p]))
            fids[p] = frechet(gen[p], real[p])
    fidelity = float(np.mean([FIDELITY_SCALE / (1.0 + f) for f in fids.values()]))
    all_real = real_all if real_all is not None else np.concatenate(list(real))
    fbd = frechet(np.concatenate(list(gen)), all_real)
    return Result2025(fidelity=fidelity, agreement=float(np.mean(agree)), diversity=float(np.mean(div)), fbd=fbd,
                      variant=QUIRKS if organiser_quirks else INTENDED, pairs_scored=len(pairs),
                      pairs_total=n // 2, fid_per_prompt=fids)


# ----------------------------------------------------------------------------------------------- features


class BiomedCLIPMissing(Exception):
    """The BiomedCLIP vision tower is not available (offline, not cached): the metrics are "not computed"."""


class BiomedCLIPFeatures:
    """CLS features (`last_hidden_state[:, 0, :]`) of BiomedCLIP's vision tower, loaded with transformers from the
    hub id or a local folder (`save_pretrained` layout: config.json + weights + preprocessor_config.json)."""

    def __init__(self, source: str | Path = BIOMEDCLIP, device: str = "cpu"):
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModel

        from harness.features import offline

        self.source, self.device = str(source), torch.device(device)
        local = Path(source).is_dir()
        try:
            self.model = CLIPVisionModel.from_pretrained(self.source, local_files_only=local or offline())
            self.processor = CLIPImageProcessor.from_pretrained(self.source, local_files_only=local or offline())
        except (OSError, ValueError) as e:
            where = f"folder {source}" if local else f"hub model {source} (offline: not in the Hugging Face cache)" \
                if offline() else f"hub model {source}"
            raise BiomedCLIPMissing(f"BiomedCLIP vision tower not loadable from {where}: {str(e).splitlines()[0]}; "
                                    f"download it with `huggingface-cli download {BIOMEDCLIP}` or pass a local "
                                    "folder") from None
        self.model.eval().to(self.device)

    def identity(self) -> dict[str, Any]:
        return {"extractor": "biomedclip-cls", "source": self.source,
                "config": self.model.config.to_diff_dict() if hasattr(self.model.config, "to_diff_dict") else {}}

    def __call__(self, paths: Sequence[Path], batch_size: int = 32) -> np.ndarray:
        import torch

        from harness.images import open_rgb

        out = []
        with torch.no_grad():
            for s in range(0, len(paths), batch_size):
                images = [open_rgb(p) for p in paths[s:s + batch_size]]
                pix = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
                out.append(self.model(pixel_values=pix).last_hidden_state[:, 0, :].float().cpu().numpy())
        return np.concatenate(out)


def not_computed(reason: str, organiser_quirks: bool = False) -> dict[str, Any]:
    return {m: None for m in ("fidelity", "agreement", "diversity", "FBD")} | {
        "variant": QUIRKS if organiser_quirks else INTENDED, "not_computed": reason}


# ----------------------------------------------------------------------------------------------- scoring a folder


def score_2025(images_dir: Path, prompts: Sequence[str], data_dir: Path, profile, *, organiser_quirks: bool = False,
               biomedclip: str | Path = BIOMEDCLIP, device: str = "cpu", batch_size: int = 32,
               out: Path | None = None) -> tuple[dict[str, Any], Path]:
    """`harness score --challenge imageclef2025-task2`: the four metrics of IMAGES_DIR (named by the profile)
    against a real set in the harness layout (`prompt-gt.csv + images/`, e.g. from `harness data fetch`), where the
    real images of a prompt are the images with that exact caption; FBD's real side is every real image mapped to
    a scored prompt. Writes the result (with its variant, the prompt and real-set hashes) to `out`
    (default IMAGES_DIR/../metrics-<challenge>.json). Without the BiomedCLIP weights the metrics are recorded as not
    computed, with the reason."""
    from harness.data import load_devset
    from harness.io import sha256_bytes, write_json

    images_dir, k = Path(images_dir), profile.k
    names = profile.expected_names(len(prompts))
    missing = [n for n in names if not (images_dir / n).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) missing, first {missing[0]} (run `harness generate --challenge "
                        f"{profile.name}`)", images_dir)
    devset = load_devset(data_dir)
    by_prompt: dict[str, list[str]] = {}
    for r in devset.rows:
        by_prompt.setdefault(r.prompt, []).append(r.filename)
    no_real = [i + 1 for i, p in enumerate(prompts) if len(set(by_prompt.get(p, []))) < 2]
    if no_real:
        raise UserError(f"prompt(s) {', '.join(map(str, no_real[:5]))} have fewer than 2 real images with that exact "
                        "caption in the real set (FID needs 2 on each side)", devset.csv_path)
    record: dict[str, Any] = {
        "challenge": profile.name, "images": str(images_dir), "n_prompts": len(prompts), "images_per_prompt": k,
        "prompts_sha256": sha256_bytes("\n".join(prompts).encode()), "real": str(devset.root),
        "real_csv_sha256": devset.csv_sha256, "features": f"{biomedclip} vision tower, CLS (last_hidden_state[:, 0])",
        "fidelity_scale": FIDELITY_SCALE,
    }
    try:
        extract = BiomedCLIPFeatures(biomedclip, device=device)
    except BiomedCLIPMissing as e:
        record |= not_computed(str(e), organiser_quirks)
    else:
        feats = extract([images_dir / n for n in names], batch_size)
        gen = [feats[p * k:(p + 1) * k] for p in range(len(prompts))]
        real_names = sorted({f for p in prompts for f in by_prompt[p]})
        real_feats = dict(zip(real_names, extract([devset.image_path(f) for f in real_names], batch_size)))
        real = [np.stack([real_feats[f] for f in sorted(set(by_prompt[p]))]) for p in prompts]
        res = metrics_2025(gen, real, np.stack(list(real_feats.values())), organiser_quirks=organiser_quirks)
        record |= res.to_dict() | {"extractor": extract.identity()}
    out = Path(out) if out else images_dir.parent / f"metrics-{profile.name}.json"
    write_json(out, record)
    return record, out
