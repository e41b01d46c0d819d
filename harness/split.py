"""Train/validation split of the dev set, by image.

Every caption row of an image goes to the side of its image, so no validation image is ever seen in training under
another caption (a split by row would leak: each image has 7-14 captions). The split is stratified by
`captions.image_strata` ("procedure/main finding"): every stratum with >= 2 images gets at least one image on each
side (as far as the validation budget allows), the rest is allocated in proportion to stratum size by largest
remainder. Within a stratum the images are shuffled by a generator seeded from (seed, stratum name), so adding or
removing images in one stratum does not reshuffle the others.

SPLIT.json is canonical JSON (sorted keys and ids): the same CSV, images and seed give a byte-identical file.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError
from harness.io import read_json, sha256_file, write_json

SPLIT_FORMAT = "harness-split/1"
DEFAULT_VAL_IMAGES = 200  # the seed paper's 1,800 / 200


@dataclass
class Split:
    train: list[str]
    val: list[str]
    seed: int
    csv_sha256: str
    sha256: str  # of the split file itself
    path: Path | None = None

    def side(self, name: str) -> list[str]:
        if name not in ("train", "val"):
            raise UserError(f"split side must be 'train' or 'val', not {name!r}")
        return self.train if name == "train" else self.val


def _quotas(sizes: dict[str, int], n_val: int) -> dict[str, int]:
    """Validation images per stratum: >= 1 and <= size-1 for strata with >= 2 images, proportional otherwise."""
    total = sum(sizes.values())
    lo = {s: 1 if n >= 2 else 0 for s, n in sizes.items()}
    hi = {s: n - 1 if n >= 2 else 0 for s, n in sizes.items()}
    ideal = {s: n_val * n / total for s, n in sizes.items()}
    q = {s: min(max(int(ideal[s]), lo[s]), hi[s]) for s in sizes}
    # Largest remainder for what is left (ties broken by name, so the result is deterministic).
    while sum(q.values()) < n_val:
        room = [s for s in sizes if q[s] < hi[s]]
        s = max(room, key=lambda s: (ideal[s] - q[s], s))
        q[s] += 1
    # Over budget only because of the floors of 1: take back from strata above their floor first (keeping every
    # stratum on both sides); only when that is impossible, from the most over-allocated (smallest) strata.
    while sum(q.values()) > n_val:
        above = [s for s in sizes if q[s] > lo[s]] or [s for s in sizes if q[s] > 0]
        s = max(above, key=lambda s: (q[s] - ideal[s], s))
        q[s] -= 1
    return q


def make_split(data_dir: str | Path, val_images: int = DEFAULT_VAL_IMAGES, seed: int = 0) -> dict:
    """The SPLIT.json content for a dev-set directory (see module docstring)."""
    from harness.captions import image_strata
    from harness.data import load_devset

    ds = load_devset(data_dir)
    by_image = ds.captions_by_image()
    images = sorted(by_image)
    strata: dict[str, list[str]] = defaultdict(list)
    for img in images:
        strata[image_strata(by_image[img])].append(img)
    max_val = sum(max(len(v) - 1, 0) for v in strata.values())
    if val_images < 1:
        raise UserError(f"--val-images must be >= 1 (got {val_images})")
    if val_images > max_val:
        raise UserError(f"--val-images {val_images} is more than possible: {len(images)} images in {len(strata)} "
                        f"strata, each keeping >= 1 training image, allow at most {max_val}", ds.csv_path)
    quotas = _quotas({s: len(v) for s, v in strata.items()}, val_images)
    train: list[str] = []
    val: list[str] = []
    per_stratum: dict[str, dict[str, int]] = {}
    for name in sorted(strata):
        ids = list(strata[name])  # already sorted
        random.Random(f"{seed}:{name}").shuffle(ids)  # str seeds hash via sha512: stable across processes
        k = quotas[name]
        val += ids[:k]
        train += ids[k:]
        per_stratum[name] = {"train": len(ids) - k, "val": k}
    rows = Counter(r.filename for r in ds.rows)
    return {
        "format": SPLIT_FORMAT,
        "seed": seed,
        "val_images_requested": val_images,
        "csv_sha256": ds.csv_sha256,
        "counts": {
            "train": {"images": len(train), "rows": sum(rows[i] for i in train)},
            "val": {"images": len(val), "rows": sum(rows[i] for i in val)},
        },
        "strata": per_stratum,
        "train": sorted(train),
        "val": sorted(val),
    }


def write_split(data_dir: str | Path, out: str | Path, val_images: int = DEFAULT_VAL_IMAGES, seed: int = 0) -> dict:
    content = make_split(data_dir, val_images=val_images, seed=seed)
    write_json(out, content)
    return content


def load_split(path: str | Path) -> Split:
    """Read and validate SPLIT.json: malformed content or an image on both sides is a UserError."""
    path = Path(path)
    d = read_json(path)
    if not isinstance(d, dict):
        raise UserError("not a split file (expected a JSON object)", path)
    missing = [k for k in ("train", "val", "seed", "csv_sha256") if k not in d]
    if missing:
        raise UserError(f"not a split file: missing key(s) {', '.join(missing)}", path)
    if d.get("format", SPLIT_FORMAT) != SPLIT_FORMAT:
        raise UserError(f"unknown split format {d.get('format')!r} (expected {SPLIT_FORMAT!r})", path)
    for side in ("train", "val"):
        ids = d[side]
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise UserError(f"'{side}' must be a list of image filenames", path)
        dup = [i for i, n in Counter(ids).items() if n > 1]
        if dup:
            raise UserError(f"image {dup[0]!r} is listed twice in '{side}'", path)
    overlap = sorted(set(d["train"]) & set(d["val"]))
    if overlap:
        raise UserError(f"image {overlap[0]!r} is on both sides ({len(overlap)} overlapping images): the split leaks",
                        path)
    if not d["train"]:
        raise UserError("'train' is empty", path)
    if not isinstance(d["seed"], int) or not isinstance(d["csv_sha256"], str):
        raise UserError("'seed' must be an integer and 'csv_sha256' a string", path)
    return Split(train=list(d["train"]), val=list(d["val"]), seed=d["seed"], csv_sha256=d["csv_sha256"],
                 sha256=sha256_file(path), path=path)


def check_split_matches(split: Split, devset) -> None:
    """The split must come from this very prompt-gt.csv, and name only images it has."""
    where = split.path or "split"
    if split.csv_sha256 != devset.csv_sha256:
        raise UserError(f"split was made from a different prompt-gt.csv (sha256 {split.csv_sha256[:12]}..., this "
                        f"one is {devset.csv_sha256[:12]}...); run `harness split {devset.root}` again", where)
    known = set(devset.images())
    unknown = [i for i in split.train + split.val if i not in known]
    if unknown:
        raise UserError(f"split names {len(unknown)} image(s) not in {devset.csv_path}, e.g. {unknown[0]!r}", where)
