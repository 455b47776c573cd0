"""The training mapper of video data (Video K-Net): a key frame and its reference frame, read
and augmented with the same transforms (one resize scale, one flip, one crop window)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from ..datasets.video import VOID, label_codec, read_label_rgb
from .common import (
    KNetDatasetMapperBase,
    decode_image_checked,
    image_to_tensor,
    sample_leading_geometry,
    size_placeholder,
    transform_decoded,
)

# record keys the mapper consumes (not copied to its output)
_LABEL_KEYS = ("label_file_name", "label_format", "annotations", "reference", "frames")


def build_video_augmentations(cfg: CfgNode) -> list[T.Augmentation]:
    """The official order of the video recipes: resize (one scale, ``ResizeShortestEdge`` of
    ``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` / ``MIN_SIZE_TRAIN_SAMPLING``), flip
    (``INPUT.RANDOM_FLIP``), then a crop of ``INPUT.CROP`` when enabled; unlike Detectron2's
    image recipe, the crop comes after the resize (a fixed-size crop of the resized frame)."""
    augs: list[T.Augmentation] = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    return augs


class KNetVideoPanopticDatasetMapper(KNetDatasetMapperBase):
    """Map a key/reference pair record (``knet.data.datasets.video``) to Video K-Net's training
    input. The transforms are sampled once, on the key frame, and applied to both frames::

        {"image": uint8 (3, H, W) tensor in ``image_format`` order,
         "instances": Instances(image_size) with
             gt_classes int64 (N,) contiguous ids, gt_masks bool (N, H, W),
             gt_ids int64 (N,): the object's identity, equal in both frames (panoptic formats:
                 the official class * 10000 / 1000 + instance; YouTube-VIS: instance_id),
             one per thing object with a non-empty mask after augmentation; crowd thing regions
             (KITTI-STEP instance 0) are instances too, as the official training has them,
             unless ``crowd_as_instances`` is False,
         "sem_seg" (panoptic formats): int64 (H, W) contiguous classes, ``ignore_label`` void,
         "height", "width", "file_name", "image_id", "video_id", "frame_index", ...: copied,
         "reference": the same keys for the reference frame}

    Returns None (Detectron2's ``MapDataset`` then draws another sample), as the official
    pipeline does, when either frame has no thing instance after augmentation or, with
    ``require_common_instance``, the two frames share no identity.

    Records with ``annotations`` (YouTube-VIS: RLE or polygons, contiguous ``category_id``,
    ``instance_id``) give ``instances`` and no ``sem_seg``; crowd annotations are left out.

    Clip records (``"frames"``, ``knet.data.datasets.video.clip_records``) give the clip's keys
    and ``"frames"``: every frame as above (without "reference"), one transform sampled on the
    first frame; None when no frame has an instance.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        ignore_label: int = VOID,
        crowd_as_instances: bool = True,
        require_common_instance: bool = True,
        metadata: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            ignore_label: value of void pixels in ``sem_seg``.
            crowd_as_instances: crowd thing regions are instances (official KITTI-STEP).
            require_common_instance: None when key and reference share no identity.
            metadata: the dataset's class metadata; default: that of each record's
                ``dataset_name`` (``knet.data.datasets.video.label_codec``).
            kwargs: as ``KNetDatasetMapperBase`` (``augmentations``, ``image_format``).
        """
        super().__init__(is_train, **kwargs)
        self.ignore_label = ignore_label
        self.crowd_as_instances = crowd_as_instances
        self.require_common_instance = require_common_instance
        self.metadata = metadata

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_video_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any] | None:
        if "frames" in dataset_dict:
            return self._clip(dataset_dict)
        if "reference" not in dataset_dict:
            raise ValueError(
                f"{dataset_dict.get('file_name')}: not a key/reference pair record (no "
                "'reference'); train on a video dataset's training split (pairs=True)"
            )
        key, transforms, num_leading, size = self._read(dataset_dict)
        if len(key["instances"]) == 0:
            return None
        reference = self._read(dataset_dict["reference"], transforms, num_leading, size)[0]
        if len(reference["instances"]) == 0:
            return None
        if self.require_common_instance:
            common = np.intersect1d(key["instances"].gt_ids.numpy(), reference["instances"].gt_ids)
            if common.size == 0:
                return None
        key["reference"] = reference
        return key

    def _clip(self, clip: dict[str, Any]) -> dict[str, Any] | None:
        first, transforms, num_leading, size = self._read(clip["frames"][0])
        frames = [first] + [
            self._read(f, transforms, num_leading, size)[0] for f in clip["frames"][1:]
        ]
        if not any(len(f["instances"]) for f in frames):
            return None
        return {k: v for k, v in clip.items() if k != "frames"} | {"frames": frames}

    def _read(
        self,
        record: Mapping[str, Any],
        transforms: T.TransformList | None = None,
        num_leading: int = 0,
        key_size: tuple[int, int] | None = None,
    ) -> tuple[dict[str, Any], T.TransformList, int, tuple[int, int]]:
        """One frame, augmented: sampled here (``transforms`` None: the key frame) or with the
        key frame's ``transforms`` (of which the first ``num_leading`` apply to the decoded
        files, as for the key frame, so both frames get the same pixels from the same inputs).

        Returns:
            the frame's output dict, the transforms, ``num_leading`` and the frame's (H, W)
            before augmentation (the reference must have the key frame's ``key_size``).
        """
        out = {k: copy.deepcopy(v) for k, v in record.items() if k not in _LABEL_KEYS}
        decoded = decode_image_checked(record["file_name"], self.image_format, "image")
        size = (decoded.height, decoded.width)
        utils.check_image_size(out, size_placeholder(*size))
        if transforms is None:
            leading, num_leading = sample_leading_geometry(self.augmentations.augs, *size)
        else:
            leading = transforms.transforms[:num_leading]
            if size != key_size:
                raise ValueError(
                    f"Reference frame {record['file_name']} is {size[1]}x{size[0]} (WxH), its key "
                    f"frame {key_size[1]}x{key_size[0]}: a pair is augmented with one transform"
                )
        image = transform_decoded(decoded, self.image_format, leading)
        del decoded
        label = None
        if "label_file_name" in record:
            rgb = read_label_rgb(record)
            if (rgb.height, rgb.width) != size:
                raise ValueError(
                    f"Size mismatch: {record['label_file_name']} is {rgb.width}x{rgb.height} but "
                    f"image {record['file_name']} is {size[1]}x{size[0]} (WxH)"
                )
            label = transform_decoded(rgb, "RGB", leading, segmentation=True)
        if transforms is None:
            aug_input = T.AugInput(image, sem_seg=label)
            rest = T.AugmentationList(self.augmentations.augs[len(leading) :])(aug_input)
            image, label = aug_input.image, aug_input.sem_seg
            transforms = T.TransformList(leading + rest.transforms)
        else:
            for tfm in transforms.transforms[num_leading:]:
                image = tfm.apply_image(image)
                label = tfm.apply_segmentation(label) if label is not None else None
        h, w = image.shape[:2]
        if label is not None:
            instances, sem_seg = self._panoptic_targets(record, label)
            out["sem_seg"] = torch.from_numpy(sem_seg)
        elif "annotations" in record:
            instances = self._annotation_targets(record, transforms, (h, w))
        else:
            raise ValueError(f"{record['file_name']}: a training frame needs labels")
        out["image"] = image_to_tensor(image)
        out["instances"] = instances
        return out, transforms, num_leading, size

    def _panoptic_targets(
        self, record: Mapping[str, Any], label: np.ndarray
    ) -> tuple[Instances, np.ndarray]:
        """Instances and the (h, w) int64 semantic map of an augmented encoded label."""
        codec = label_codec(record, self.metadata)
        semantic, inst, thing, identity = codec.decode(label, record["label_file_name"])
        h, w = semantic.shape
        sem_seg = np.where(semantic == VOID, self.ignore_label, semantic).astype(np.int64)
        objects = thing & (semantic != VOID)
        if not self.crowd_as_instances and record["label_format"] == "kitti_step":
            objects &= inst > 0
        ids = np.unique(identity[objects])
        masks = identity[None] == ids[:, None, None] if ids.size else np.zeros((0, h, w), bool)
        masks &= objects[None]
        classes = [int(semantic[m].flat[0]) for m in masks]
        instances = Instances(
            (h, w),
            gt_classes=torch.tensor(classes, dtype=torch.int64),
            gt_masks=torch.from_numpy(np.ascontiguousarray(masks)),
            gt_ids=torch.from_numpy(ids.astype(np.int64)),
        )
        return instances, sem_seg

    def _annotation_targets(
        self, record: Mapping[str, Any], transforms: T.TransformList, size: tuple[int, int]
    ) -> Instances:
        """Instances of a frame's COCO-style annotations (crowd left out), after ``transforms``."""
        annos = [
            utils.transform_instance_annotations(copy.deepcopy(obj), transforms, size)
            for obj in record.get("annotations", [])
            if not obj.get("iscrowd", 0)
        ]
        masks = torch.zeros((0, *size), dtype=torch.bool)
        classes = ids = torch.zeros((0,), dtype=torch.int64)
        if annos:
            gt = utils.annotations_to_instances(annos, size, mask_format="bitmask")
            masks = gt.gt_masks.tensor.to(torch.bool)
            keep = masks.flatten(1).any(dim=1)  # cropped away / empty
            ids = torch.tensor([int(a["instance_id"]) for a in annos], dtype=torch.int64)
            masks, classes, ids = masks[keep], gt.gt_classes.to(torch.int64)[keep], ids[keep]
        return Instances(size, gt_classes=classes, gt_masks=masks, gt_ids=ids)
