"""Great Expectations suites of the data gate (JSON under ``expectations/suites/``).

Suites are plain GE 1.x ``ExpectationSuite`` JSON. Thresholds are ``{"$PARAMETER": name}``
placeholders filled from the ``validate:`` config section at run time; each expectation's
``meta.code`` is the finding code its unexpected rows become, and ``meta.detail`` a
``str.format`` template over the failing row's columns and the parameters.
"""

from __future__ import annotations

import json
from importlib import resources

SUITE_NAMES = ("image", "annotation", "dataset")
# The drift suite checks the table that compares tonight's dataset profile with a reference
# profile (``damage.tasks.validation.drift``); it runs only when a reference exists.
DRIFT_SUITE = "drift"
ALL_SUITES = (*SUITE_NAMES, DRIFT_SUITE)


def load_suite_json(name: str) -> dict:
    """The raw JSON of one suite (``image``, ``annotation``, ``dataset`` or ``drift``)."""
    if name not in ALL_SUITES:
        raise KeyError(f"unknown expectation suite '{name}' (have: {', '.join(ALL_SUITES)})")
    text = resources.files(__package__).joinpath("suites", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def suite_codes() -> set[str]:
    """Every finding code some suite can produce."""
    return {e["meta"]["code"] for n in ALL_SUITES for e in load_suite_json(n)["expectations"]}
