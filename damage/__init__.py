"""damage: the vehicle-damage model factory (distribution ``vehicle-damage-factory``, command ``damage``).

Every import of the project is under this one name: ``damage.tasks``, ``damage.flows``,
``damage.model_registry``, ``damage.expectations`` (and ``damage.configs``, the YAML it ships). In the
repository those folders sit at the root, beside this one; pyproject.toml's package-dir maps them here, so a
wheel holds them as ``damage/tasks/...`` and coexists with other distributions that ship top-level
``tasks``, ``flows``, ``model_registry`` or ``expectations`` packages.
"""

from pathlib import Path

_root = Path(__file__).resolve().parent.parent
# A source checkout (no install, or a worktree beside the installed one): the subpackages are the folders
# beside this one. In an installed wheel they are inside this folder and nothing is added.
if (_root / "pyproject.toml").is_file() and (_root / "tasks" / "core" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821  (a package's __path__)
