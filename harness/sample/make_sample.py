"""Rebuild the shipped sample from a dev-set directory (official layout).

    python -m harness.sample.make_sample ../shared/data/imageclef2024/dev-256 [--out harness/sample] [--n 48]

Selection (deterministic, no seed needed): the first image (by id) of each kind of caption contradiction found by
`harness.captions.contradictions` ("no instruments" vs an instrument, "no polyps" vs a polyp, "no findings" vs a
finding), then round-robin over the strata of `harness.captions.image_strata` (sorted by name), taking images in
the order of sha256(image id) within each stratum - so every procedure and main finding type is present, rare
strata entirely, and every stratum with >= 2 images has >= 2 (the sample can be split by image). Images are resized
to `--size` px on the longer side (PIL bicubic, aspect kept) and saved as baseline JPEG quality 90; ALL caption rows
of the chosen images are copied verbatim (CSV order, CRLF, `;`, header `Prompt;Filename`).
"""

from __future__ import annotations

import argparse
import hashlib
from io import BytesIO
from collections import defaultdict
from pathlib import Path

from PIL import Image

from harness.captions import contradictions, image_strata
from harness.data import CSV_NAME, HEADER, IMAGES_DIR, load_devset
from harness.images import open_rgb
from harness.io import write_bytes

_KINDS = ('"no instruments"', '"no polyps"', '"no findings"')


def select_images(by_image: dict[str, list[str]], n: int) -> list[str]:
    chosen: list[str] = []
    for kind in _KINDS:
        for img in sorted(by_image):
            if img not in chosen and any(c.startswith(kind) for c in contradictions(by_image[img])):
                chosen.append(img)
                break
    strata: dict[str, list[str]] = defaultdict(list)
    for img in sorted(by_image, key=lambda i: hashlib.sha256(i.encode()).hexdigest()):
        strata[image_strata(by_image[img])].append(img)
    queues = {s: [i for i in v if i not in chosen] for s, v in sorted(strata.items())}
    while len(chosen) < n and any(queues.values()):
        for s in sorted(queues):
            if queues[s] and len(chosen) < n:
                chosen.append(queues[s].pop(0))
    return sorted(chosen)


def make_sample(src: Path, out: Path, n: int = 48, size: int = 64, quality: int = 90) -> list[str]:
    ds = load_devset(src)
    chosen = select_images(ds.captions_by_image(), n)
    keep = set(chosen)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for old in (out / IMAGES_DIR).glob("*.jpg"):
        if old.name not in keep:
            old.unlink()
    for name in chosen:
        img = open_rgb(ds.image_path(name))
        s = size / max(img.size)
        small = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
        buf = BytesIO()
        small.save(buf, format="JPEG", quality=quality)
        write_bytes(out / IMAGES_DIR / name, buf.getvalue())
    lines = [HEADER] + [f"{r.prompt};{r.filename}" for r in ds.rows if r.filename in keep]
    write_bytes(out / CSV_NAME, ("\r\n".join(lines) + "\r\n").encode("utf-8"))
    return chosen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="dev-set dir: prompt-gt.csv + images/")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    chosen = make_sample(args.src, args.out, n=args.n, size=args.size)
    total = sum(p.stat().st_size for p in (args.out / IMAGES_DIR).glob("*.jpg")) + (args.out / CSV_NAME).stat().st_size
    print(f"{len(chosen)} images -> {args.out} ({total / 1024:.0f} KB with {CSV_NAME})")


if __name__ == "__main__":
    main()
