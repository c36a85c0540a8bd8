"""The ``damage`` command line. Each feature registers its commands from ``flows/commands/``."""

from __future__ import annotations

import importlib

import typer

from damage.flows.commands import COMMAND_MODULES
from damage.flows.common import DamageGroup, shared_options

app = typer.Typer(
    name="damage",
    cls=DamageGroup,
    help="Vehicle-damage segmentation model factory: data gate, training, sweeps, compression, "
    "ONNX, MLflow registry and Prefect nightly flows. The shared options (--config, --set, "
    "--state-dir) may stand before or after the command.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(shared_options)  # the one place the shared options are declared

for _mod in COMMAND_MODULES:
    importlib.import_module(_mod).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
