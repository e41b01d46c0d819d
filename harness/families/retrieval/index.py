"""`harness train retrieval`: index the training side of a split by the attributes its captions ask for.

The index (RUN/index.json) lists every training image with its sha256 and every caption of it with the attribute
signature `harness.captions.extract_attributes` gives it. Generation (harness/families/retrieval/generate.py) then
answers a prompt with a training image whose caption has the prompt's signature. No model, no torch: seconds.

A signature is the set of `attribute=value` pairs over `harness.captions.ATTRIBUTES` except `unknown_terms` (words
outside the caption vocabulary are not something a caption asks for): two captions with equal signatures ask for
the same numbers, sizes, Paris classes, colours, locations, instruments, findings, procedure and negations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError

INDEX_JSON = "index.json"
INDEX_FORMAT = "harness-retrieval-index/1"
# extract_attributes keys that are not asked-for attributes (harness.captions: words outside the vocabulary)
NOT_ATTRIBUTES = ("unknown_terms",)
DEFAULT_SIZE = 256  # the dev-256 images' side; the training transform's default resolution (DatasetConfig)


@dataclass
class RetrievalConfig:
    data_dir: str = ""
    split_path: str = ""
    size: int = DEFAULT_SIZE  # generated side in pixels (harness generate --height/--width override it)
    fit: str = "pad"  # the training transform's fit (harness.dataset.DatasetConfig default): pad | crop

    def validate(self) -> None:
        if not self.data_dir or not self.split_path:
            raise UserError("the retrieval index needs --split and --data")
        if not 8 <= self.size <= 4096:
            raise UserError(f"--size must be in [8, 4096], got {self.size}")
        if self.fit not in ("pad", "crop"):
            raise UserError(f"--fit must be 'pad' or 'crop', got {self.fit!r}")


def signature(text: str) -> tuple[str, ...]:
    """Sorted `attribute=value` pairs a caption or prompt asks for (see module docstring)."""
    from harness.captions import extract_attributes

    attrs = extract_attributes(text)
    return tuple(sorted(f"{k}={v}" for k, vals in attrs.items() if k not in NOT_ATTRIBUTES for v in vals))


def load_data(data_dir: Path, split_path: Path):
    """(dev set, split), the split checked to come from this prompt-gt.csv."""
    from harness.data import load_devset
    from harness.split import check_split_matches, load_split

    devset = load_devset(data_dir)
    split = load_split(split_path)
    check_split_matches(split, devset)
    return devset, split


def data_hashes(devset, split, n_items: int) -> dict[str, Any]:
    """What a run records in data.json (the fields `harness.dataset.load_training_data` records for trainers)."""
    return {"csv_sha256": devset.csv_sha256, "split_sha256": split.sha256, "side": "train",
            "n_images": len(split.train), "n_items": n_items, "split_seed": split.seed}


def build_index(data_dir: Path, split_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(index document, data hashes) for the training side of the split."""
    from harness.io import sha256_file
    from harness.progress import progress

    devset, split = load_data(data_dir, split_path)
    ids = sorted(split.train)
    missing = [i for i in ids if not devset.image_path(i).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the train side are missing, e.g. {missing[0]!r}",
                        devset.images_dir)
    by_image = devset.captions_by_image()
    images = []
    with progress() as bar:
        task = bar.add_task("index", total=len(ids))
        for name in ids:
            caps = list(dict.fromkeys(by_image.get(name, [])))
            images.append({"image": name, "sha256": sha256_file(devset.image_path(name)),
                           "captions": [{"caption": c, "signature": list(signature(c))} for c in caps]})
            bar.advance(task)
    n_captions = sum(len(e["captions"]) for e in images)
    doc = {"format": INDEX_FORMAT, "side": "train", "n_images": len(images), "n_captions": n_captions,
           "attributes_from": "harness.captions.extract_attributes", "images": images}
    return doc, data_hashes(devset, split, n_captions)


def train(cfg: RetrievalConfig, run_id: str | None = None):
    """Create the run: config.json (data_dir, split_path: `--prompts split:val` and `score --real val` read them),
    data.json, and RUN/index.json with its sha256 in config.json."""
    from harness.config import to_dict
    from harness.io import dumps_json, sha256_bytes, write_text
    from harness.runs import create_run

    cfg.validate()
    t0 = time.perf_counter()
    doc, hashes = build_index(Path(cfg.data_dir), Path(cfg.split_path))
    text = dumps_json(doc)
    index_sha = sha256_bytes(text.encode("utf-8"))
    hashes["index_sha256"] = index_sha
    n_sigs = len({tuple(c["signature"]) for e in doc["images"] for c in e["captions"]})
    run = create_run("retrieval", {**to_dict(cfg), "index": INDEX_JSON, "index_sha256": index_sha},
                     hashes, run_id=run_id)
    write_text(run.dir / INDEX_JSON, text)
    seconds = time.perf_counter() - t0
    run.log(f"retrieval index: {doc['n_images']} training images, {doc['n_captions']} captions, {n_sigs} distinct "
            f"attribute signatures, index sha256 {index_sha[:12]} ({seconds:.1f}s)")
    return run, {"n_images": doc["n_images"], "n_captions": doc["n_captions"], "n_signatures": n_sigs,
                 "seconds": seconds}


def load_index(run) -> dict[str, Any]:
    """RUN/index.json, checked against the sha256 config.json recorded."""
    from harness.io import read_json, sha256_file

    path = run.dir / INDEX_JSON
    if not path.is_file():
        raise UserError(f"retrieval run without its {INDEX_JSON}; run `harness train retrieval` again", run.dir)
    want = run.config(resolve=False).get("index_sha256")
    if want and sha256_file(path) != want:
        raise UserError(f"{INDEX_JSON} was changed after indexing (sha256 differs from config.json); run "
                        "`harness train retrieval` again", path)
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise UserError(f"not a retrieval index (format {INDEX_FORMAT})", path)
    return doc
