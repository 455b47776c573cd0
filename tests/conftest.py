"""Shared pytest set-up: isolated dataset/cache folders, the toy dataset and the shared samples."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the tools' modules (toy generator, sample datasets, panoptic conversion) import as modules
sys.path.insert(0, str(REPO / "tools"))


def pytest_configure(config: pytest.Config) -> None:
    """Point ``DETECTRON2_DATASETS`` and ``KNET_CACHE`` at test-only folders, then register the
    shared samples' datasets.

    This runs before any test module imports ``knet``, whose built-in datasets take their paths
    from ``DETECTRON2_DATASETS`` at import, as Detectron2's do. The folders live in pytest's cache
    folder (``.pytest_cache``, so the toy dataset is generated once and reused by later sessions;
    the generator's version marker invalidates stale copies), or in a temporary folder when the
    cache plugin is disabled. Tests never write into ./datasets or ~/.cache. Subprocesses that
    the tests start inherit both variables.
    """
    cache = getattr(config, "cache", None)
    if cache is not None:
        base = Path(cache.mkdir("knet-test-data"))
    else:
        base = Path(tempfile.mkdtemp(prefix="knet-test-data-"))
    os.environ["DETECTRON2_DATASETS"] = str(base / "datasets")
    os.environ["KNET_CACHE"] = str(base / "cache")
    import prepare_samples

    prepare_samples.register_samples()


@pytest.fixture(scope="session")
def toy_root() -> str:
    """The toy dataset folder (default size and seed), generated at most once per session.

    Loading a ``knet_toy_*`` dataset never generates it: tests that load one use this fixture.
    """
    from make_toy_dataset import ensure_toy_dataset

    return ensure_toy_dataset()


@pytest.fixture(scope="session")
def shared_data_root() -> str:
    """The shared real-sample folder; skips the test if it is absent."""
    from prepare_samples import shared_data_root

    path = shared_data_root()
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path}; set KNET_SHARED_DATA")
    return path


def _prepared_sample(shared_data_root: str, folder: str, prepare) -> str:
    if not os.path.isdir(os.path.join(shared_data_root, folder)):
        pytest.skip(f"shared data not found at {shared_data_root}/{folder}; set KNET_SHARED_DATA")
    return prepare()


@pytest.fixture(scope="session")
def prepared_coco_sample(shared_data_root) -> str:
    """The COCO sample's derived files, prepared (into the test cache) at most once per session,
    as ``tools/prepare_samples.py`` does; the ``coco_sample_*`` loaders never prepare them."""
    from prepare_samples import prepare_coco_sample

    return _prepared_sample(shared_data_root, "coco_panoptic_sample", prepare_coco_sample)


@pytest.fixture(scope="session")
def prepared_ade20k_sample(shared_data_root) -> str:
    """The ADE20K sample's converted labels, prepared like ``prepared_coco_sample``."""
    from prepare_samples import prepare_ade20k_sample

    return _prepared_sample(shared_data_root, "ade20k_sample", prepare_ade20k_sample)
