"""Shared pytest fixtures: isolated dataset/cache folders and the toy dataset."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_data_dirs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Point ``DETECTRON2_DATASETS`` and ``KNET_CACHE`` at test-only folders.

    They live in pytest's cache folder (``.pytest_cache``, so the toy dataset is generated once and
    reused by later sessions; the generator's version marker invalidates stale copies), or in a
    temporary folder when the cache plugin is disabled. Tests never write into ./datasets or
    ~/.cache. K-Net reads both variables when data is loaded, so setting them after
    ``import knet`` is enough.
    """
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        base = cache.mkdir("knet-test-data")
    else:
        base = tmp_path_factory.mktemp("knet-test-data")
    mp = pytest.MonkeyPatch()
    mp.setenv("DETECTRON2_DATASETS", str(base / "datasets"))
    mp.setenv("KNET_CACHE", str(base / "cache"))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def toy_root(isolated_data_dirs) -> str:
    """The toy dataset folder (default size and seed), generated at most once per session.

    Loading a ``knet_toy_*`` dataset never generates it: tests that load one use this fixture.
    """
    from knet.data.datasets import ensure_toy_dataset

    return ensure_toy_dataset()


@pytest.fixture(scope="session")
def shared_data_root() -> str:
    """The shared real-sample folder; skips the test if it is absent."""
    from knet.data.datasets import get_shared_data_root

    path = get_shared_data_root()
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path}; set KNET_SHARED_DATA")
    return path


def _prepared_sample(shared_data_root: str, folder: str, prepare) -> str:
    if not os.path.isdir(os.path.join(shared_data_root, folder)):
        pytest.skip(f"shared data not found at {shared_data_root}/{folder}; set KNET_SHARED_DATA")
    return prepare()


@pytest.fixture(scope="session")
def prepared_coco_sample(isolated_data_dirs, shared_data_root) -> str:
    """The COCO sample's derived files, prepared (into the test cache) at most once per session,
    as ``tools/prepare_samples.py`` does; the ``coco_sample_*`` loaders never prepare them."""
    from knet.data.datasets import prepare_coco_sample

    return _prepared_sample(shared_data_root, "coco_panoptic_sample", prepare_coco_sample)


@pytest.fixture(scope="session")
def prepared_ade20k_sample(isolated_data_dirs, shared_data_root) -> str:
    """The ADE20K sample's converted labels, prepared like ``prepared_coco_sample``."""
    from knet.data.datasets import prepare_ade20k_sample

    return _prepared_sample(shared_data_root, "ade20k_sample", prepare_ade20k_sample)
