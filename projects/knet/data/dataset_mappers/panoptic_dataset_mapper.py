"""Training mapper for panoptic records (``*_panoptic_with_sem_seg`` / ``*_panoptic``)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import transforms as T
from detectron2.structures import Instances
from panopticapi.utils import rgb2id

from .common import (
    KNetDatasetMapperBase,
    check_same_size,
    image_to_tensor,
    read_image_checked,
)

__all__ = ["KNetPanopticDatasetMapper"]

logger = logging.getLogger(__name__)


class KNetPanopticDatasetMapper(KNetDatasetMapperBase):
    """Map a panoptic record to K-Net's training input.

    Reads ``file_name`` and the RGB panoptic PNG ``pan_seg_file_name`` (ids via
    ``panopticapi.utils.rgb2id``), applies the same geometric augmentations to both and returns::

        {"image": uint8 (3, H, W) tensor in ``image_format`` order,
         "instances": Instances(image_size) with
             gt_classes int64 (N,) contiguous ids and gt_masks bool (N, H, W),
             one per NON-crowd THING segment with a non-empty mask after augmentation,
         "sem_seg": int64 (H, W): each segment's contiguous class (stuff and things, crowd
             included), ``ignore_label`` elsewhere,
         "height", "width", "file_name", "image_id": copied from the record}
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list[T.Augmentation | T.Transform],
        image_format: str,
        ignore_label: int = 255,
    ):
        """
        Args:
            is_train, augmentations, image_format: see ``KNetDatasetMapperBase``.
            ignore_label: value of void pixels in ``sem_seg``.
        """
        super().__init__(is_train, augmentations=augmentations, image_format=image_format)
        self.ignore_label = ignore_label

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        ret = super().from_config(cfg, is_train)
        return {**ret, "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE}

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)  # it will be modified below
        image = self.read_image(dataset_dict)

        pan_file = dataset_dict.pop("pan_seg_file_name")
        pan_rgb = read_image_checked(pan_file, "RGB", "panoptic PNG")
        check_same_size(pan_rgb, image, pan_file, dataset_dict)
        segments_info = dataset_dict.pop("segments_info")
        dataset_dict.pop("sem_seg_file_name", None)  # sem_seg is rebuilt from the panoptic PNG

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        # Nearest-neighbour ops on the RGB encoding keep ids intact; decode afterwards.
        pan_ids = rgb2id(transforms.apply_segmentation(pan_rgb))
        h, w = image.shape[:2]

        sem_seg = np.full((h, w), self.ignore_label, dtype=np.int64)
        classes, masks = [], []
        for seg in segments_info:
            if "isthing" not in seg:
                raise ValueError(
                    f"segments_info of {pan_file} lacks 'isthing' (segment {seg['id']})"
                )
            mask = pan_ids == seg["id"]
            if not mask.any():  # absent, or cropped away by the augmentation
                continue
            sem_seg[mask] = seg["category_id"]
            if seg["isthing"] and not seg.get("iscrowd", 0):
                classes.append(seg["category_id"])
                masks.append(mask)

        instances = Instances((h, w))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        if masks:
            instances.gt_masks = torch.from_numpy(np.stack(masks))
        else:
            instances.gt_masks = torch.zeros((0, h, w), dtype=torch.bool)

        dataset_dict["image"] = image_to_tensor(image)
        dataset_dict["instances"] = instances
        dataset_dict["sem_seg"] = torch.from_numpy(sem_seg)
        return dataset_dict
