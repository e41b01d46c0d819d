"""The MEDVQA-GI 2025 task-2 metrics, on BiomedCLIP image features (the CLS token of the vision tower), as the
organisers' public `submission_task2.py` template computes them.

Prompts come in pairs (0,1), (2,3), ... describing the same content two ways; each pair has one real reference set
(the organisers' `real_mapping` names it by the pair's first prompt). For a pair (A, B):
- agreement: mean cosine similarity over every (image of A, image of B) pair (L2-normalised features);
- diversity: mean pairwise L2 distance between the L2-normalised features of one prompt's images (each unordered
  pair once, scipy's pdist), for A and for B;
- FID(A, real) and FID(B, real) against the pair's real images; the pair's FID is their mean.
Global: fidelity = mean over pairs of 1000 / (1 + pair FID) (100 / (1 + FID) before 2025-05-09) - with a pair's two
FIDs averaged first, as the template does; agreement and diversity = means over the scored pairs / prompts;
FBD = Fréchet distance between every scored generated feature and the scored pairs' real features (a real image
shared by two pairs counts twice, as in the template). `fidelity_per_prompt` is the other reading of the task's
description, mean over prompts of 1000 / (1 + FID(prompt, real)) - reported beside it, never in its place: the
organisers' leaderboard numbers are the template's.

The template's pair loop is `for i in range(0, len(prompts) // 2, 2)`, which scores only the first half of the pairs.
`organiser_quirks=False` (the default) is the intended metric, over every pair; True reproduces the template (it
changes every number, FBD included). Every result carries `variant` saying which one it is.
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
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), scipy sqrtm, real part: the template's formula."""
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

    @property
    def fidelity_per_prompt(self) -> float:
        return float(np.mean([FIDELITY_SCALE / (1.0 + f) for f in self.fid_per_prompt.values()]))

    def to_dict(self) -> dict[str, Any]:
        return {"fidelity": self.fidelity, "fidelity_per_prompt": self.fidelity_per_prompt, "agreement": self.agreement, "diversity": self.diversity,
                "FBD": self.fbd, "variant": self.variant, "pairs_scored": self.pairs_scored,
                "pairs_total": self.pairs_total,
                "fid_per_prompt": {str(k + 1): v for k, v in self.fid_per_prompt.items()}}


def metrics_2025(gen: Sequence[np.ndarray], real: Sequence[np.ndarray], *,
                 organiser_quirks: bool = False) -> Result2025:
    """`gen[p]`: features (K, D) of prompt p's images (0-based); `real[j]`: features of pair j's real images (pair j
    = prompts 2j and 2j+1)."""
    n = len(gen)
    pairs = scored_pairs(n, organiser_quirks)
    if len(real) != n // 2:
        raise ValueError(f"{len(real)} real sets for {n // 2} pairs")
    agree, div, pair_fids, fids = [], [], [], {}
    all_gen, all_real = [], []
    for a, b in pairs:
        ref = real[a // 2]
        agree.append(agreement(gen[a], gen[b]))
        div += [diversity(gen[a]), diversity(gen[b])]
        fids[a], fids[b] = frechet(gen[a], ref), frechet(gen[b], ref)
        pair_fids.append((fids[a] + fids[b]) / 2)
        all_gen += [gen[a], gen[b]]
        all_real.append(ref)
    fidelity = float(np.mean(FIDELITY_SCALE / (1.0 + np.asarray(pair_fids))))
    fbd = frechet(np.concatenate(all_gen), np.concatenate(all_real))
    return Result2025(fidelity=fidelity, agreement=float(np.mean(agree)), diversity=float(np.mean(div)), fbd=fbd,
                      variant=QUIRKS if organiser_quirks else INTENDED, pairs_scored=len(pairs),
                      pairs_total=n // 2, fid_per_prompt=fids)


# ----------------------------------------------------------------------------------------------- features


class BiomedCLIPMissing(Exception):
    """The BiomedCLIP vision tower is not available (offline, not cached): the metrics are "not computed"."""


class BiomedCLIPFeatures:
    """CLS features (`last_hidden_state[:, 0, :]`) of BiomedCLIP's vision tower, loaded with transformers from the
    hub id or a local folder (`save_pretrained` layout: config.json + weights + preprocessor_config.json). Images
    are read as RGB (PIL `convert("RGB")` in the template; harness.images.open_rgb here) and preprocessed by the
    repository's own processor."""

    def __init__(self, source: str | Path = BIOMEDCLIP, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoProcessor

        from harness.features import offline

        self.source, self.device = str(source), torch.device(device)
        local = Path(source).is_dir()
        # AutoModel/AutoProcessor with the repo's own code, as the organisers' template loads it (the official
        # repository ships custom code); a local save_pretrained folder of a CLIP vision tower loads the same way.
        kw = {"local_files_only": local or offline(), "trust_remote_code": True}
        try:
            self.model = AutoModel.from_pretrained(self.source, **kw)
            self.processor = AutoProcessor.from_pretrained(self.source, **kw)
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
                inputs = self.processor(images=images, return_tensors="pt").to(self.device)
                out.append(self.model(**inputs).last_hidden_state[:, 0, :].float().cpu().numpy())
        return np.concatenate(out)


# ----------------------------------------------------------------------------------------------- scoring a folder


def real_sets(prompts: Sequence[str], devset, mapping: dict[str, list[str]] | None,
              mapping_path: Path | None = None) -> list[list[Path]]:
    """Real image files of each pair. With the organisers' `real_mapping` JSON ({"<1-based number of the pair's
    first prompt>": [img_id, ...]}): the images `images/<img_id>.*` of the real set (`harness data fetch` names
    files by img_id). Without it: the images captioned with either prompt of the pair, exactly."""
    by_stem = {Path(r.filename).stem: r.filename for r in devset.rows}
    by_prompt: dict[str, set[str]] = {}
    for r in devset.rows:
        by_prompt.setdefault(r.prompt, set()).add(r.filename)
    out = []
    for a in range(0, len(prompts), 2):
        if mapping is not None:
            ids = mapping.get(str(a + 1))
            if ids is None:
                raise UserError(f"no entry for prompt {a + 1} (the pair's first prompt)", mapping_path)
            missing = [i for i in ids if str(i) not in by_stem]
            if missing:
                raise UserError(f"prompt {a + 1}: real image id(s) {', '.join(map(str, missing[:5]))} not in "
                                f"{devset.csv_path}", mapping_path)
            files = [by_stem[str(i)] for i in ids]
        else:
            files = sorted(by_prompt.get(prompts[a], set()) | by_prompt.get(prompts[a + 1], set()))
        if len(set(files)) < 2:
            raise UserError(f"pair of prompts {a + 1}-{a + 2} has {len(set(files))} real image(s); FID needs at least 2 "
                            "(pass the organisers' --real-mapping, or a real set captioned with these prompts)",
                            mapping_path or devset.csv_path)
        out.append([devset.image_path(f) for f in files])
    return out


def score_2025(images_dir: Path, prompts: Sequence[str], data_dir: Path, profile, *, organiser_quirks: bool = False,
               biomedclip: str | Path = BIOMEDCLIP, device: str = "cpu", batch_size: int = 32,
               out: Path | None = None, real_mapping: Path | None = None) -> tuple[dict[str, Any], Path]:
    """`harness score --challenge imageclef2025-task2`: the four metrics of IMAGES_DIR (named by the profile)
    against a real set in the harness layout (`prompt-gt.csv + images/`, e.g. `harness data fetch
    SimulaMet/Kvasir-VQA-test --split validation`), each pair's real images given by `real_mapping` (the organisers'
    JSON) or by exact captions (`real_sets`). Writes the result (with its variant, the prompt and real-set hashes)
    to `out` (default IMAGES_DIR/../metrics-<challenge>.json). Without the BiomedCLIP weights the metrics are
    recorded as not computed, with the reason."""
    import json

    from harness.data import load_devset
    from harness.io import sha256_bytes, sha256_file, write_json

    images_dir, k = Path(images_dir), profile.k
    names = profile.expected_names(len(prompts))
    missing = [n for n in names if not (images_dir / n).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) missing, first {missing[0]} (run `harness generate --challenge "
                        f"{profile.name}`)", images_dir)
    scored_pairs(len(prompts))  # an odd prompt count is refused before any work
    devset = load_devset(data_dir)
    mapping = None
    if real_mapping is not None:
        try:
            mapping = json.loads(Path(real_mapping).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"not a readable JSON mapping ({e})", real_mapping) from None
        if not isinstance(mapping, dict):
            raise UserError("expected a JSON object {prompt number: [img_id, ...]}", real_mapping)
    real_files = real_sets(prompts, devset, mapping, real_mapping)
    record: dict[str, Any] = {
        "challenge": profile.name, "images": str(images_dir), "n_prompts": len(prompts), "images_per_prompt": k,
        "prompts_sha256": sha256_bytes("\n".join(prompts).encode()), "real": str(devset.root),
        "real_csv_sha256": devset.csv_sha256,
        "real_mapping": str(real_mapping) if real_mapping else "exact captions of each pair",
        "real_mapping_sha256": sha256_file(real_mapping) if real_mapping else None,
        "features": f"{biomedclip} vision tower, CLS (last_hidden_state[:, 0])", "fidelity_scale": FIDELITY_SCALE,
    }
    try:
        extract = BiomedCLIPFeatures(biomedclip, device=device)
    except BiomedCLIPMissing as e:
        record |= not_computed(str(e), organiser_quirks)
    else:
        feats = extract([images_dir / n for n in names], batch_size)
        gen = [feats[p * k:(p + 1) * k] for p in range(len(prompts))]
        unique = sorted({f for files in real_files for f in files})
        cache = dict(zip(unique, extract(unique, batch_size)))
        real = [np.stack([cache[f] for f in files]) for files in real_files]
        res = metrics_2025(gen, real, organiser_quirks=organiser_quirks)
        record |= res.to_dict() | {"extractor": extract.identity()}
    out = Path(out) if out else images_dir.parent / f"metrics-{profile.name}.json"
    write_json(out, record)
    return record, out


def not_computed(reason: str, organiser_quirks: bool = False) -> dict[str, Any]:
    return {m: None for m in ("fidelity", "agreement", "diversity", "FBD")} | {
        "variant": QUIRKS if organiser_quirks else INTENDED, "not_computed": reason}
