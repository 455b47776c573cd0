"""Training mapper for semantic segmentation records (``sem_seg_file_name``)."""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .common import KNetDatasetMapperBase, check_same_size, image_to_tensor, read_image_checked

__all__ = ["KNetSemanticDatasetMapper"]

logger = logging.getLogger(__name__)


class KNetSemanticDatasetMapper(KNetDatasetMapperBase):
    """Map a semantic record to K-Net's training input::

        {"image": uint8 (3, H, W) tensor in ``image_format`` order,
         "sem_seg": int64 (H, W) class ids, ``ignore_label`` for void,
         "height", "width", "file_name", "image_id" (if present): copied from the record}

    With ``size_divisibility > 0`` the image (value 0) and ``sem_seg`` (``ignore_label``) are
    padded at the bottom/right to the next multiple of ``size_divisibility``.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[T.Augmentation | T.Transform],
        image_format: str,
        ignore_label: int = 255,
        size_divisibility: int = -1,
    ):
        """
        Args:
            is_train: whether the mapper is used for training (only affects logging here).
            augmentations: augmentations applied to the image and the label map.
            image_format: channel order for ``read_image`` ("BGR" or "RGB").
            ignore_label: void label value in the label PNGs and in the padding.
            size_divisibility: pad to a multiple of this (<= 0: no padding).
        """
        super().__init__(is_train, augmentations, image_format)
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> Dict[str, Any]:
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
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)  # it will be modified below
        image = self.read_image(dataset_dict)
        if "sem_seg_file_name" not in dataset_dict:
            raise ValueError(f"Record of {dataset_dict['file_name']} has no 'sem_seg_file_name'")
        sem_file = dataset_dict.pop("sem_seg_file_name")
        sem_seg = read_image_checked(sem_file, None, "semantic PNG")
        if sem_seg.ndim != 2:
            raise ValueError(f"Semantic PNG {sem_file} must have one channel, got {sem_seg.shape}")
        check_same_size(sem_seg, image, sem_file, dataset_dict)
        if sem_seg.dtype != np.uint8:  # e.g. 16-bit labels: resize them exactly as float
            sem_seg = sem_seg.astype(np.float64)

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        image_t = image_to_tensor(aug_input.image)
        sem_t = torch.as_tensor(aug_input.sem_seg.astype(np.int64))

        if self.size_divisibility > 0:
            h, w = sem_t.shape
            pad = [0, (-w) % self.size_divisibility, 0, (-h) % self.size_divisibility]
            image_t = F.pad(image_t, pad, value=0)
            sem_t = F.pad(sem_t, pad, value=self.ignore_label)

        dataset_dict["image"] = image_t
        dataset_dict["sem_seg"] = sem_t
        return dataset_dict
