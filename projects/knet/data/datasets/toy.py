"""The synthetic "toy" panoptic dataset: its categories, folder and completeness check (the
loaders never generate it: ``tools/make_toy_dataset.py`` does)."""

from __future__ import annotations

import json
import os
from typing import Any

# Dataset ids deliberately differ from the contiguous ids (things 0..3, stuff 4..6).
TOY_THING_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60], "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "isthing": 1, "color": [250, 170, 30], "supercategory": "shape"},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [106, 0, 228], "supercategory": "shape"},
    {"id": 5, "name": "star", "isthing": 1, "color": [0, 226, 252], "supercategory": "shape"},
]
TOY_STUFF_CATEGORIES: list[dict[str, Any]] = [
    {"id": 10, "name": "sky", "isthing": 0, "color": [70, 130, 180], "supercategory": "scene"},
    {"id": 11, "name": "grass", "isthing": 0, "color": [152, 251, 152], "supercategory": "scene"},
    {"id": 12, "name": "wall", "isthing": 0, "color": [137, 54, 74], "supercategory": "scene"},
]
TOY_CATEGORIES: list[dict[str, Any]] = TOY_THING_CATEGORIES + TOY_STUFF_CATEGORIES
TOY_NUM_THING_CLASSES = len(TOY_THING_CATEGORIES)
TOY_NUM_CLASSES = len(TOY_CATEGORIES)
TOY_DIRNAME = "knet_toy"
# Bump when the generator's output changes, so that stale copies are refused and regenerated.
TOY_FORMAT_VERSION = 3
# Written last by the generator: its parameters, the format "version" among them.
TOY_MARKER = "_COMPLETE.json"
# The command that creates the dataset; the loaders name it when the dataset is absent.
TOY_COMMAND = "python tools/make_toy_dataset.py"


def get_datasets_root() -> str:
    """Root folder of the datasets: ``$DETECTRON2_DATASETS`` or ``datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def toy_dataset_dir(root: str | None = None) -> str:
    """``<root>/knet_toy``, with ``root`` defaulting to ``$DETECTRON2_DATASETS``."""
    return os.path.join(get_datasets_root() if root is None else root, TOY_DIRNAME)


def read_toy_marker(out_dir: str) -> dict[str, Any] | None:
    """The generation parameters in ``out_dir``'s :data:`TOY_MARKER` (None: absent, unreadable)."""
    try:
        with open(os.path.join(out_dir, TOY_MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def require_toy_dataset(root: str | None = None) -> str:
    """Return ``<root>/knet_toy`` if a complete copy of the current format is there.

    Raises:
        FileNotFoundError: absent, incomplete or stale; naming the folder and :data:`TOY_COMMAND`.
    """
    out_dir = toy_dataset_dir(root)
    marker = read_toy_marker(out_dir)
    where = f"it writes into DETECTRON2_DATASETS, here {os.path.dirname(out_dir)}"
    if marker is None:
        raise FileNotFoundError(
            f"Toy dataset not found in {out_dir}. Create it with `{TOY_COMMAND}` ({where}; a few "
            "seconds), or run `make demo`, which creates it first."
        )
    if marker.get("version") != TOY_FORMAT_VERSION:
        raise FileNotFoundError(
            f"Toy dataset in {out_dir} has format version {marker.get('version')}, this code "
            f"reads version {TOY_FORMAT_VERSION}. Regenerate it with `{TOY_COMMAND}` ({where})."
        )
    return out_dir
