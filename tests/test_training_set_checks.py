"""The training-set check before training: every image and mask, one report, cached."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from custom_data import HEIGHT, WIDTH, make_coco_instances, make_sem_seg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg, register_coco_instances
from PIL import Image

from knet.engine import KNetTrainer, get_knet_cfg
from knet.evaluation import (
    GroundTruthWarning,
    TrainingSetError,
    check_evaluation_dataset,
    check_training_dataset,
    ground_truth,
)

REPO = Path(__file__).resolve().parents[1]
INSTANCE_CPU = str(REPO / "configs/custom/knet_R18_cpu_instance.yaml")


class TinyCoco:
    """A COCO instances json over 4 images in ``root``, damaged by the test, then registered."""

    def __init__(self, root: Path):
        self.json_file, self.image_root = make_coco_instances(root, "train", [0, 1, 2, 3])
        self.data = json.loads(Path(self.json_file).read_text())
        self.names: list[str] = []

    def image(self, i: int) -> str:
        return os.path.join(self.image_root, self.data["images"][i]["file_name"])

    def ann(self, i: int) -> dict:
        return self.data["annotations"][i]

    def register(self) -> str:
        Path(self.json_file).write_text(json.dumps(self.data))
        name = f"knet_test_train_{uuid.uuid4().hex[:8]}"
        register_coco_instances(name, {}, self.json_file, self.image_root)
        self.names.append(name)
        return name


@pytest.fixture
def coco(tmp_path):
    tiny = TinyCoco(tmp_path)
    yield tiny
    for name in tiny.names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _fails(name: str, *match: str, mode: str = "error") -> str:
    with pytest.raises(TrainingSetError) as e:
        check_training_dataset(name, mode)
    message = str(e.value)
    for m in (name, *match):
        assert m in message, message
    return message


def test_good_sets_pass_and_semantic_labels(coco, tmp_path):
    check_training_dataset(coco.register())
    images, labels, _ = make_sem_seg(tmp_path / "sem", "train", [0, 1])
    name = f"knet_test_sem_{uuid.uuid4().hex[:8]}"
    records = load_sem_seg(labels, images, "png", "png")
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    MetadataCatalog.get(name).set(evaluator_type="sem_seg", stuff_classes=["a", "b", "c", "d"])
    coco.names.append(name)
    check_training_dataset(name)
    first, second = (os.path.join(labels, f) for f in sorted(os.listdir(labels)))
    os.remove(first)
    Image.open(second).convert("1").save(second)  # a 1-bit PNG: bool, not class ids
    _fails(name, "bad label file: 2", "does not exist", "holds bool values")


def test_polygon_of_two_points(coco):
    coco.ann(1)["segmentation"] = [[1, 1, 5, 5]]
    name = coco.register()
    _fails(name, "polygon of fewer than 3 points: 1", f"{coco.image(1)} annotation 2", "[4]")
    with pytest.warns(GroundTruthWarning, match="polygon of fewer than 3 points"):
        check_training_dataset(name, "warn")  # Detectron2's loader drops it: trains
    # the evaluation check of the same json names the annotation, not pycocotools' TypeError
    with pytest.raises(ValueError, match="annotation 2 of image_id 2: polygon of fewer"):
        check_evaluation_dataset(name)


def test_zero_area_polygon_is_warned_about(coco):
    coco.ann(0)["segmentation"] = [[2, 2, 10, 2, 20, 2]]  # three points on a line
    with pytest.warns(GroundTruthWarning, match="zero-area mask: 1") as record:
        check_training_dataset(coco.register())  # "error": training skips empty masks
    assert f"{coco.image(0)} annotation 1" in str(record[0].message)


def test_bbox_only_annotation(coco):
    del coco.ann(2)["segmentation"]
    name = coco.register()
    for mode in ("error", "warn"):
        _fails(name, "annotation without segmentation: 1", "annotation 3: a box only", mode=mode)


def test_missing_image(coco):
    os.remove(coco.image(3))
    _fails(coco.register(), "missing image: 1", coco.image(3))


def test_image_size_mismatch(coco, tmp_path):
    coco.data["images"][1]["height"] = HEIGHT + 4
    _fails(coco.register(), coco.image(1), f"{WIDTH}x{HEIGHT}, record {WIDTH}x{HEIGHT + 4}")
    # an EXIF orientation that turns the image explains a swapped size
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(coco.image(2)).save(coco.image(2), exif=exif)
    _fails(coco.register(), coco.image(2), "EXIF orientation turns it by 90 degrees")


def test_rle_of_the_wrong_size(coco):
    mask = np.zeros((HEIGHT // 2, WIDTH), np.uint8, order="F")
    mask[2:6, 2:6] = 1
    rle = mask_util.encode(mask)
    coco.ann(0)["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    _fails(coco.register(), "RLE size differs from the image: 1", f"image [{HEIGHT}, {WIDTH}]")


def test_all_crowd_set(coco):
    for ann in coco.data["annotations"]:
        ann["iscrowd"] = 1
    n = len(coco.data["annotations"])
    _fails(coco.register(), "no trainable annotation", f"4 images with {n} annotations, all")


def test_empty_set(coco):
    name = coco.register()
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, list)  # the metadata (json_file, image_root) stays
    _fails(name, "empty training set", "its loader gave no record", coco.json_file)


def test_one_report_lists_every_problem(coco):
    os.remove(coco.image(0))
    coco.ann(2)["segmentation"] = [[1, 1, 5, 5, 9]]
    coco.ann(3)["segmentation"] = [[1, 1, 5, 5]]
    del coco.ann(4)["segmentation"]
    coco.ann(5)["segmentation"] = [[3, 3, 3, 3, 3, 3]]  # zero area: listed too
    message = _fails(coco.register(), "missing image: 1", "polygon of fewer than 3 points: 2",
                     "annotation without segmentation: 1", "zero-area mask: 1")  # fmt: skip
    assert len(message.splitlines()) == 1 + 4 + 1  # title, 4 kinds, the modes


def test_result_is_cached(coco, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=ground_truth.__name__)
    os.remove(coco.image(1))
    name = coco.register()
    reads = []
    read = ground_truth.read_image_checked
    monkeypatch.setattr(ground_truth, "read_image_checked", lambda *a: reads.append(a) or read(*a))
    first = _fails(name, "missing image: 1")
    assert len(reads) == 4
    logging.getLogger("knet.evaluation").addHandler(caplog.handler)  # also if "knet" is quiet
    try:
        start = time.perf_counter()
        assert _fails(name) == first
        assert time.perf_counter() - start < 1.0
    finally:
        logging.getLogger("knet.evaluation").removeHandler(caplog.handler)
    assert len(reads) == 4  # nothing read again
    assert any("checked before" in r.getMessage() for r in caplog.records)
    Image.new("RGB", (WIDTH, HEIGHT)).save(coco.image(1))  # a changed file: checked again
    check_training_dataset(name)
    assert len(reads) == 8


def test_off_mode_skips_the_check(coco, caplog):
    os.remove(coco.image(0))
    name = coco.register()
    logging.getLogger("knet.evaluation").addHandler(caplog.handler)
    try:
        check_training_dataset(name, "off")
    finally:
        logging.getLogger("knet.evaluation").removeHandler(caplog.handler)
    assert any("is not checked" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="CHECK_GT must be one of"):
        check_training_dataset(name, "ignore")


def test_trainer_fails_before_training(coco, tmp_path):
    del coco.ann(1)["segmentation"]
    os.remove(coco.image(2))
    name = coco.register()
    opts = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu",
            "MODEL.KNET.NUM_PROPOSALS", "4", "MODEL.KNET.NUM_STAGES", "1",
            "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]", "DATALOADER.NUM_WORKERS", "0",
            "MODEL.KNET.TEST.PANOPTIC_ON", "False", "OUTPUT_DIR", str(tmp_path)]  # fmt: skip
    with pytest.raises(TrainingSetError, match="missing image: 1") as e:
        KNetTrainer(get_knet_cfg(INSTANCE_CPU, opts))
    assert "annotation without segmentation: 1" in str(e.value)
