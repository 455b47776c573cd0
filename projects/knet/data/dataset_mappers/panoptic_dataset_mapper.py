"""Training mapper for panoptic records (``*_panoptic_with_sem_seg`` / ``*_panoptic``)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.structures import Instances
from panopticapi.utils import rgb2id

from .common import KNetDatasetMapperBase, image_to_tensor

__all__ = ["KNetPanopticDatasetMapper"]


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
    def __init__(self, is_train: bool = True, *, ignore_label: int = 255, **kwargs: Any):
        """``ignore_label``: the value of void pixels in ``sem_seg``; ``augmentations`` and
        ``image_format`` as for ``KNetDatasetMapperBase``."""
        super().__init__(is_train, **kwargs)
        self.ignore_label = ignore_label

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        ret = super().from_config(cfg, is_train)
        return {**ret, "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE}

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        pan_file = dataset_dict.pop("pan_seg_file_name")
        segments_info = dataset_dict.pop("segments_info")
        dataset_dict.pop("sem_seg_file_name", None)  # sem_seg is rebuilt from the panoptic PNG
        # The image and the panoptic PNG are cropped / resized as they are decoded, the PNG
        # with nearest-neighbour on its RGB encoding (ids intact; decoded afterwards), so the
        # per-segment masks below are made at the augmented size, never at the input's.
        image, pan_rgb, _ = self.read_augmented(dataset_dict, pan_file, "RGB", "panoptic PNG")
        pan_ids = rgb2id(pan_rgb)
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

        gt_masks = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool))
        gt_classes = torch.tensor(classes, dtype=torch.int64)
        dataset_dict["image"] = image_to_tensor(image)
        dataset_dict["instances"] = Instances((h, w), gt_classes=gt_classes, gt_masks=gt_masks)
        dataset_dict["sem_seg"] = torch.from_numpy(sem_seg)
        return dataset_dict
