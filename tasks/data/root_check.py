"""Every path a data.yaml names stays inside its dataset (issue 31, item 8).

A data.yaml is text anyone can write. ``path: /`` with ``train: /etc`` would make the import copy,
and the data gate read and report, files from anywhere on the machine. ``check_dataset_paths`` is
called by the one data.yaml reader (``damage.tasks.data.dataset.load_data_yaml``):

* the root (``path:``) may be the data.yaml's folder, a folder inside it, its parent (the
  ``dataset/configs/data.yaml`` + ``path: ..`` layout), or a folder elsewhere (a resolved copy under
  the state dir points at its dataset); never a filesystem root, nor a folder two or more levels
  above the data.yaml (``path: /``, ``path: ../..``): that would widen the dataset to its parents;
* every split source (folder, list file, image) must resolve, symlinks followed, inside the root.
"""

from __future__ import annotations

import os
from pathlib import Path

from damage.tasks.core.errors import DatasetError


def check_dataset_paths(yaml_path: Path, root: Path, splits: dict[str, list[Path]]) -> None:
    """Refuse a root above the data.yaml's folder and any split source outside the root (names the file).

    Raises:
        DatasetError: the first offending value, with the data.yaml's path.
    """
    real_root, own = Path(os.path.realpath(root)), Path(os.path.realpath(yaml_path.parent))
    above = real_root != own and own.is_relative_to(real_root)
    if above and (own.parent != real_root or real_root == Path(real_root.anchor)):
        raise DatasetError(f"{yaml_path}: 'path' makes the dataset root {root}, a folder above the data.yaml's "
                           f"own ({yaml_path.parent}); a dataset cannot claim its parent folders")
    for split, sources in splits.items():
        for src in sources:
            real = Path(os.path.realpath(src))
            # a .txt list beside the data.yaml itself (a fold or a view written by the pipeline) may sit outside
            # the root: only its text is read there, and every line it names must still resolve inside the
            # root (``dataset.list_images``), so no image or label outside the dataset is ever opened
            if real.suffix.lower() == ".txt" and real.parent == own and real.is_file():
                continue
            if not real.is_relative_to(real_root):
                kind = "list" if src.suffix.lower() == ".txt" else "source"
                raise DatasetError(f"{yaml_path}: split '{split}' {kind} {src} lies outside the dataset root {root}")
