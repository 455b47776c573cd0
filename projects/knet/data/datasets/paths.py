"""Where datasets, the shared sample data and prepared (derived) files live.

Every function reads its environment variable when it is called (not at import time), so a
variable set after ``import knet`` is honoured:

* ``DETECTRON2_DATASETS``: root of the datasets (default ``datasets``, relative to the current
  directory, as in Detectron2).
* ``KNET_SHARED_DATA``: root of the read-only real sample data (``coco_panoptic_sample/``,
  ``ade20k_sample/``); default ``<repository>/../shared/data``.
* ``KNET_CACHE``: where files derived from the shared samples are written (default
  ``~/.cache/knet``); they go under ``<cache>/prepared/``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

# projects/knet/data/datasets/paths.py -> parents[4] is the repository root
_REPO_ROOT = Path(__file__).resolve().parents[4]

SHARED_DATA_ENV = "KNET_SHARED_DATA"
CACHE_ENV = "KNET_CACHE"
DATASETS_ENV = "DETECTRON2_DATASETS"


def get_datasets_root() -> str:
    """Root folder of the datasets: ``$DETECTRON2_DATASETS`` or ``datasets``."""
    return os.environ.get(DATASETS_ENV, "datasets")


def get_shared_data_root() -> str:
    """Root of the read-only shared sample data.

    ``$KNET_SHARED_DATA``, else ``<repository>/../shared/data``.
    """
    default = _REPO_ROOT.parent / "shared" / "data"
    return os.environ.get(SHARED_DATA_ENV, str(default))


def get_cache_root() -> str:
    """Cache folder for derived files: ``$KNET_CACHE`` or ``~/.cache/knet``."""
    return os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "knet"))


def get_prepared_root() -> str:
    """Folder holding the prepared (derived) versions of the shared samples."""
    return os.path.join(get_cache_root(), "prepared")


def require_shared_path(*parts: str) -> str:
    """Path of ``parts`` under the shared data root; raises if it does not exist.

    Raises:
        FileNotFoundError: naming the missing path and the environment variable to set.
    """
    path = os.path.join(get_shared_data_root(), *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Shared sample data not found: {path}. Set {SHARED_DATA_ENV} to the folder that "
            "holds coco_panoptic_sample/ and ade20k_sample/."
        )
    return path


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Inter-process lock on ``path + '.lock'`` (creates the parent folder).

    Used so that concurrent processes (DDP workers, parallel test runs) do not generate or prepare
    the same files at the same time.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileLock(path + ".lock"):
        yield
