"""harness.io: atomic writes leave no partial file, and kept files get the umask's mode like any other file."""

from __future__ import annotations

import os
import stat

import pytest

from harness.io import atomic_path, remove_stale_temps, write_bytes, write_json, write_text


@pytest.fixture
def umask():
    """Set the (process-wide) umask for one test; the old one is restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027], ids=oct)
def test_written_files_have_the_mode_a_plain_open_gives(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    want = 0o666 & ~mask
    assert _mode(plain) == want
    for write, name, data in ((write_bytes, "a.bin", b"x"), (write_text, "b.txt", "x"), (write_json, "c.json", {})):
        p = write(tmp_path / name, data)
        assert _mode(p) == want, (name, oct(_mode(p)))
    with atomic_path(tmp_path / "d.png") as tmp:
        assert _mode(tmp) == want  # also what a library writing into the temp path (PIL, torch.save) keeps
        tmp.write_bytes(b"png")
    assert _mode(tmp_path / "d.png") == want


def test_rewriting_a_file_gives_it_the_umask_mode_too(tmp_path, umask):
    umask(0o022)
    p = tmp_path / "metrics.json"
    p.write_text("{}")
    os.chmod(p, 0o600)  # e.g. written by a release whose temp files were 0600
    write_json(p, {"a": 1})
    assert _mode(p) == 0o644 and p.read_text() == '{\n  "a": 1\n}\n'


def test_a_failed_write_leaves_neither_the_file_nor_a_temp(tmp_path):
    p = tmp_path / "sub" / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not p.exists() and list(p.parent.iterdir()) == []
    write_bytes(p, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"new but half")
            raise RuntimeError("killed")
    assert p.read_bytes() == b"old" and [q.name for q in p.parent.iterdir()] == ["out.bin"]


def test_temp_names_are_unique_and_stale_ones_are_removable(tmp_path):
    with atomic_path(tmp_path / "x.txt") as t1, atomic_path(tmp_path / "x.txt") as t2:
        assert t1 != t2 and t1.parent == tmp_path and t1.name.startswith(".x.txt.tmp-")
        t1.write_text("1")
        t2.write_text("2")
    assert (tmp_path / "x.txt").read_text() == "1"  # the outer context exits last and wins
    (tmp_path / ".y.txt.tmp-deadbeef").write_text("left by a SIGKILL")
    assert remove_stale_temps(tmp_path) == 1 and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_dir_is_all_or_nothing(tmp_path):
    import pytest

    from harness.io import atomic_dir

    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.json").write_text("{}")
            raise RuntimeError("killed half way")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a.json").write_text("{}")
    with atomic_dir(out) as tmp:  # replaces a previous folder whole
        (tmp / "b.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["b.json"] and len(list(tmp_path.iterdir())) == 1
