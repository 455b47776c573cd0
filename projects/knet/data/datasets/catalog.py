"""Registration helper whose path metadata is resolved when it is read.

Detectron2 stores dataset paths in ``MetadataCatalog`` as constants computed at import time.
K-Net's datasets instead resolve path fields (``panoptic_json``, ``json_file``, ...) through a
function each time they are read, so that ``DETECTRON2_DATASETS`` / ``KNET_SHARED_DATA`` /
``KNET_CACHE`` set after ``import knet`` are honoured consistently by the loaders (which also
read them when called) and by the evaluators (which read the metadata). These functions only
build paths: reading metadata never reads, generates or prepares a file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

logger = logging.getLogger(__name__)

# dataset name -> {metadata key -> zero-argument function returning its value}
_LAZY_FIELDS: dict[str, dict[str, Callable[[], Any]]] = {}


class LazyMetadata(Metadata):
    """:class:`Metadata` whose registered path fields are computed on access.

    Behaves like Detectron2's ``Metadata`` (``get``, ``set``, ``hasattr`` all work); a lazy field
    is a path computed from the environment, whether or not the file exists.
    """

    def __getattr__(self, key: str) -> Any:
        fields = _LAZY_FIELDS.get(self.__dict__.get("name", ""), {})
        if key in fields:
            return fields[key]()
        return super().__getattr__(key)

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        for key, fn in _LAZY_FIELDS.get(self.__dict__.get("name", ""), {}).items():
            out[key] = fn()
        return out


def register_dataset(
    name: str,
    loader: Callable[[], list[dict]],
    lazy_fields: Mapping[str, Callable[[], Any]],
    **static: Any,
) -> bool:
    """Register ``loader`` under ``name`` with static and lazily resolved metadata.

    Args:
        name: dataset name.
        loader: zero-argument callable returning the list of records (``DatasetCatalog`` style).
        lazy_fields: metadata keys whose value is computed by calling the function on access.
        static: plain metadata values (class names, colours, id maps, evaluator type, ...).

    Returns:
        False (and registers nothing) if ``name`` is already registered, e.g. by Detectron2 or
        Mask2Former; True otherwise.
    """
    if name in DatasetCatalog.list():
        logger.debug("Dataset %s is already registered; keeping the existing registration.", name)
        return False
    existing = MetadataCatalog.get(name) if name in MetadataCatalog.list() else None
    if existing is not None and len(existing.__dict__) > 1:
        raise ValueError(
            f"Metadata of {name!r} already holds {sorted(existing.__dict__)}; refusing to replace "
            "it with K-Net's registration."
        )
    DatasetCatalog.register(name, loader)
    _LAZY_FIELDS[name] = dict(lazy_fields)
    MetadataCatalog[name] = LazyMetadata(name=name)
    MetadataCatalog.get(name).set(**static)
    return True
