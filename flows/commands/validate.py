"""``damage validate``: the data gate on the command line.

Exit codes: 0 = no error-level finding, 1 = error-level findings, 2 = usage problem
(no such path, not a dataset, bad config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.common import console, run_guarded, setup


def register(app: typer.Typer) -> None:
    """Add the ``validate`` command to the ``damage`` app."""

    @app.command("validate")
    def validate_cmd(
        ctx: typer.Context,
        data: Annotated[Path, typer.Argument(help="Dataset root or its data.yaml (YOLO-seg).")],
        report: Annotated[Path | None, typer.Option(
            "--report", help="Where to write report.json (default: <state>/reports/validate/report.json).")] = None,
        html: Annotated[Path | None, typer.Option(
            "--html", help="Folder for the HTML summary (index.html) and Great Expectations Data Docs.")] = None,
        clean: Annotated[Path | None, typer.Option(
            "--clean", help="Write a cleaned copy here (errors and duplicates left out) + quarantine.json.")] = None,
    ) -> None:
        """Check a dataset (images, labels, duplicates, leakage) before training. Exit 1 on errors."""
        cfg, paths = setup(ctx)
        from rich.table import Table

        from tasks.validation.validate import validate_dataset

        report = report or paths.reports / "validate" / "report.json"
        result = run_guarded(validate_dataset, data, cfg.validation, report_path=report, html_dir=html,
                             clean_out=clean)
        s = result.report["summary"]
        sev = {f["code"]: f["severity"] for f in result.report["findings"]}
        table = Table(title=f"Data gate: {result.report['dataset']}")
        table.add_column("code")
        table.add_column("severity")
        table.add_column("count", justify="right")
        for code, n in sorted(s["by_code"].items(), key=lambda kv: (sev[kv[0]] != "error", kv[0])):
            style = "red" if sev[code] == "error" else "yellow"
            table.add_row(code, f"[{style}]{sev[code]}[/]", str(n))
        if s["by_code"]:
            console.print(table)
        verdict = "[bold green]PASSED[/]" if result.passed else "[bold red]FAILED[/]"
        console.print(f"{verdict}: {s['images']} images, {s['annotations']} annotations, "
                      f"{s['errors']} errors, {s['warnings']} warnings (fingerprint {result.fingerprint})")
        console.print(f"report: {result.report_path}", highlight=False, soft_wrap=True)
        if result.html_path:
            console.print(f"html: {result.html_path}  (Data Docs: {result.docs_path})", highlight=False,
                          soft_wrap=True)
        if result.clean_data_yaml:
            console.print(f"cleaned copy: {result.clean_data_yaml}  (left out: {result.quarantine_path})",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(0 if result.passed else 1)
