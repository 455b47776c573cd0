"""K-Net's dataset mappers (Detectron2 style, ``@configurable``): one training mapper per dataset
kind (``knet.data.kinds`` picks it by ``INPUT.DATASET_MAPPER_NAME``) and the inference mapper."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances
from panopticapi.utils import rgb2id

from .common import KNetDatasetMapperBase, image_to_tensor


class KNetTestDatasetMapper(KNetDatasetMapperBase):
    """Map a record to a K-Net inference input::

    {"image": uint8 (3, H, W) tensor in ``image_format`` order, resized by the test
         augmentations (``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``),
     every other record key ("height", "width", "file_name", "image_id", ...) copied,
     except "annotations" and "sem_seg_file_name"}

    The image tensor of ``DatasetMapper(cfg, is_train=False)``, read as in training (a corrupt
    file raises). Label maps are not read: the evaluators read the ground truth themselves.
    A clip record (``"frames"``, a whole video) gives its keys and every frame mapped so.
    """

    @configurable
    def __init__(self, is_train: bool = False, **kwargs: Any):
        """As ``KNetDatasetMapperBase``; ``is_train`` must be False (``@configurable``'s
        calling convention)."""
        if is_train:
            raise ValueError("KNetTestDatasetMapper is for inference; use build_train_mapper")
        super().__init__(is_train, **kwargs)

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = False) -> dict[str, Any]:
        return super().from_config(cfg, is_train=False)

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        if "frames" in dataset_dict:
            clip = {k: v for k, v in dataset_dict.items() if k != "frames"}
            return clip | {"frames": [self(f) for f in dataset_dict["frames"]]}
        dataset_dict = copy.deepcopy(dataset_dict)
        # resized as it is decoded: a large image never becomes a full-size array
        dataset_dict["image"] = image_to_tensor(self.read_augmented(dataset_dict).image)
        # as DatasetMapper(cfg, is_train=False): inference inputs carry no annotations
        dataset_dict.pop("annotations", None)
        dataset_dict.pop("sem_seg_file_name", None)
        return dataset_dict


class KNetInstanceDatasetMapper(KNetDatasetMapperBase):
    """Map a COCO-style instance record (``annotations`` with polygons or RLE) to K-Net's training
    input::

    {"image": uint8 (3, H, W) tensor in ``image_format`` order,
     "instances": Instances(image_size) with gt_classes int64 (N,) and gt_masks bool
         (N, H, W), one per non-crowd annotation whose mask is non-empty after augmentation,
     "height", "width", "file_name", "image_id": copied from the record}
    """

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        if "frames" in dataset_dict:
            clip = {k: v for k, v in dataset_dict.items() if k != "frames"}
            return clip | {"frames": [self(f) for f in dataset_dict["frames"]]}
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


class KNetPanopticDatasetMapper(KNetDatasetMapperBase):
    """Map a panoptic record (``*_panoptic_with_sem_seg`` / ``*_panoptic``) to K-Net's training
    input.

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
        """``ignore_label``: the value of void pixels in ``sem_seg``; the rest as
        ``KNetDatasetMapperBase``."""
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
        # The PNG is cropped / resized as it is decoded, nearest-neighbour on its RGB encoding
        # (ids intact), so the masks below are made at the augmented size.
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


class KNetSemanticDatasetMapper(KNetDatasetMapperBase):
    """Map a semantic record (``sem_seg_file_name``) to K-Net's training input::

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
