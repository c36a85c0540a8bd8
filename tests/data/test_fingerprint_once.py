"""A nightly run hashes its dataset once: the skip check's fingerprint is passed to the data gate."""

from __future__ import annotations

import pytest

from damage.tasks.core.config import Config, ValidateConfig


@pytest.fixture
def counted(monkeypatch):
    """Count full-dataset hashes (``dataset_fingerprint``) wherever they are imported from."""
    from damage.tasks.data import fingerprint as F

    calls = []
    real = F.dataset_fingerprint

    def counting(root):
        calls.append(str(root))
        return real(root)

    monkeypatch.setattr(F, "dataset_fingerprint", counting)
    return calls


@pytest.mark.parametrize("gate", [True, False])
def test_skip_check_and_data_gate_hash_the_dataset_once(counted, tiny_dataset, tmp_path, state_paths, gate):
    from damage.tasks.core import tracking
    from damage.tasks.nightly.skip import check_unchanged
    from damage.tasks.validation.data_check import check_data_step

    cfg = Config()
    decision = check_unchanged(tiny_dataset, cfg, force=True, code_version="test")  # force: no MLflow lookup
    c = tracking.client()
    parent = tracking.start_run(c, tracking.ensure_experiment(c, "fingerprint-once"), "parent")
    try:
        data = check_data_step(tiny_dataset, ValidateConfig(enabled=gate), tmp_path / "report", parent,
                               fingerprint=decision.dataset_fingerprint)
    finally:
        tracking.end_run(c, parent)
    assert len(counted) == 1  # the skip check's; the gate (and validate_dataset) reuse it
    assert data.fingerprint == decision.dataset_fingerprint
    if gate:
        import json

        assert json.loads(data.report_path.read_text())["fingerprint"] == decision.dataset_fingerprint
