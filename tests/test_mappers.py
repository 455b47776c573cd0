"""K-Net training dataset mappers on toy records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from panoptic_conversion import read_panoptic_png
from PIL import Image

from knet import add_knet_config
from knet.data.dataset_mappers import (
    KNetInstanceDatasetMapper,
    KNetPanopticDatasetMapper,
    KNetSemanticDatasetMapper,
)
from knet.data.datasets import TOY_NUM_CLASSES, TOY_NUM_THING_CLASSES
from knet.data.kinds import DATASET_KINDS, build_train_mapper, mapper_name

FLIP = T.RandomFlip(prob=1.0)  # horizontal, always


@pytest.fixture(scope="module")
def records(toy_root):
    """One toy train image with a crowd segment and its three record flavours."""
    pan = DatasetCatalog.get("knet_toy_train_panoptic_with_sem_seg")
    rec = next(
        r
        for r in pan
        if any(s["iscrowd"] for s in r["segments_info"])
        and sum(s["isthing"] and not s["iscrowd"] for s in r["segments_info"]) >= 2
    )
    inst = next(r for r in DatasetCatalog.get("knet_toy_train") if r["image_id"] == rec["image_id"])
    sem = next(
        r for r in DatasetCatalog.get("knet_toy_sem_seg_train") if r["image_id"] == rec["image_id"]
    )
    return {"panoptic": rec, "instance": inst, "semantic": sem}


@pytest.fixture
def cfg():
    c = get_cfg()
    add_knet_config(c)
    c.INPUT.FORMAT = "RGB"
    c.INPUT.MIN_SIZE_TRAIN = (200,)
    c.INPUT.MAX_SIZE_TRAIN = 1000
    return c


def _expected_things(rec):
    ids = read_panoptic_png(rec["pan_seg_file_name"])
    segs = [s for s in rec["segments_info"] if s["isthing"] and not s["iscrowd"]]
    return ids, [s["category_id"] for s in segs], np.stack([ids == s["id"] for s in segs])


def _check_common(out, rec):
    assert out["image"].dtype == torch.uint8 and out["image"].shape[0] == 3
    for key in ("height", "width", "file_name", "image_id"):
        assert out[key] == rec[key]


def test_panoptic_mapper_without_augmentation(records):
    rec = records["panoptic"]
    out = KNetPanopticDatasetMapper(augmentations=[], image_format="RGB")(rec)
    _check_common(out, rec)
    image = read_image(rec["file_name"], format="RGB")
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), image)
    inst = out["instances"]
    assert inst.image_size == (rec["height"], rec["width"])
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_masks.dtype == torch.bool
    ids, classes, masks = _expected_things(rec)
    assert inst.gt_classes.tolist() == classes  # crowd segment excluded
    np.testing.assert_array_equal(inst.gt_masks.numpy(), masks)
    assert inst.gt_masks.sum(0).max() <= 1  # thing masks never overlap
    sem = out["sem_seg"]
    assert sem.dtype == torch.int64 and sem.shape == (rec["height"], rec["width"])
    np.testing.assert_array_equal(sem.numpy(), np.asarray(Image.open(rec["sem_seg_file_name"])))
    assert bool((sem[inst.gt_masks.any(0)] != 255).all())  # masks inside non-void
    assert bool((sem[torch.from_numpy(ids == 0)] == 255).all())
    crowd = next(s for s in rec["segments_info"] if s["iscrowd"])
    assert bool((sem[torch.from_numpy(ids == crowd["id"])] == crowd["category_id"]).all())
    for key in ("pan_seg_file_name", "segments_info", "sem_seg_file_name"):
        assert key not in out


def test_panoptic_mapper_flip(records):
    rec = records["panoptic"]
    plain = KNetPanopticDatasetMapper(augmentations=[], image_format="RGB")(rec)
    flipped = KNetPanopticDatasetMapper(augmentations=[FLIP], image_format="RGB")(rec)
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["instances"].gt_masks, plain["instances"].gt_masks.flip(-1))
    assert torch.equal(flipped["instances"].gt_classes, plain["instances"].gt_classes)
    assert torch.equal(flipped["sem_seg"], plain["sem_seg"].flip(-1))


def test_panoptic_mapper_from_config(records, cfg):
    rec = records["panoptic"]
    cfg.INPUT.DATASET_MAPPER_NAME = "knet_panoptic"
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper, KNetPanopticDatasetMapper)
    out = mapper(rec)
    h, w = out["image"].shape[1:]
    assert min(h, w) == 200
    assert (
        abs(max(h, w) / 200 - max(rec["height"], rec["width"]) / min(rec["height"], rec["width"]))
        < 0.02
    )
    inst = out["instances"]
    assert inst.image_size == (h, w) and inst.gt_masks.shape[1:] == (h, w)
    assert inst.gt_masks.flatten(1).any(1).all()  # empty masks dropped
    assert inst.gt_masks.sum(0).max() <= 1
    assert set(inst.gt_classes.tolist()) <= set(range(TOY_NUM_THING_CLASSES))
    sem = out["sem_seg"]
    assert set(sem.unique().tolist()) <= set(range(TOY_NUM_CLASSES)) | {255}
    for c, m in zip(inst.gt_classes, inst.gt_masks):
        assert bool((sem[m] == c).all())


def test_panoptic_mapper_drops_segments_cropped_away(records):
    rec = records["panoptic"]
    ids, classes, masks = _expected_things(rec)
    # a 1-pixel-high crop at row 0 can hold at most the things touching the top border
    crop = T.CropTransform(0, 0, rec["width"], 1)
    out = KNetPanopticDatasetMapper(augmentations=[crop], image_format="RGB")(rec)
    keep = masks[:, :1, :].any((1, 2))
    assert out["instances"].gt_classes.tolist() == [c for c, k in zip(classes, keep) if k]
    assert out["instances"].gt_masks.shape == (int(keep.sum()), 1, rec["width"])


def test_instance_mapper_matches_panoptic(records):
    rec = records["instance"]
    out = KNetInstanceDatasetMapper(augmentations=[], image_format="RGB")(records["instance"])
    _check_common(out, rec)
    assert "annotations" not in out and "sem_seg" not in out
    _, classes, masks = _expected_things(records["panoptic"])
    inst = out["instances"]
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_masks.dtype == torch.bool
    assert inst.gt_classes.tolist() == classes
    np.testing.assert_array_equal(inst.gt_masks.numpy(), masks)

    flipped = KNetInstanceDatasetMapper(augmentations=[FLIP], image_format="RGB")(rec)
    assert torch.equal(flipped["image"], out["image"].flip(-1))
    assert torch.equal(flipped["instances"].gt_masks, inst.gt_masks.flip(-1))


def test_instance_mapper_polygons_and_empty(records, cfg):
    rec = dict(records["instance"])
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    rec["annotations"] = [
        {
            "bbox": [10, 10, 20, 20],
            "bbox_mode": 1,
            "category_id": 2,
            "segmentation": square,
            "iscrowd": 0,
        },
        {
            "bbox": [0, 0, 5, 5],
            "bbox_mode": 1,
            "category_id": 1,
            "segmentation": square,
            "iscrowd": 1,
        },
    ]
    out = KNetInstanceDatasetMapper(augmentations=[], image_format="BGR")(rec)
    assert out["instances"].gt_classes.tolist() == [2]
    assert int(out["instances"].gt_masks[0].sum()) in range(380, 441)  # ~20x20 square
    rgb = KNetInstanceDatasetMapper(augmentations=[], image_format="RGB")(rec)["image"]
    assert torch.equal(out["image"], rgb.flip(0))  # BGR = channel-reversed RGB
    rec["annotations"] = []
    cfg.INPUT.DATASET_MAPPER_NAME = "knet_instance"
    empty = build_train_mapper(cfg)(rec)["instances"]
    assert empty.gt_classes.shape == (0,) and empty.gt_masks.shape[0] == 0
    assert empty.gt_masks.dtype == torch.bool


def test_semantic_mapper(records):
    rec = records["semantic"]
    png = np.asarray(Image.open(rec["sem_seg_file_name"]))
    out = KNetSemanticDatasetMapper(augmentations=[], image_format="RGB")(rec)
    _check_common(out, rec)
    assert "instances" not in out
    assert out["sem_seg"].dtype == torch.int64
    np.testing.assert_array_equal(out["sem_seg"].numpy(), png)
    flipped = KNetSemanticDatasetMapper(augmentations=[FLIP], image_format="RGB")(rec)
    assert torch.equal(flipped["sem_seg"], out["sem_seg"].flip(-1))
    assert torch.equal(flipped["image"], out["image"].flip(-1))


def test_semantic_mapper_from_config_crop_color(records, cfg):
    rec = records["semantic"]
    cfg.INPUT.DATASET_MAPPER_NAME = "knet_semantic"
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (150, 120)
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.75
    cfg.INPUT.COLOR_AUG_SSD = True
    mapper = build_train_mapper(cfg)
    names = [type(a).__name__ for a in mapper.augmentations.augs]
    assert names[0] == "ResizeShortestEdge" and names[-1] == "RandomFlip"
    assert "RandomCrop_CategoryAreaConstraint" in names
    out = mapper(rec)
    assert out["image"].shape == (3, 150, 120) and out["sem_seg"].shape == (150, 120)
    assert set(out["sem_seg"].unique().tolist()) <= set(range(TOY_NUM_CLASSES)) | {255}


def test_build_train_mapper_names(cfg):
    assert set(map(mapper_name, DATASET_KINDS)) == {
        "knet_panoptic",
        "knet_instance",
        "knet_semantic",
        "knet_video_panoptic",
        "knet_video_instance",
    }
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_panoptic"
    names = "knet_instance, knet_panoptic, knet_semantic, knet_video_instance, knet_video_panoptic"
    with pytest.raises(ValueError, match=names):
        build_train_mapper(cfg)
