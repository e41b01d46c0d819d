"""The 2025 task-2 submission: a Hugging Face model repo that the organisers run.

`build_hub_folder` writes, in one piece (a temporary sibling renamed at the end):
    submission_task2.py   loads the run with this harness's own loader and generator for its family and writes
                          prompt{p:04d}_img{i:04d}.png + predictions_2.json (timing and memory measured there)
    runs/<run id>/        the run's weights and config (images/ and prompts/ left out), plus the runs and model
                          folders it records as inputs (an MSDM UNet's VAE run, a local text encoder), each copy's
                          paths.json pointing at its neighbour so `Run.resolve_recorded` finds it
    harness/, models/     this harness's source, so the repo runs without installing anything of ours
    requirements.txt      the harness's runtime dependencies (pyproject.toml), beside the organisers' own installs
    README.md             a model card
    prompts.json          the prompt file packaged with (the script's default prompt source)
    predictions_2.json    the fields the organisers' runner expects, filled with what is known locally
`push_hub_folder` uploads it with huggingface_hub; the token comes from the usual HF env/login and is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.io import dumps_json, write_json, write_text

SUBMISSION_INFO_FIELDS = ("Participant_Names", "Affiliations", "Contact_emails", "Team_Name", "Country",
                          "Notes_to_organizers")
PREDICTION_FIELDS = ("submission_info", "public_scores", "total_time", "time_per_item", "memory_used_mb",
                     "model_memory_mb", "gpu_name", "predictions", "debug")
# Installed by the organisers' runner whatever the repo asks for (REFERENCE.md §7).
RUNNER_INSTALLS = ("datasets", "transformers", "evaluate", "scipy", "scikit-learn", "diffusers", "peft", "tqdm")
_SKIP_IN_RUN = {"images", "prompts", "__pycache__"}
_HUB_REPO = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"


def check_hub_repo(repo: str) -> str:
    import re

    if not re.match(_HUB_REPO, repo) or len(repo) > 96:
        raise UserError(f"--hub-repo {repo!r}: expected USER/NAME (letters, digits, '-', '_', '.')")
    return repo


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and not (p / "prompt-gt.csv").exists() and any(
        (p / f).exists() for f in ("config.json", "model_index.json", "tokenizer_config.json", "text_encoder"))


def _copy_run(src: Path, dst_root: Path, done: dict[Path, Path]) -> Path:
    """Copy run/model folder `src` into dst_root/<name>, then the model folders it records as inputs, rewriting
    the copy's paths.json so each recorded input is found at its copy (lookup rule 3 of Run._find_recorded)."""
    src = src.resolve()
    if src in done:
        return done[src]
    dst = dst_root / src.name
    n = 1
    while dst.exists():
        n += 1
        dst = dst_root / f"{src.name}-{n}"
    done[src] = dst
    shutil.copytree(src, dst, ignore=lambda d, names: [x for x in names if Path(d) == src and x in _SKIP_IN_RUN
                                                       or x == "__pycache__"])
    paths_json = dst / "paths.json"
    if paths_json.is_file():
        rec = json.loads(paths_json.read_text(encoding="utf-8"))
        for value, entry in rec.get("paths", {}).items():
            target = Path(entry.get("absolute", ""))
            if _is_model_dir(target) and target.resolve() != src:
                copied = _copy_run(target, dst_root, done)
                entry["relative"] = os.path.relpath(copied, dst)
                entry["absolute"] = ""  # where it was on the maker's machine means nothing in the repo
        write_json(paths_json, rec)
    return dst


def requirements() -> str:
    try:
        reqs = metadata.requires("medvqa-harness") or []
    except metadata.PackageNotFoundError:  # running from a source checkout: read pyproject.toml itself
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        reqs = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"] \
            if pyproject.is_file() else []
    reqs = [r.split(";")[0].strip() for r in reqs if "extra ==" not in r]
    lines = ["# medvqa-harness runtime dependencies (its source is vendored in this repo: harness/, models/).",
             f"# The organisers' runner also installs: {', '.join(RUNNER_INSTALLS)}."]
    return "\n".join(lines + reqs) + "\n"


def predictions_template(team: str, run_id: str, family: str, scores: dict[str, Any] | None) -> dict[str, Any]:
    info = {k: "" for k in SUBMISSION_INFO_FIELDS} | {"Team_Name": team}
    public = {k: (scores or {}).get(k) for k in ("fidelity", "agreement", "diversity", "FBD")}
    return {
        "submission_info": info,
        "public_scores": public,
        "total_time": None, "time_per_item": None, "memory_used_mb": None, "model_memory_mb": None,
        "gpu_name": None, "predictions": None,
        "debug": {"harness_run": run_id, "family": family, "scores_variant": (scores or {}).get("variant"),
                  "note": "written by `harness package --hub-repo`; submission_task2.py fills timing and memory"},
    }


SCRIPT = '''"""MEDVQA-GI 2025 task 2 submission made with medvqa-harness: run {run_id} (family {family}).

1. Prompts: argv[1], $MEDVQA_PROMPTS, the organisers' test prompts (dataset SimulaMet/Kvasir-VQA-test, file
   imagen-test), or - offline - the prompts.json shipped beside this file; flattened as
   [c for qa in d.values() for pair in qa.values() for c in pair].
2. {k} images per prompt, prompt{{p:04d}}_img{{i:04d}}.png (1-based), with the harness's own generator for the family
   (seed of image i derived from (base seed {seed}, i): the same images as the maker's local run), into argv[2] /
   $MEDVQA_OUT (default generated_images/).
3. predictions_2.json: timing, memory and GPU measured here; `predictions` = BiomedCLIP CLS features per prompt;
   `public_scores` as the organisers' template computes them (its pair loop included), the intended metric (every
   pair) in debug. Anything that cannot be computed (offline, no weights) is null, with the reason in debug.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the vendored harness/ and models/

from harness.challenges import load_profile  # noqa: E402
from harness.generate import generate_images, load_generator  # noqa: E402
from harness.runs import open_run  # noqa: E402

RUN = HERE / "runs" / {run_name!r}
SEED = {seed}
BATCH_SIZE = {batch_size}
PROFILE = load_profile("imageclef2025-task2")
TEST_REPO = PROFILE.hub.test_dataset


def _hub_file(name):
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=TEST_REPO, filename=name, repo_type="dataset")


def _prompts_path(debug):
    if len(sys.argv) > 1 or os.environ.get("MEDVQA_PROMPTS"):
        return Path(sys.argv[1] if len(sys.argv) > 1 else os.environ["MEDVQA_PROMPTS"])
    try:
        return Path(_hub_file(PROFILE.hub.prompts_file))
    except Exception as e:  # offline or no access: the prompts packaged with the run
        debug["prompts_fallback"] = f"{{TEST_REPO}}/{{PROFILE.hub.prompts_file}} not loaded ({{type(e).__name__}}); used prompts.json"
        return HERE / "prompts.json"


def _scores(out, prompts, profile, device, debug):
    """(features per prompt as JSON, public scores): the harness's 2025 metrics on the organisers' real set."""
    from harness.challenges.hub_data import fetch_dataset
    from harness.challenges.metrics_2025 import BiomedCLIPFeatures, score_2025

    names = profile.expected_names(len(prompts))
    feats = BiomedCLIPFeatures(device=device)([out / n for n in names])
    k = profile.k
    predictions = json.dumps({{str(p + 1): feats[p * k:(p + 1) * k].tolist() for p in range(len(prompts))}})
    try:
        real = Path(tempfile.mkdtemp(prefix="kvasir-vqa-test-")) / "real"
        fetch_dataset(TEST_REPO, real, split=PROFILE.hub.test_split, prompt_template="{{img_id}}",
                      id_column="img_id")
        mapping = Path(_hub_file(PROFILE.hub.real_mapping_file))
        scores = {{}}
        for quirks in (True, False):
            rec, _ = score_2025(out, prompts, real, profile, organiser_quirks=quirks, device=device,
                                out=real.parent / f"scores-{{quirks}}.json", real_mapping=mapping)
            scores[quirks] = {{m: rec[m] for m in ("fidelity", "agreement", "diversity", "FBD")}}
            debug["scores_" + ("organiser_quirks" if quirks else "intended")] = rec["variant"]
        debug["intended_scores"] = scores[False]
        return predictions, scores[True]
    except Exception as e:
        debug["public_scores_not_computed"] = f"{{type(e).__name__}}: {{e}}"
        return predictions, None


def main() -> None:
    import torch

    debug = {{}}
    prompts_path = _prompts_path(debug)
    out = Path(sys.argv[2] if len(sys.argv) > 2 else os.environ.get("MEDVQA_OUT", "generated_images"))
    profile = PROFILE
    prompts = profile.read_prompts(prompts_path).prompts
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mem = (lambda: torch.cuda.memory_allocated() / 2**20) if device == "cuda" else (lambda: 0.0)
    initial = mem()
    gen = load_generator(open_run(RUN), {{"device": device}})
    post_model = mem()
    t0 = time.time()
    generate_images(gen, profile.image_prompts(prompts), out, base_seed=SEED, batch_size=BATCH_SIZE,
                    name=profile.file_name, device=device)
    total = time.time() - t0
    n_images = len(prompts) * profile.k
    preds = json.loads((HERE / "predictions_2.json").read_text(encoding="utf-8"))
    preds.update({{
        "total_time": round(total, 4),
        "time_per_item": total / n_images,
        "memory_used_mb": round(mem() - post_model, 2),
        "model_memory_mb": round(post_model - initial, 2),
        "gpu_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    }})
    del gen
    try:
        preds["predictions"], scores = _scores(out, prompts, profile, device, debug)
        if scores:
            preds["public_scores"] = {{m: round(float(v), 2) for m, v in scores.items()}}
    except Exception as e:  # BiomedCLIP not loadable (offline): no features, no scores
        debug["features_not_computed"] = f"{{type(e).__name__}}: {{e}}"
    preds["debug"] = {{**preds.get("debug", {{}}), **debug, "device": device, "prompts": str(prompts_path),
                       "images": str(out)}}
    Path("predictions_2.json").write_text(json.dumps(preds, indent=2), encoding="utf-8")
    print(f"{{n_images}} images -> {{out}}; predictions_2.json written ({{total:.1f}} s)")


if __name__ == "__main__":
    main()
'''

CARD = '''---
tags:
- text-to-image
- medical-imaging
- imageclef
- medvqa-gi-2025
---
# {repo}

Submission of team **{team}** to ImageCLEFmed MEDVQA-GI 2025, task 2 (image generation), made with medvqa-harness.

- Run: `{run_id}`, family `{family}`; model identity `{model_key}`.
- `python submission_task2.py [PROMPTS.json] [OUT_DIR]` writes {k} images per prompt
  (`prompt0001_img0001.png` ...) and `predictions_2.json`.
- Seeds: image i uses a seed derived from (base seed {seed}, i); batch size {batch_size}.
- Local scores: {scores}

Training data: Kvasir-VQA (SimulaMet-HOST/Kvasir-VQA); see the dataset card for its licence.
'''


def build_hub_folder(run, team: str, repo: str, prompts_path: Path, out_dir: Path, *, seed: int = 0,
                     batch_size: int = 8, generation: dict[str, Any] | None = None) -> Path:
    """Write the hub folder for RUN at OUT_DIR/<NAME> atomically; returns its path. `generation`: the local
    images' generation.json (its model key goes into the card)."""
    import harness
    import models

    check_hub_repo(repo)
    profile_prompts = Path(prompts_path)
    metrics = run.dir / "metrics-imageclef2025-task2.json"
    scores = json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else None
    # The model identity of the local images (loading a real model here just for its key would cost minutes).
    model_key = (generation or {}).get("model_key") or "no local images generated"
    final = Path(out_dir) / repo.split("/")[1]
    if final.exists():
        raise UserError("exists; remove it or choose another --out", final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        (tmp / "runs").mkdir()
        run_copy = _copy_run(run.dir, tmp / "runs", {})
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(Path(harness.__file__).parent, tmp / "harness", ignore=ignore)
        shutil.copytree(Path(models.__file__).parent, tmp / "models", ignore=ignore)
        shutil.copyfile(profile_prompts, tmp / "prompts.json")
        fields = dict(run_id=run.id, run_name=run_copy.name, family=run.family, seed=seed, batch_size=batch_size,
                      team=team, k=10, repo=repo, model_key=model_key,
                      scores=(f"{ {k: scores.get(k) for k in ('fidelity', 'agreement', 'diversity', 'FBD')} } "
                              f"[{scores.get('variant')}]") if scores else "not scored yet")
        write_text(tmp / "submission_task2.py", SCRIPT.format(**fields))
        write_text(tmp / "requirements.txt", requirements())
        write_text(tmp / "README.md", CARD.format(**fields))
        write_text(tmp / "predictions_2.json", dumps_json(predictions_template(team, run.id, run.family, scores)))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def push_hub_folder(folder: Path, repo: str) -> str:
    """Upload with huggingface_hub (token from HF_TOKEN or `hf auth login`; never written by us)."""
    from harness.features import offline

    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if offline():
        raise UserError(f"offline (HF_HUB_OFFLINE/HARNESS_OFFLINE set): would have uploaded {len(files)} files "
                        f"({size / 2**20:.1f} MiB) from {folder} to the model repo {repo}; run again online with "
                        "--push", folder)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push needs huggingface_hub (pip install huggingface_hub)") from None
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                   commit_message="MEDVQA-GI 2025 task 2 submission (medvqa-harness)")
    except Exception as e:  # network, auth (no token / no write access), quota: one line
        raise UserError(f"upload to {repo} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "log in with `hf auth login` or set HF_TOKEN") from None
    return str(getattr(commit, "commit_url", commit))


def validate_hub_folder(folder: Path) -> list[str]:
    """Problems of a hub submission folder (empty = ready): the files the organisers' runner needs, a script
    that compiles, predictions_2.json with every field, and a run whose family can generate."""
    folder = Path(folder)
    problems = []
    for f in ("submission_task2.py", "requirements.txt", "README.md", "predictions_2.json"):
        if not (folder / f).is_file():
            problems.append(f"{f}: missing")
    script = folder / "submission_task2.py"
    if script.is_file():
        try:
            compile(script.read_text(encoding="utf-8"), str(script), "exec")
        except (SyntaxError, UnicodeDecodeError) as e:
            problems.append(f"submission_task2.py: does not compile ({e})")
    preds = folder / "predictions_2.json"
    if preds.is_file():
        try:
            d = json.loads(preds.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"predictions_2.json: not valid JSON ({e})")
        else:
            missing = [k for k in PREDICTION_FIELDS if k not in d]
            missing += [f"submission_info.{k}" for k in SUBMISSION_INFO_FIELDS
                        if k not in (d.get("submission_info") or {})]
            if missing:
                problems.append(f"predictions_2.json: missing field(s) {', '.join(missing)}")
    runs = [p for p in (folder / "runs").glob("*/config.json")] if (folder / "runs").is_dir() else []
    if not runs:
        problems.append("runs/: no run (runs/<id>/config.json) to generate with")
    for d in ("harness", "models"):
        if not (folder / d / "__init__.py").is_file():
            problems.append(f"{d}/: the vendored package is missing")
    return problems
