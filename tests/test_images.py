"""open_rgb / inspect_image: conversions, bomb guard (header only), undecodable files named in the error."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from bad_data import huge_png_header, jpeg_bytes, png_bytes
from PIL import Image

from harness.errors import UserError
from harness.images import inspect_image, open_rgb


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_rgb_jpeg_passes_through(tmp_path, sample_dir):
    p = sorted((sample_dir / "images").iterdir())[0]
    img = open_rgb(p)
    assert img.mode == "RGB" and max(img.size) == 64


def test_grey_becomes_rgb_with_equal_channels(tmp_path):
    p = _write(tmp_path, "g.png", png_bytes(Image.new("L", (8, 8), 77)))
    a = np.asarray(open_rgb(p))
    assert a.shape == (8, 8, 3) and (a == 77).all()


def test_rgba_is_composited_on_black(tmp_path):
    img = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    img.putpixel((0, 0), (200, 100, 50, 255))
    img.putpixel((1, 0), (200, 100, 50, 128))
    a = np.asarray(open_rgb(_write(tmp_path, "a.png", png_bytes(img))))
    assert tuple(a[0, 0]) == (200, 100, 50)  # opaque: unchanged
    assert tuple(a[3, 3]) == (0, 0, 0)  # transparent: black, not the hidden colour
    assert 90 <= a[0, 1, 0] <= 110  # half alpha: halfway to black


def test_palette_with_transparency_and_cmyk(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1
    buf = tmp_path / "p.png"
    pal.save(buf, transparency=1)
    assert (np.asarray(open_rgb(buf)) == 0).all()  # the transparent red index composites to black
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red in CMYK
    a = np.asarray(open_rgb(_write(tmp_path, "c.jpg", jpeg_bytes(cmyk, quality=100))))
    assert a[..., 0].mean() > 200 and a[..., 1].mean() < 60


def test_16bit_grey_is_rescaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    a = np.asarray(open_rgb(p))
    assert 120 <= a.mean() <= 135  # mid grey, not saturated white


@pytest.mark.parametrize("name,data,match", [
    ("empty.jpg", b"", "empty"),
    ("junk.jpg", b"not an image at all", "not a readable image"),
])
def test_undecodable_names_file(tmp_path, name, data, match):
    p = _write(tmp_path, name, data)
    with pytest.raises(UserError, match=match) as e:
        open_rgb(p)
    assert str(e.value).startswith(str(p))


def test_truncated_jpeg_fails_on_open_and_on_inspect(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    data = jpeg_bytes(img, quality=90)
    p = _write(tmp_path, "t.jpg", data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match="does not decode"):
        open_rgb(p)
    info = inspect_image(p)  # draft-mode decode must still notice the missing data
    assert not info.ok and "truncated" in info.problem and (info.width, info.height) == (400, 300)


def test_bomb_guard_reads_header_only(tmp_path):
    p = _write(tmp_path, "huge.png", huge_png_header(20000, 20000))
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="decompression-bomb") as e:
        open_rgb(p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert str(p) in str(e.value)
    assert time.perf_counter() - t0 < 1.0 and peak < 5_000_000  # 1.2 GB of pixels never allocated
    info = inspect_image(p)
    assert not info.ok and "decompression-bomb" in info.problem


def test_bomb_limit_is_configurable(tmp_path):
    p = _write(tmp_path, "b.png", huge_png_header(3000, 3000))  # 9 MP: below PIL's limit, above ours here
    with pytest.raises(UserError, match=r"3000x3000 = 9 MP, above the 5 MP limit"):
        open_rgb(p, max_pixels=5_000_000)
    # under the default limit the header is accepted and the (empty) pixel data then fails to decode
    with pytest.raises(UserError, match="does not decode"):
        open_rgb(p)


def test_inspect_reports_format_mismatch_and_mode(tmp_path):
    p = _write(tmp_path, "x.jpg", png_bytes(Image.new("RGBA", (40, 40))))
    info = inspect_image(p)
    assert info.ok and info.format == "PNG" and info.mode == "RGBA" and not info.is_rgb
    assert info.format_mismatch == "PNG data in a .jpg file"
    good = inspect_image(_write(tmp_path, "y.jpeg", jpeg_bytes(Image.new("RGB", (40, 30)))))
    assert good.ok and good.format_mismatch is None and (good.width, good.height) == (40, 30)


@pytest.mark.parametrize("pil_limit", ["default", None])
def test_header_guard_on_bytes_is_silent_and_cheap(monkeypatch, pil_limit):
    """A 12000x12000 PNG (144 MP: past PIL's warning limit, below its error limit) from a zip entry: our limit is
    checked on the header, with no raw DecompressionBombWarning and no pixel buffer, even when a library has switched
    PIL's own limit off (MAX_IMAGE_PIXELS = None)."""
    import warnings

    from harness.images import open_header

    if pil_limit is None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = huge_png_header(12000, 12000)
    tracemalloc.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match=r"12000x12000 = 144 MP, above the 16.8 MP limit") as e:
            open_header(data, max_pixels=4096 * 4096, name="task1/00001.png")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert str(e.value).startswith("task1/00001.png: ")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert peak < 5_000_000  # the 432 MB of pixels are never allocated


def test_degenerate_reason():
    from harness.images import degenerate_reason

    assert "all black" in degenerate_reason(np.zeros((8, 8, 3), np.uint8))
    # what a NaN tensor becomes once cast to uint8, the way the model families quantize
    with np.errstate(invalid="ignore"):
        nan_img = (np.full((8, 8, 3), np.nan) * 255).round().astype(np.uint8)
    assert degenerate_reason(nan_img) is not None
    assert "(7, 8, 9)" in degenerate_reason(np.broadcast_to(np.array([7, 8, 9], np.uint8), (8, 8, 3)))
    img = np.zeros((8, 8, 3), np.uint8)
    img[0, 0, 0] = 1  # one pixel of difference is a picture (a dark endoscopy corner is fine)
    assert degenerate_reason(img) is None
