"""`harness data fetch NAME --out DIR`: a hub-hosted (or locally saved) Hugging Face dataset converted to the
harness's dev-set layout, `prompt-gt.csv` (`Prompt;Filename`, CRLF) beside `images/<id>.<ext>`.

NAME is a challenge profile with a `[hub] train_dataset` (imageclef2025-task2 -> SimulaMet-HOST/Kvasir-VQA), a hub dataset
id, a folder written by `Dataset.save_to_disk`, or a parquet file. Image bytes are written verbatim (no re-encoding);
rows sharing an image id (Kvasir-VQA has several question/answer rows per image) share one file. The prompt of a row
is `--prompt-template` formatted with the row's columns (default: its prompt/caption/text column, else
"{question} {answer}").
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from harness.errors import UserError

_ID_COLUMNS = ("img_id", "image_id", "id", "filename", "file_name")
_PROMPT_COLUMNS = ("prompt", "caption", "text")


def _load(name: str, split: str | None):
    try:
        import datasets
    except ImportError:
        raise UserError("`harness data fetch` needs the hub extra: pip install 'medvqa-harness[hub]'") from None
    path = Path(name)
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path))
        elif path.exists():
            raise UserError("not a dataset: expected a `save_to_disk` folder or a .parquet file", path)
        else:
            ds = datasets.load_dataset(name)
    except UserError:
        raise
    except Exception as e:
        from harness.features import offline

        how = ("offline: not in the Hugging Face cache" if offline() or os.environ.get("HF_DATASETS_OFFLINE") == "1"
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise UserError(f"dataset {name!r} could not be loaded ({how}); on a machine with internet run "
                        f"`huggingface-cli download --repo-type dataset {name} --local-dir DIR` (or "
                        f"`datasets.load_dataset({name!r}).save_to_disk(DIR)`) and pass DIR as NAME") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = next(iter(ds))
        if split not in ds:
            raise UserError(f"--split {split!r}: the dataset has {', '.join(ds)}")
        ds = ds[split]
    elif split not in (None, getattr(ds, "split", None), str(getattr(ds, "split", None))):
        raise UserError(f"--split {split!r}: {name} holds a single split")
    return ds


def _ext(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Exception:
        return ""
    return {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}.get(fmt or "", "")


def fetch_dataset(name: str, out: Path, *, split: str | None = None, image_column: str = "image",
                  prompt_template: str | None = None, id_column: str | None = None) -> dict[str, Any]:
    from datasets import Image as ImageFeature

    from harness.challenges import load_profile, shipped_names
    from harness.io import write_text

    source = name
    if name in shipped_names():
        profile = load_profile(name)
        if not profile.hub.train_dataset:
            raise UserError(f"challenge {name} names no hub dataset (its real data is not published on the hub)")
        source = profile.hub.train_dataset
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError("exists and is not empty; choose an empty --out", out)
    ds = _load(source, split)
    cols = list(ds.column_names)
    if image_column not in cols:
        raise UserError(f"--image-column {image_column!r}: not a column of {source} (columns: {', '.join(cols)})")
    if prompt_template is None:
        have = [c for c in _PROMPT_COLUMNS if c in cols]
        if have:
            prompt_template = "{" + have[0] + "}"
        elif {"question", "answer"} <= set(cols):
            prompt_template = "{question} {answer}"
        else:
            raise UserError(f"{source}: no prompt/caption/text column and no question/answer pair; pass "
                            f"--prompt-template using the columns {', '.join(cols)}")
    id_column = id_column or next((c for c in _ID_COLUMNS if c in cols), None)
    ds = ds.cast_column(image_column, ImageFeature(decode=False))  # raw bytes: written verbatim

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    written: dict[str, str] = {}  # image id -> file name
    rows = ["Prompt;Filename"]
    try:
        (tmp / "images").mkdir()
        for r, row in enumerate(ds):
            try:
                prompt = prompt_template.format(**row)
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"--prompt-template {prompt_template!r}: {e} (columns: {', '.join(cols)})") from None
            if ";" in prompt or "\n" in prompt or "\r" in prompt or not prompt.strip():
                raise UserError(f"row {r}: prompt {prompt[:60]!r} is empty or holds ';' or a line break, which "
                                "prompt-gt.csv (no quoting) cannot carry")
            img = row[image_column] or {}
            data = img.get("bytes") or (Path(img["path"]).read_bytes() if img.get("path") else None)
            if not data:
                raise UserError(f"row {r}: no image in column {image_column!r}")
            key = str(row[id_column]) if id_column else f"{r:06d}"
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(key).stem if id_column in ("filename", "file_name") else key)
            if key not in written:
                ext = _ext(data)
                if not ext:
                    raise UserError(f"row {r}: the image in column {image_column!r} is not a readable image")
                written[key] = stem + ext
                (tmp / "images" / written[key]).write_bytes(data)
            rows.append(f"{prompt};{written[key]}")
        write_text(tmp / "prompt-gt.csv", "\r\n".join(rows) + "\r\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"source": source, "rows": len(rows) - 1, "images": len(written), "prompt_template": prompt_template,
            "out": str(out)}


def fetch_test_files(name: str, out: Path) -> dict[str, Any]:
    """`harness data fetch NAME --test`: the challenge's scoring material, as its organisers publish it - the real
    reference set (`test_dataset`, split `test_split`, images named by img_id, the id as prompt: scoring maps
    prompts to real images through the mapping, not through captions), the test-prompt file and the real mapping,
    beside it as prompts.json and real_mapping.json."""
    from harness.challenges import load_profile

    profile = load_profile(name)
    hub = profile.hub
    if not (hub.test_dataset and hub.prompts_file):
        raise UserError(f"challenge {profile.name} names no hub test repository ([hub] test_dataset, prompts_file)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError("exists and is not empty; choose an empty --out", out)
    files = {"prompts.json": hub.prompts_file}
    if hub.real_mapping_file:
        files["real_mapping.json"] = hub.real_mapping_file
    got = {}
    for local, remote in files.items():
        try:
            from huggingface_hub import hf_hub_download

            got[local] = Path(hf_hub_download(repo_id=hub.test_dataset, filename=remote, repo_type="dataset"))
        except Exception as e:
            raise UserError(f"{hub.test_dataset}/{remote} could not be downloaded ({type(e).__name__}); on a machine "
                            f"with internet run `huggingface-cli download --repo-type dataset {hub.test_dataset} "
                            f"{remote} --local-dir DIR` and copy it to {out / local}") from None
    res = {}
    if hub.test_split:
        res = fetch_dataset(hub.test_dataset, out / "real", split=hub.test_split, prompt_template="{img_id}",
                            id_column="img_id")
    for local, path in got.items():
        shutil.copyfile(path, out / local)
    return {"out": str(out), "files": sorted(files), "real": res}
