"""Test-time mapper: Detectron2's ``DatasetMapper(cfg, is_train=False)`` with K-Net's checked read.

Detectron2's ``DatasetMapper.__call__`` calls ``detection_utils.read_image`` directly, which can
return partly decoded pixels for a corrupt file instead of raising (see
:func:`~knet.data.dataset_mappers.common.read_image_checked`); evaluation therefore uses this
mapper, so that training and evaluation read images the same way.
"""

from __future__ import annotations

import copy
from typing import Any

from detectron2.config import CfgNode, configurable
from detectron2.data import transforms as T

from .common import KNetDatasetMapperBase, image_to_tensor

__all__ = ["KNetTestDatasetMapper"]


class KNetTestDatasetMapper(KNetDatasetMapperBase):
    """Map a record to a K-Net inference input::

    {"image": uint8 (3, H, W) tensor in ``image_format`` order, resized by the test
         augmentations (``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``),
     every other record key ("height", "width", "file_name", "image_id", ...) copied,
     except "annotations" and "sem_seg_file_name"}

    The image tensor is the one ``DatasetMapper(cfg, is_train=False)`` produces. Unlike that
    mapper, ground-truth label maps are not read: the model does not use them at inference and
    the evaluators read the ground truth from the files themselves.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = False,
        *,
        augmentations: list[T.Augmentation | T.Transform],
        image_format: str,
    ):
        """
        Args:
            is_train: must be False; present for the ``@configurable`` calling convention.
            augmentations: deterministic augmentations applied to the image.
            image_format: channel order of the image ("BGR" or "RGB").
        """
        if is_train:
            raise ValueError("KNetTestDatasetMapper is for inference; use build_train_mapper")
        super().__init__(is_train, augmentations=augmentations, image_format=image_format)

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = False) -> dict[str, Any]:
        return super().from_config(cfg, is_train=False)

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)  # it will be modified below
        image = self.read_image(dataset_dict)  # checked decode + height/width check
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        dataset_dict["image"] = image_to_tensor(aug_input.image)
        # as DatasetMapper(cfg, is_train=False): inference inputs carry no annotations
        dataset_dict.pop("annotations", None)
        dataset_dict.pop("sem_seg_file_name", None)
        return dataset_dict
