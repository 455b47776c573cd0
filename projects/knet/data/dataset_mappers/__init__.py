"""K-Net dataset mappers (Detectron2 style, ``@configurable``).

Pick the training mapper with ``INPUT.DATASET_MAPPER_NAME`` through :func:`build_train_mapper`;
evaluation uses :func:`build_test_mapper` (Detectron2's ``DatasetMapper(cfg, is_train=False)``
behaviour with the same checked image read as training).
"""

from __future__ import annotations

from collections.abc import Callable

from detectron2.config import CfgNode

from .common import build_augmentations, read_image_checked
from .inference_dataset_mapper import KNetTestDatasetMapper
from .instance_dataset_mapper import KNetInstanceDatasetMapper
from .panoptic_dataset_mapper import KNetPanopticDatasetMapper
from .semantic_dataset_mapper import KNetSemanticDatasetMapper

MAPPERS: dict[str, type] = {
    "knet_panoptic": KNetPanopticDatasetMapper,
    "knet_instance": KNetInstanceDatasetMapper,
    "knet_semantic": KNetSemanticDatasetMapper,
}


def build_train_mapper(cfg: CfgNode) -> Callable[[dict], dict]:
    """The training mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``, built from ``cfg``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPERS:
        raise ValueError(
            f"Unknown INPUT.DATASET_MAPPER_NAME {name!r}; valid names: {', '.join(sorted(MAPPERS))}"
        )
    return MAPPERS[name](cfg, is_train=True)


def build_test_mapper(cfg: CfgNode) -> Callable[[dict], dict]:
    """The inference mapper for ``cfg`` (``INPUT.FORMAT``, ``INPUT.MIN_SIZE_TEST``,
    ``INPUT.MAX_SIZE_TEST``), whatever the training mapper is."""
    return KNetTestDatasetMapper(cfg, is_train=False)


__all__ = [
    "MAPPERS",
    "build_train_mapper",
    "build_test_mapper",
    "build_augmentations",
    "read_image_checked",
    "KNetPanopticDatasetMapper",
    "KNetInstanceDatasetMapper",
    "KNetSemanticDatasetMapper",
    "KNetTestDatasetMapper",
]
