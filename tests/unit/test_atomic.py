"""damage.tasks.core.atomic: the one write-then-rename helper (files, JSON, folders)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from damage.tasks.core.atomic import atomic_write, atomic_write_json, atomic_write_text


def test_json_written_whole_with_newline_and_escapes(tmp_path):
    out = atomic_write_json(tmp_path / "sub" / "r.json", {"file": "caf\u00e9.jpg", "n": 1})
    text = out.read_text()
    assert text.endswith("\n") and "\\u00e9" in text
    assert json.loads(text) == {"file": "caf\u00e9.jpg", "n": 1}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temp file left


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    out = atomic_write_text(tmp_path / "a.txt", "old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(out, boom)
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_written_file_has_ordinary_permissions_and_its_suffix_during_the_write(tmp_path):
    seen = []
    out = atomic_write(tmp_path / "plot.png", lambda tmp: (seen.append(tmp), open(tmp, "wb").close()))
    assert seen[0].endswith(".png") and os.path.dirname(seen[0]) == str(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
