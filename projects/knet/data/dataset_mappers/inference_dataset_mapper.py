"""The test-time mapper: Detectron2's ``DatasetMapper(cfg, is_train=False)``, checked reads."""

from __future__ import annotations

import copy
from typing import Any

from detectron2.config import CfgNode, configurable

from .common import KNetDatasetMapperBase, image_to_tensor

__all__ = ["KNetTestDatasetMapper"]


class KNetTestDatasetMapper(KNetDatasetMapperBase):
    """Map a record to a K-Net inference input::

    {"image": uint8 (3, H, W) tensor in ``image_format`` order, resized by the test
         augmentations (``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``),
     every other record key ("height", "width", "file_name", "image_id", ...) copied,
     except "annotations" and "sem_seg_file_name"}

    The image tensor is the one ``DatasetMapper(cfg, is_train=False)`` produces. Unlike that
    mapper, ground-truth label maps are not read (the model does not use them at inference and
    the evaluators read the ground truth from the files themselves), and the image is read with
    :func:`~knet.data.dataset_mappers.common.read_image_checked`, which raises on a corrupt file
    where Detectron2's ``read_image`` can return partly decoded pixels: training and evaluation
    read images the same way.
    """

    @configurable
    def __init__(self, is_train: bool = False, **kwargs: Any):
        """``augmentations`` and ``image_format`` as for ``KNetDatasetMapperBase``;
        ``is_train`` must be False (it is there for the ``@configurable`` calling convention)."""
        if is_train:
            raise ValueError("KNetTestDatasetMapper is for inference; use build_train_mapper")
        super().__init__(is_train, **kwargs)

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = False) -> dict[str, Any]:
        return super().from_config(cfg, is_train=False)

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        # resized as it is decoded: a large image never becomes a full-size array
        dataset_dict["image"] = image_to_tensor(self.read_augmented(dataset_dict).image)
        # as DatasetMapper(cfg, is_train=False): inference inputs carry no annotations
        dataset_dict.pop("annotations", None)
        dataset_dict.pop("sem_seg_file_name", None)
        return dataset_dict
