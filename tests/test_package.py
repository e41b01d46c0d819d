"""`harness package` / `harness validate`: a valid zip round-trips; every kind of bad zip is refused, exit 2."""

from __future__ import annotations

import io
import stat
import zipfile

import numpy as np
import pytest
from bad_data import huge_png_header
from PIL import Image

from harness.generate import TestPatternGenerator, generate_images
from harness.package import validate_zip
from harness.runs import create_run

PROMPTS = [f"Generate an image with {n} findings." for n in range(1, 6)]


@pytest.fixture
def packaged(tmp_path, run_cli):
    run = create_run("test-pattern", {"size": 32})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    generate_images(TestPatternGenerator(32), PROMPTS, run.images_dir)
    out = tmp_path / "subs"
    code, stdout, err = run_cli("package", run.dir, "--prompts", prompts, "--team", "team-a", "--out", out)
    assert code == 0, err
    return run, prompts, out / "team-a_clef2024_medvqa.zip", stdout


def _png(mode="RGB", size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="JPEG")
    return buf.getvalue()


def _rewrite(src, dst, drop=(), add=(), replace=None):
    """Copy zip `src` to `dst`, dropping names, replacing contents and adding raw (ZipInfo|name, bytes) entries."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            zout.writestr(info, replace.get(info.filename, zin.read(info.filename)))
        for name, data in add:
            zout.writestr(name, data)
    return dst


def test_package_writes_expected_layout_and_validates(packaged, run_cli):
    run, prompts, zpath, stdout = packaged
    assert zpath.is_file()
    names = zipfile.ZipFile(zpath).namelist()
    assert names == [f"task1/{i:05d}.png" for i in range(1, 6)] + ["task1/manifest.csv"]
    assert "sha256 " in stdout
    code, out, err = run_cli("validate", zpath, "--prompts", prompts)
    assert code == 0, err
    assert out.strip().split()[-1] == stdout.strip().split()[-1]  # same sha256 printed


def test_package_is_byte_identical_on_rerun(packaged, run_cli, tmp_path):
    run, prompts, zpath, _ = packaged
    first = zpath.read_bytes()
    code, _, _ = run_cli("package", run.dir, "--prompts", prompts, "--team", "team-a", "--out", zpath.parent)
    assert code == 0 and zpath.read_bytes() == first


def test_package_refuses_incomplete_run_and_leaves_nothing(tmp_path, run_cli):
    run = create_run("test-pattern", {"size": 32})
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    generate_images(TestPatternGenerator(32), PROMPTS, run.images_dir)
    (run.images_dir / "00003.png").unlink()
    out = tmp_path / "subs"
    code, _, err = run_cli("package", run.dir, "--prompts", prompts, "--team", "t", "--out", out)
    assert code == 2 and "00003.png" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_package_count_mismatch(tmp_path, run_cli):
    run = create_run("test-pattern", {"size": 32})
    generate_images(TestPatternGenerator(32), PROMPTS, run.images_dir)
    more = tmp_path / "more.txt"
    more.write_text("\n".join(PROMPTS + ["Generate an image with no polyps."]) + "\n", encoding="utf-8")
    code, _, err = run_cli("package", run.dir, "--prompts", more, "--team", "t", "--out", tmp_path / "subs")
    assert code == 2 and "5 rows for 6 prompts" in err


def test_bad_team_name(packaged, run_cli, tmp_path):
    run, prompts, _, _ = packaged
    code, _, err = run_cli("package", run.dir, "--prompts", prompts, "--team", "../evil", "--out", tmp_path)
    assert code == 2 and "--team" in err


def _symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


BAD_ZIPS = {
    "dotdot entry": dict(add=[("task1/../../evil.png", _png())]),
    "absolute entry": dict(add=[("/etc/evil.png", _png())]),
    "symlink entry": dict(add=[(_symlink_entry("task1/link.png"), b"/etc/passwd")]),
    "duplicate entry": dict(add=[("task1/00001.png", _png())]),
    "missing image": dict(drop=["task1/00005.png"]),
    "extra image": dict(add=[("task1/00006.png", _png())]),
    "subfolder": dict(add=[("task1/sub/00001.png", _png())]),
    "outside task1": dict(add=[("other/00001.png", _png())]),
    "uppercase extension": dict(add=[("task1/00006.PNG", _png())]),
    "RGBA image": dict(replace={"task1/00002.png": _png("RGBA")}),
    "grey image": dict(replace={"task1/00002.png": _png("L")}),
    "mixed sizes": dict(replace={"task1/00002.png": _png(size=(48, 32))}),
    "truncated image": dict(replace={"task1/00002.png": _png()[:40]}),
    "jpeg named png": dict(replace={"task1/00002.png": _jpeg()}),
    "missing manifest": dict(drop=["task1/manifest.csv"]),
    "manifest mismatch": dict(replace={"task1/manifest.csv": b"index,prompt,filename,seed,model\n1,x,00001.png,0,m\n"}),
}


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", sorted(BAD_ZIPS))
def test_validate_rejects_bad_zip(case, packaged, run_cli, tmp_path):
    _, prompts, zpath, _ = packaged
    bad = _rewrite(zpath, tmp_path / "bad.zip", **BAD_ZIPS[case])
    report = validate_zip(bad, [*PROMPTS])
    assert not report.ok, case
    code, out, err = run_cli("validate", bad, "--prompts", prompts)
    assert code == 2, (case, err)
    assert "Traceback" not in err


def test_validate_not_a_zip(tmp_path, run_cli):
    p = tmp_path / "x.zip"
    p.write_bytes(b"not a zip")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n", encoding="utf-8")
    code, _, err = run_cli("validate", p, "--prompts", prompts)
    assert code == 2 and "not a readable zip" in err


def _noise_png(seed: int, size=(32, 32)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _png_of(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def _content_cases():
    return {
        "all black (NaN output)": ({f"task1/{i:05d}.png": _png() for i in range(1, 6)}, "constant image (all black)"),
        "one constant grey image": ({"task1/00003.png": _png_of((90, 90, 90))}, "every pixel (90, 90, 90)"),
        "every image identical": ({f"task1/{i:05d}.png": _noise_png(0) for i in range(1, 6)},
                                  "all 5 images are identical"),
        "9000x9000 images": ({f"task1/{i:05d}.png": huge_png_header(9000, 9000) for i in range(1, 6)},
                             "9000x9000 = 81 MP, above the 16.8 MP limit"),
        "12000x12000 image": ({"task1/00001.png": huge_png_header(12000, 12000)}, "12000x12000 = 144 MP"),
    }


@pytest.mark.parametrize("case", sorted(_content_cases()))
def test_validate_flags_degenerate_and_oversized_content(case, packaged, run_cli, tmp_path):
    """Names, count and manifest are right; the pixels are not a submission. No raw PIL warning, nothing decoded
    past the header for the oversized ones."""
    import warnings

    _, prompts, zpath, _ = packaged
    replace, expected = _content_cases()[case]
    bad = _rewrite(zpath, tmp_path / "bad.zip", replace=replace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = validate_zip(bad, PROMPTS)
        code, out, err = run_cli("validate", bad, "--prompts", prompts)
    assert not report.ok and any(expected in p for p in report.problems), report.problems
    assert code == 2 and expected in out + err and "Traceback" not in err
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_package_refuses_black_images_and_writes_nothing(tmp_path, run_cli):
    """Images with the right metadata but constant pixels (what `--guidance nan` used to write) do not package."""
    from harness.generate import _png_meta, encode_png, read_manifest

    run = create_run("test-pattern", {"size": 32})
    generate_images(TestPatternGenerator(32), PROMPTS, run.images_dir)
    for row in read_manifest(run.images_dir / "manifest.csv"):
        meta = _png_meta(int(row["index"]), row["prompt"], int(row["seed"]), row["model"])
        (run.images_dir / row["filename"]).write_bytes(encode_png(np.zeros((32, 32, 3), np.uint8), meta))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "subs"
    code, _, err = run_cli("package", run.dir, "--prompts", prompts, "--team", "t", "--out", out)
    assert code == 2 and "constant image (all black)" in err
    assert not out.exists() or not any(out.iterdir())
