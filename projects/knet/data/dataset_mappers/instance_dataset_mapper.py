"""Training mapper for COCO-style instance records (``annotations`` with polygons or RLE)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from detectron2.data import detection_utils as utils
from detectron2.structures import Instances

from .common import KNetDatasetMapperBase, image_to_tensor

__all__ = ["KNetInstanceDatasetMapper"]


class KNetInstanceDatasetMapper(KNetDatasetMapperBase):
    """Map an instance record to K-Net's training input::

    {"image": uint8 (3, H, W) tensor in ``image_format`` order,
     "instances": Instances(image_size) with gt_classes int64 (N,) and gt_masks bool
         (N, H, W), one per non-crowd annotation whose mask is non-empty after augmentation,
     "height", "width", "file_name", "image_id": copied from the record}
    """

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        # resized as it is decoded; polygons are transformed as coordinates and rasterised at
        # the augmented size (an RLE is decoded one annotation at a time, then resized)
        image, _, transforms = self.read_augmented(dataset_dict)
        h, w = image.shape[:2]

        annos = [
            utils.transform_instance_annotations(obj, transforms, (h, w))
            for obj in dataset_dict.pop("annotations", [])
            if obj.get("iscrowd", 0) == 0
        ]
        masks = torch.zeros((0, h, w), dtype=torch.bool)
        classes = torch.zeros((0,), dtype=torch.int64)
        if annos:
            if any("segmentation" not in obj for obj in annos):
                raise ValueError(
                    f"An annotation of {dataset_dict['file_name']} has no segmentation"
                )
            gt = utils.annotations_to_instances(annos, (h, w), mask_format="bitmask")
            masks = gt.gt_masks.tensor.to(torch.bool)  # BitMasks -> plain bool tensor
            keep = masks.flatten(1).any(dim=1)  # drop masks cropped away / empty polygons
            masks, classes = masks[keep], gt.gt_classes.to(torch.int64)[keep]
        dataset_dict["image"] = image_to_tensor(image)
        dataset_dict["instances"] = Instances((h, w), gt_classes=classes, gt_masks=masks)
        return dataset_dict
