"""Run the data-gate suites with Great Expectations 1.x and turn failures into findings.

One ephemeral GE context, one pandas data source with a dataframe asset per table, one
``ValidationDefinition`` per suite, so each suite is a single validation pass over its table.
Results use ``result_format=COMPLETE`` so every failing row comes back in
``unexpected_index_list``; each index becomes a finding whose code is the expectation's
``meta.code``. With ``docs_dir`` the results also render as GE Data Docs (a file-based site).

Importing Great Expectations takes several seconds, so ``GxRunner()`` is built while the
scan's worker processes are busy (see ``damage.tasks.validation.validate``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from damage.expectations import SUITE_NAMES, load_suite_json

SUITE_TABLE = {"image": "images", "annotation": "annotations", "dataset": "dataset", "drift": "drift"}
RESULT_FORMAT = {"result_format": "COMPLETE", "return_unexpected_index_query": False,
                 "partial_unexpected_count": 20}


class _Row(dict):
    """Row values for detail templates: missing keys render as '?', NaN as 'n/a'."""

    def __missing__(self, key: str) -> str:
        return "?"


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy scalar
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return v


def render_detail(template: str, row: dict, params: dict, fallback: str) -> str:
    """Fill ``template`` from a failing row and the suite parameters; never raises."""
    values = _Row({k: _clean(v) for k, v in params.items()})
    values.update({k: _clean(v) for k, v in row.items()})
    try:
        return template.format_map(values)
    except (ValueError, TypeError, IndexError, KeyError):  # e.g. a format spec on 'n/a'
        return fallback


class GxRunner:
    """A Great Expectations context holding the three suites, ready to validate tables.

    Args:
        docs_dir: if set, a file-based Data Docs site is configured there and
            ``build_docs()`` renders every validation run into it.
        suites: the suites to hold (default: the three data-gate suites; add ``"drift"``
            to compare with a reference profile).
    """

    def __init__(self, docs_dir: Path | None = None, suites: tuple[str, ...] = SUITE_NAMES):
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        sites = {}
        if docs_dir is not None:
            sites["damage"] = {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(),
                                   progress_bars=ProgressBarsConfig(globally=False), data_docs_sites=sites)
        self.docs_dir = docs_dir
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        source = self.context.data_sources.add_pandas("damage_dataset")
        self.suites: dict[str, Any] = {}
        self.definitions: dict[str, Any] = {}
        for name in suites:
            raw = load_suite_json(name)
            suite = self.context.suites.add(gx.ExpectationSuite(**raw))
            batch_def = source.add_dataframe_asset(SUITE_TABLE[name]).add_batch_definition_whole_dataframe("all")
            self.suites[name] = suite
            self.definitions[name] = self.context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{name}-checks", data=batch_def, suite=suite))

    def validate(self, frames: dict[str, pd.DataFrame], params: dict[str, Any]) -> dict[str, Any]:
        """Validate each suite's table once. Returns ``{suite: ExpectationSuiteValidationResult}``."""
        results = {}
        for name in self.suites:
            frame = frames[SUITE_TABLE[name]]
            results[name] = self.definitions[name].run(
                batch_parameters={"dataframe": frame}, expectation_parameters=params,
                result_format=RESULT_FORMAT)
        return results

    def build_docs(self) -> Path | None:
        """Render Data Docs for the validations run so far; returns the site's index.html."""
        if self.docs_dir is None:
            return None
        self.context.build_data_docs()
        return self.docs_dir / "index.html"


def findings_from_results(results: dict[str, Any], frames: dict[str, pd.DataFrame],
                          params: dict[str, Any]) -> list[dict[str, str]]:
    """Map failing rows to ``{"code", "file", "detail"}``; one finding per (code, row).

    Raises:
        RuntimeError: an expectation errored inside GE (a bug in a suite or a table).
    """
    out: list[dict[str, str]] = []
    for name in results:
        frame = frames[SUITE_TABLE[name]]
        seen: set[tuple[str, Any]] = set()
        for r in results[name].results:
            cfg = r.expectation_config
            exc = r.exception_info or {}
            if exc.get("raised_exception"):
                raise RuntimeError(f"expectation {cfg.type} of suite '{name}' failed to run: "
                                   f"{exc.get('exception_message')}")
            if r.success:
                continue
            code = cfg.meta["code"]
            template = cfg.meta.get("detail", code)
            idx = [i for i in (r.result.get("unexpected_index_list") or []) if (code, i) not in seen]
            if not idx:
                continue
            for i, row in zip(idx, frame.loc[idx].to_dict("records"), strict=True):
                seen.add((code, i))
                out.append({"code": code, "file": str(row["file"]),
                            "detail": render_detail(template, row, params, f"{code} ({cfg.type})")})
    return out
