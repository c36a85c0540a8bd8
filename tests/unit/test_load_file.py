"""``damage.tasks.core.errors.load_file``: the one rule for "missing file / unloadable file" errors."""

from __future__ import annotations

import pytest

from damage.tasks.core.errors import DamageError, DatasetError, load_file


def test_load_file_names_the_file_and_keeps_the_cause(tmp_path):
    f = tmp_path / "x.yaml"
    with pytest.raises(DatasetError, match=r"x\.yaml: data\.yaml not found"):
        load_file(f, lambda p: p.read_text(), "data.yaml", DatasetError)
    f.write_text("ok")
    assert load_file(f, lambda p: p.read_text(), "data.yaml") == "ok"

    def broken(p):
        raise ValueError("bad bytes")

    with pytest.raises(DamageError, match=r"x\.yaml: cannot load weights: bad bytes") as e:
        load_file(f, broken, "weights")
    assert isinstance(e.value.__cause__, ValueError) and type(e.value) is DamageError
