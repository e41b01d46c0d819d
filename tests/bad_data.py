"""Helpers that write bad (and good) inputs into a tmp dir; reused by other areas' tests.

`good_devset(tmp)` copies a few images of the shipped sample with all their caption rows; every `bad_*` function
breaks one thing in such a copy (or writes a bad prompt file) and returns the path to hand to the command. All
images are crafted in memory with PIL; the 20000x20000 PNG is only a header (no pixels are allocated).
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

from PIL import Image

CRLF = "\r\n"
HEADER = "Prompt;Filename"


def _sample_rows(n_images: int) -> tuple[list[tuple[str, str]], list[str]]:
    from harness.data import load_devset
    from harness.sample import sample_dir

    ds = load_devset(sample_dir())
    names = ds.images()[:n_images]
    keep = set(names)
    return [(r.prompt, r.filename) for r in ds.rows if r.filename in keep], names


def write_csv(root: Path, rows: list[tuple[str, str]] | list[str], header: str = HEADER, sep: str = ";",
              newline: str = CRLF, bom: bool = False, encoding: str = "utf-8") -> Path:
    lines = [header] + [r if isinstance(r, str) else sep.join(r) for r in rows]
    data = (newline.join(lines) + newline).encode(encoding)
    path = root / "prompt-gt.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def good_devset(tmp: Path, n_images: int = 4, name: str = "data") -> Path:
    """A valid dev-set dir: the first `n_images` sample images (byte copies) with all their rows."""
    from harness.sample import sample_dir

    root = tmp / name
    (root / "images").mkdir(parents=True)
    rows, names = _sample_rows(n_images)
    for n in names:
        shutil.copyfile(sample_dir() / "images" / n, root / "images" / n)
    write_csv(root, rows)
    return root


def rows_of(root: Path) -> list[tuple[str, str]]:
    text = (root / "prompt-gt.csv").read_bytes().decode("utf-8-sig")
    return [tuple(line.split(";")) for line in text.replace("\r\n", "\n").split("\n")[1:] if line]  # type: ignore


def first_image(root: Path) -> Path:
    return sorted((root / "images").iterdir())[0]


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _add_image(root: Path, name: str, data: bytes) -> Path:
    path = root / "images" / name
    path.write_bytes(data)
    rows = rows_of(root) + [("Generate an image containing a polyp.", name)]
    write_csv(root, rows)
    return path


def _photo(size=(64, 48), mode="RGB") -> Image.Image:
    """A small non-constant image (a gradient), so JPEG streams have real content to truncate."""
    w, h = size
    img = Image.new("RGB", size)
    img.putdata([((x * 255) // max(1, w - 1), (y * 255) // max(1, h - 1), 128) for y in range(h) for x in range(w)])
    return img.convert(mode) if mode != "RGB" else img


# --------------------------------------------------------------------------------- CSV-level (exit 2: unreadable)


def bad_comma_separator(tmp: Path) -> Path:
    root = good_devset(tmp)
    write_csv(root, rows_of(root), header="Prompt,Filename", sep=",")
    return root


def bad_missing_header(tmp: Path) -> Path:
    root = good_devset(tmp)
    rows = rows_of(root)
    (root / "prompt-gt.csv").write_bytes((CRLF.join(";".join(r) for r in rows) + CRLF).encode())
    return root


def bad_empty_csv(tmp: Path) -> Path:
    root = good_devset(tmp)
    (root / "prompt-gt.csv").write_bytes(b"")
    return root


def bad_non_utf8_csv(tmp: Path) -> Path:
    root = good_devset(tmp)
    rows = rows_of(root)
    rows[2] = ("Generate an image with the colour caf\xe9.", rows[2][1])
    write_csv(root, rows, encoding="latin-1")
    return root


def bad_missing_csv(tmp: Path) -> Path:
    root = good_devset(tmp)
    (root / "prompt-gt.csv").unlink()
    return root


# ------------------------------------------------------------------------------ row-level (reported by the checker)


def bad_extra_fields(tmp: Path) -> Path:
    root = good_devset(tmp)
    rows = rows_of(root)
    rows.insert(3, ("Generate an image; with a semicolon", "x", rows[0][1]))  # type: ignore[arg-type]
    write_csv(root, rows)
    return root


def bad_duplicate_row(tmp: Path) -> Path:
    root = good_devset(tmp)
    rows = rows_of(root)
    write_csv(root, rows + [rows[0]])
    return root


def bad_dotdot_filename(tmp: Path) -> Path:
    root = good_devset(tmp)
    write_csv(root, rows_of(root) + [("Generate an image containing a polyp.", "../escape.jpg")])
    return root


def with_bom(tmp: Path) -> Path:
    """Not an error: a UTF-8 BOM is accepted and reported."""
    root = good_devset(tmp)
    write_csv(root, rows_of(root), bom=True)
    return root


def with_lf(tmp: Path) -> Path:
    root = good_devset(tmp)
    write_csv(root, rows_of(root), newline="\n")
    return root


# ---------------------------------------------------------------------------------------------- image problems


def bad_missing_image(tmp: Path) -> Path:
    root = good_devset(tmp)
    first_image(root).unlink()
    return root


def bad_zero_byte_image(tmp: Path) -> Path:
    root = good_devset(tmp)
    first_image(root).write_bytes(b"")
    return root


def bad_truncated_jpeg(tmp: Path) -> Path:
    root = good_devset(tmp)
    data = jpeg_bytes(_photo((256, 200)), quality=95)
    first_image(root).write_bytes(data[: len(data) // 2])
    return root


def bad_png_as_jpg(tmp: Path) -> Path:
    root = good_devset(tmp)
    first_image(root).write_bytes(png_bytes(_photo()))
    return root


def bad_rgba_png(tmp: Path) -> Path:
    root = good_devset(tmp)
    img = _photo().convert("RGBA")
    img.putalpha(128)
    _add_image(root, "rgba.png", png_bytes(img))
    return root


def bad_grey_jpeg(tmp: Path) -> Path:
    root = good_devset(tmp)
    first_image(root).write_bytes(jpeg_bytes(_photo(mode="L")))
    return root


def bad_cmyk_jpeg(tmp: Path) -> Path:
    root = good_devset(tmp)
    first_image(root).write_bytes(jpeg_bytes(_photo(mode="CMYK")))
    return root


def bad_one_pixel(tmp: Path) -> Path:
    root = good_devset(tmp)
    first_image(root).write_bytes(jpeg_bytes(Image.new("RGB", (1, 1), (200, 50, 50))))
    return root


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A syntactically valid PNG header (signature + IHDR + empty IDAT + IEND) claiming width x height RGB pixels.
    Only the header is written: opening it must not allocate the pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_huge_png(tmp: Path) -> Path:
    root = good_devset(tmp)
    _add_image(root, "huge.png", huge_png_header())
    return root


def bad_uncaptioned_image(tmp: Path) -> Path:
    root = good_devset(tmp)
    (root / "images" / "stray.jpg").write_bytes(jpeg_bytes(_photo()))
    return root


def bad_contradiction(tmp: Path) -> Path:
    root = good_devset(tmp)
    from harness.captions import contradictions

    rows = rows_of(root)
    by: dict[str, list[str]] = {}
    for p, f in rows:
        by.setdefault(f, []).append(p)
    # an image that says "no instruments" and is not already contradictory gets an instrument location
    name = next(f for f, caps in by.items() if "Generate an image with no instruments." in caps
                and not contradictions(caps))
    write_csv(root, rows + [("Generate an image with an an instrument located in the center.", name)])
    return root


# -------------------------------------------------------------------------------------------------- prompt files


def prompt_file(tmp: Path, lines: list[str], name: str = "prompts.txt", newline: str = "\n") -> Path:
    path = tmp / name
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


def bad_non_utf8_prompts(tmp: Path) -> Path:
    path = tmp / "latin1.txt"
    path.write_bytes(b"Generate an image containing a polyp.\nGenerate a caf\xe9 polyp.\n")
    return path


def bad_empty_prompts(tmp: Path) -> Path:
    path = tmp / "empty.txt"
    path.write_bytes(b"")
    return path


def bad_blank_only_prompts(tmp: Path) -> Path:
    path = tmp / "blank.txt"
    path.write_bytes(b"\n  \r\n\n")
    return path


# (function, exit code of `harness data check`, problem kind it must report or None)
DATA_CASES = [
    (bad_comma_separator, 2, None),
    (bad_missing_header, 2, None),
    (bad_empty_csv, 2, None),
    (bad_non_utf8_csv, 2, None),
    (bad_missing_csv, 2, None),
    (bad_extra_fields, 0, "fields"),
    (bad_duplicate_row, 0, "duplicate"),
    (bad_dotdot_filename, 0, "bad_filename"),
    (bad_missing_image, 0, "missing_image"),
    (bad_zero_byte_image, 0, "undecodable"),
    (bad_truncated_jpeg, 0, "undecodable"),
    (bad_png_as_jpg, 0, "format_mismatch"),
    (bad_rgba_png, 0, "not_rgb"),
    (bad_grey_jpeg, 0, "not_rgb"),
    (bad_cmyk_jpeg, 0, "not_rgb"),
    (bad_one_pixel, 0, "tiny_image"),
    (bad_huge_png, 0, "undecodable"),
    (bad_uncaptioned_image, 0, "uncaptioned"),
    (bad_contradiction, 0, "contradiction"),
]
