"""Training mapper for semantic segmentation records (``sem_seg_file_name``)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .common import KNetDatasetMapperBase, image_to_tensor

__all__ = ["KNetSemanticDatasetMapper"]


class KNetSemanticDatasetMapper(KNetDatasetMapperBase):
    """Map a semantic record to K-Net's training input::

        {"image": uint8 (3, H, W) tensor in ``image_format`` order,
         "sem_seg": int64 (H, W) class ids (``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` for void),
         "height", "width", "file_name", "image_id" (if present): copied from the record}

    The model pads the batch (image 0, ``sem_seg`` the ignore value).
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        augs = utils.build_augmentation(cfg, is_train)  # resize (+ flip when training)
        if is_train:
            extra = []
            if cfg.INPUT.CROP.ENABLED:
                extra.append(
                    T.RandomCrop_CategoryAreaConstraint(
                        cfg.INPUT.CROP.TYPE,
                        cfg.INPUT.CROP.SIZE,
                        cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
                    )
                )
            if cfg.INPUT.COLOR_AUG_SSD:
                # Detectron2's SSD photometric distortion (as used by Mask2Former); importing it
                # registers PointRend's heads, so only do it when asked for.
                from detectron2.projects.point_rend import ColorAugSSDTransform

                extra.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
            augs[1:1] = extra  # after the resize, before the flip
        return {"is_train": is_train, "augmentations": augs, "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        if "sem_seg_file_name" not in dataset_dict:
            raise ValueError(f"Record of {dataset_dict['file_name']} has no 'sem_seg_file_name'")
        sem_file = dataset_dict.pop("sem_seg_file_name")

        def prepare(sem_seg: np.ndarray) -> np.ndarray:
            if sem_seg.ndim != 2:
                raise ValueError(
                    f"Semantic PNG {sem_file} must have one channel, got {sem_seg.shape[-1]}"
                )
            if sem_seg.dtype != np.uint8:  # e.g. 16-bit labels: resize them exactly as float
                sem_seg = sem_seg.astype(np.float64)
            return sem_seg

        # cropped / resized as they are decoded (nearest-neighbour for the labels)
        image, sem_seg, _ = self.read_augmented(
            dataset_dict, sem_file, None, "semantic PNG", prepare
        )
        dataset_dict["image"] = image_to_tensor(image)
        dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype(np.int64))
        return dataset_dict
