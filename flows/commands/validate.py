"""``damage validate``: the data gate on the command line.

Exit codes: 0 = no error-level finding, 1 = error-level findings, 2 = usage problem
(no such path, not a dataset, bad config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from damage.flows.common import RayOpt, console, ray_for, run_guarded, setup
from damage.flows.tables import JsonOpt_help, json_output


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
        against: Annotated[Path | None, typer.Option(
            "--against", help="Check drift against this reference: a dataset (folder or data.yaml) or a "
            "profile.json written by an earlier gate.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help=JsonOpt_help)] = False,
        ray: RayOpt = None,
    ) -> None:
        """Check a dataset (images, labels, duplicates, leakage) before training. Exit 1 on errors.

        With --against, also compare it with a reference (class shares, size / brightness / blur /
        area distributions, classes added or removed); drift findings are warnings unless
        validate.on_drift=fail.
        """
        with json_output(as_json) as doc:
            cfg, paths = setup(ctx)
            from damage.tasks.validation.validate import validate_dataset

            report = report or paths.reports / "validate" / "report.json"
            rcfg = ray_for(cfg, paths, ray)  # the images are read and measured on Ray workers
            reference = None
            if against is not None:
                from damage.tasks.validation.drift import reference_profile

                reference = run_guarded(reference_profile, against, cfg.validation, rcfg)
            result = run_guarded(validate_dataset, data, cfg.validation, report_path=report, html_dir=html,
                                 clean_out=clean, reference=reference, reference_source=str(against or ""),
                                 ray=rcfg)
            doc.append({"passed": result.passed, "fingerprint": result.fingerprint,
                        "report_path": result.report_path, "html_path": result.html_path,
                        "clean_data_yaml": result.clean_data_yaml, **result.report})
        if as_json:
            raise typer.Exit(0 if result.passed else 1)
        from rich.table import Table

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
        if reference is not None:
            from damage.tasks.validation.drift import DRIFT_CODES

            counts = ", ".join(f"{c}={s['by_code'][c]}" for c in DRIFT_CODES if c in s["by_code"])
            console.print(f"drift against {against}: {counts or 'no drift finding'}", highlight=False,
                          soft_wrap=True)
        console.print(f"report: {result.report_path}", highlight=False, soft_wrap=True)
        console.print(f"profile: {result.profile_path}", highlight=False, soft_wrap=True)
        if result.html_path:
            console.print(f"html: {result.html_path}  (Data Docs: {result.docs_path})", highlight=False,
                          soft_wrap=True)
        if result.clean_data_yaml:
            console.print(f"cleaned copy: {result.clean_data_yaml}  (left out: {result.quarantine_path})",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(0 if result.passed else 1)
