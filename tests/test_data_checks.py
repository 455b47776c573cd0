"""Checked image reading, the test-time mapper and the evaluation ground-truth checks."""

from __future__ import annotations

import copy
import json
import logging
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_panoptic
from detectron2.data.detection_utils import read_image
from panopticapi.utils import id2rgb
from PIL import Image

from knet import add_knet_config
from knet.data.dataset_mappers import KNetTestDatasetMapper, read_image_checked
from knet.data.kinds import build_test_mapper
from knet.evaluation import (
    GroundTruthWarning,
    check_evaluation_dataset,
    check_evaluation_dataset_once,
    evaluation_tasks,
)

H, W = 24, 32  # size of the tiny ground-truth images


def _truncate(path, fraction=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])


def _corrupt_png_data(path):
    """Flip bytes inside the first IDAT chunk: the zlib stream breaks, the PNG structure not."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    start = data.find(b"IDAT") + 4 + 20
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    with open(path, "wb") as f:
        f.write(bytes(data))


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- read_image_checked
@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image_raises_naming_the_file(tmp_path, ext):
    path = tmp_path / f"broken.{ext}"
    Image.fromarray(_noise(64, 80)).save(path)
    _truncate(path)
    with pytest.raises(ValueError, match="broken") as e:
        read_image_checked(str(path), "RGB", "image")
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_image_checked(str(tmp_path / "absent.png"), "RGB", "image")


def test_corrupt_png_data_raises_where_detectron2_returns_garbage(tmp_path):
    path = tmp_path / "bad_data.png"
    good = np.zeros((64, 80, 3), np.uint8)
    good[:, :40] = 200
    good[10:30] = _noise(20, 80)
    Image.fromarray(good).save(path)
    np.testing.assert_array_equal(read_image_checked(str(path), "RGB", "image"), good)
    _corrupt_png_data(path)
    with pytest.raises(ValueError, match="bad_data.png"):
        read_image_checked(str(path), "RGB", "label PNG")
    # Detectron2's read_image: the EXIF step swallows the decode error, PIL then hands out the
    # partly decoded pixels
    try:
        silent = read_image(str(path), format="RGB")
    except OSError:
        pytest.skip("this Pillow / Detectron2 raises on the corrupt PNG by itself")
    assert silent.shape == good.shape and not np.array_equal(silent, good)


def test_exif_orientation_is_applied(tmp_path):
    raw = np.zeros((24, 40, 3), np.uint8)
    raw[:, :10] = (255, 0, 0)  # red left band
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(raw).save(path, exif=exif, quality=100)
    out = read_image_checked(str(path), "RGB", "image")
    assert out.shape == (40, 24, 3)
    np.testing.assert_array_equal(out, read_image(str(path), format="RGB"))
    assert out[:10, :, 0].mean() > 200 and out[-10:, :, 0].mean() < 50  # the band is on top
    bgr = read_image_checked(str(path), "BGR", "image")
    np.testing.assert_array_equal(bgr, out[:, :, ::-1])


# --------------------------------------------------------------------------- test mapper
@pytest.fixture
def cfg():
    c = get_cfg()
    add_knet_config(c)
    c.INPUT.MIN_SIZE_TEST = 200
    c.INPUT.MAX_SIZE_TEST = 1000
    c.DATALOADER.NUM_WORKERS = 0
    return c


@pytest.mark.parametrize("image_format", ["BGR", "RGB"])
def test_test_mapper_matches_detectron2(toy_root, cfg, image_format):
    cfg.INPUT.FORMAT = image_format
    rec = DatasetCatalog.get("knet_toy_val_panoptic_with_sem_seg")[0]
    ours = build_test_mapper(cfg)(rec)
    ref = DatasetMapper(cfg, False)(rec)
    assert isinstance(build_test_mapper(cfg), KNetTestDatasetMapper)
    assert ours["image"].dtype == torch.uint8 and ours["image"].shape[1] == 200
    assert torch.equal(ours["image"], ref["image"])
    # the same keys, except the label map DatasetMapper reads and inference does not use
    assert set(ours) == set(ref) - {"sem_seg"}
    for key in ("height", "width", "file_name", "image_id"):
        assert ours[key] == rec[key] == ref[key]
    assert "sem_seg_file_name" in rec  # the record itself is not modified


def test_test_mapper_rejects_a_corrupt_image(tmp_path, cfg):
    path = tmp_path / "image.png"
    Image.fromarray(_noise(H, W)).save(path)
    _corrupt_png_data(path)
    rec = {"file_name": str(path), "image_id": 1, "height": H, "width": W}
    with pytest.raises(ValueError, match="image.png"):
        build_test_mapper(cfg)(rec)


# --------------------------------------------------------------------------- tiny datasets
CATEGORIES = [
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 2, "name": "b", "isthing": 1},
    {"id": 3, "name": "c", "isthing": 0},
]
PAN_META = {
    "thing_dataset_id_to_contiguous_id": {1: 0, 2: 1},
    "stuff_dataset_id_to_contiguous_id": {3: 2},
}


class TinyGT:
    """Two images with panoptic and semantic ground truth in ``root``, registered on demand."""

    def __init__(self, root):
        self.root = root
        self.names = []
        for d in ("images", "panoptic", "semantic"):
            (root / d).mkdir()
        self.data = {"images": [], "annotations": [], "categories": copy.deepcopy(CATEGORIES)}
        for k, image_id in enumerate((1, 2)):
            stem = f"{image_id:012d}"
            Image.fromarray(_noise(H, W, k)).save(root / "images" / f"{stem}.jpg")
            ids = np.zeros((H, W), np.int64)  # 0: void band at the bottom
            ids[: H - 4, : W // 2] = 11 + k  # stuff
            ids[: H - 4, W // 2 :] = 21 + k  # thing
            ids[2:8, 2:8] = 31 + k  # thing
            Image.fromarray(id2rgb(ids)).save(root / "panoptic" / f"{stem}.png")
            sem = np.full((H, W), 255, np.uint8)
            sem[ids == 11 + k], sem[ids == 21 + k], sem[ids == 31 + k] = 2, 0, 1
            Image.fromarray(sem).save(root / "semantic" / f"{stem}.png")
            self.data["images"].append(
                {"id": image_id, "file_name": f"{stem}.jpg", "height": H, "width": W}
            )
            segments = [
                {"id": 11 + k, "category_id": 3, "iscrowd": 0},
                {"id": 21 + k, "category_id": 1, "iscrowd": 0},
                {"id": 31 + k, "category_id": 2, "iscrowd": 0},
            ]
            for s in segments:
                s["area"] = int((ids == s["id"]).sum())
            self.data["annotations"].append(
                {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments}
            )

    def png(self, i: int, kind: str = "panoptic") -> str:
        return str(self.root / kind / self.data["annotations"][i]["file_name"])

    def _name(self) -> str:
        name = f"knet_test_gt_{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        return name

    def panoptic(self) -> str:
        """Write the panoptic json and register it with Detectron2's own function."""
        json_file = self.root / "panoptic.json"
        json_file.write_text(json.dumps(self.data))
        name = self._name()
        register_coco_panoptic(
            name,
            PAN_META,
            str(self.root / "images"),
            str(self.root / "panoptic"),
            str(json_file),
            instances_json=str(self.root / "instances.json"),
        )
        return name

    def semantic(self, height_width: bool = True) -> str:
        records = []
        for im, ann in zip(self.data["images"], self.data["annotations"]):
            r = {
                "file_name": str(self.root / "images" / im["file_name"]),
                "sem_seg_file_name": str(self.root / "semantic" / ann["file_name"]),
                "image_id": im["id"],
            }
            if height_width:
                r.update(height=H, width=W)
            records.append(r)
        name = self._name()
        DatasetCatalog.register(name, lambda: copy.deepcopy(records))
        MetadataCatalog.get(name).set(
            evaluator_type="sem_seg", ignore_label=255, stuff_classes=["a", "b", "c"]
        )
        return name

    def instances(self, data) -> str:
        json_file = self.root / "instances.json"
        json_file.write_text(json.dumps(data))
        name = self._name()
        records = [
            {"file_name": str(self.root / "images" / im["file_name"]), "image_id": im["id"]}
            for im in self.data["images"]
        ]
        DatasetCatalog.register(name, lambda: copy.deepcopy(records))
        MetadataCatalog.get(name).set(evaluator_type="coco", json_file=str(json_file))
        return name


@pytest.fixture
def gt(tmp_path):
    tiny = TinyGT(tmp_path)
    yield tiny
    for name in tiny.names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _fails(name, *match, mode="error", tasks=None):
    with pytest.raises(ValueError) as e:
        check_evaluation_dataset(name, mode, tasks)
    message = str(e.value)
    assert name in message
    for m in match:
        assert m in message, message
    return message


# --------------------------------------------------------------------------- panoptic checks
def test_good_panoptic_ground_truth_passes(gt):
    name = gt.panoptic()
    check_evaluation_dataset(name)
    check_evaluation_dataset(name, "warn")
    # Detectron2's panoptic records have no semantic labels to evaluate mIoU with
    _fails(name, "no 'sem_seg_file_name'", tasks=("panoptic", "semantic"))


def test_missing_panoptic_png(gt):
    os.remove(gt.png(1))
    # "warn" relaxes segment-id mismatches only
    for mode in ("error", "warn"):
        _fails(gt.panoptic(), gt.png(1), "does not exist", mode=mode)


def test_corrupt_panoptic_png(gt):
    _truncate(gt.png(1))
    _fails(gt.panoptic(), gt.png(1), "cannot be decoded")
    _corrupt_png_data(gt.png(0))
    _fails(gt.panoptic(), gt.png(0), "cannot be decoded")


@pytest.mark.parametrize("json_images", [True, False])
def test_panoptic_png_size_mismatch(gt, json_images):
    if not json_images:  # then the size comes from the image file's header
        del gt.data["images"]
    Image.open(gt.png(1)).crop((0, 0, W - 2, H)).save(gt.png(1))
    _fails(gt.panoptic(), gt.png(1), f"is {W - 2}x{H} but the image is {W}x{H}")


def test_panoptic_annotation_without_image(gt):
    full = gt.panoptic()
    name = gt._name()
    records = DatasetCatalog.get(full)[:1]
    DatasetCatalog.register(name, lambda: copy.deepcopy(records))
    MetadataCatalog.get(name).set(**MetadataCatalog.get(full).as_dict() | {"name": name})
    _fails(name, gt.png(1), "image_id 2 is not an image of the dataset")


def test_panoptic_png_id_without_segments_info(gt):
    del gt.data["annotations"][1]["segments_info"][2]  # id 32 stays in the PNG
    name = gt.panoptic()
    _fails(name, gt.png(1), "without a segments_info entry: 32", "CHECK_GT")
    with pytest.warns(GroundTruthWarning) as record:
        check_evaluation_dataset(name, "warn")
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 of 2 panoptic PNGs" in message
    assert "1 ids in the PNGs without a segments_info entry, 0 segments_info ids" in message
    assert gt.png(1) in message and name in message


def test_segments_info_id_absent_from_panoptic_png(gt):
    for ann in gt.data["annotations"]:
        ann["segments_info"].append({"id": 999, "category_id": 1, "iscrowd": 0, "area": 5})
    name = gt.panoptic()
    _fails(name, gt.png(0), "segments_info ids absent from the PNG: 999")
    with pytest.warns(GroundTruthWarning) as record:
        check_evaluation_dataset(name, "warn")
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 of 2 panoptic PNGs" in message
    assert "0 ids in the PNGs without a segments_info entry, 2 segments_info ids" in message


@pytest.mark.parametrize(
    "damage, what",
    [
        (lambda d: d["annotations"][1]["segments_info"][0].pop("iscrowd"), "['iscrowd']"),
        (lambda d: d["annotations"][0].pop("segments_info"), "['segments_info']"),
        (lambda d: d["categories"][2].pop("isthing"), "['isthing']"),
        (lambda d: d.pop("categories"), "no 'categories' list"),
        (lambda d: d["annotations"][0]["segments_info"][1].update(category_id=7), "category_id 7"),
    ],
)
def test_panoptic_json_missing_key(gt, damage, what):
    damage(gt.data)
    _fails(gt.panoptic(), str(gt.root / "panoptic.json"), what)


# --------------------------------------------------------------------------- semantic checks
def test_good_semantic_ground_truth_passes(gt):
    check_evaluation_dataset(gt.semantic())
    check_evaluation_dataset(gt.semantic(height_width=False))  # sizes from the image headers


def test_missing_semantic_label(gt):
    os.remove(gt.png(1, "semantic"))
    _fails(gt.semantic(), gt.png(1, "semantic"), "does not exist")


def test_corrupt_semantic_label(gt):
    _truncate(gt.png(0, "semantic"))
    _fails(gt.semantic(), gt.png(0, "semantic"), "cannot be decoded")


@pytest.mark.parametrize("height_width", [True, False])
def test_semantic_label_size_mismatch(gt, height_width):
    Image.open(gt.png(1, "semantic")).crop((0, 0, W, H - 3)).save(gt.png(1, "semantic"))
    name = gt.semantic(height_width)
    _fails(name, gt.png(1, "semantic"), f"is {W}x{H - 3} but the image is {W}x{H}")


def test_missing_image(gt):
    path = gt.root / "images" / gt.data["images"][1]["file_name"]
    os.remove(path)
    _fails(gt.semantic(), str(path), "image does not exist")


# --------------------------------------------------------------------------- instance checks
def test_instances_json(gt):
    data = {"images": gt.data["images"], "annotations": [], "categories": CATEGORIES}
    check_evaluation_dataset(gt.instances(data))
    with pytest.warns(GroundTruthWarning, match="no 'annotations' list"):
        check_evaluation_dataset(gt.instances({k: data[k] for k in ("images", "categories")}))
    _fails(gt.instances({"images": data["images"]}), "instances.json", "categories")
    os.remove(gt.root / "instances.json")
    _fails(gt.names[-1], "instances.json", "does not exist")


# --------------------------------------------------------------------------- modes, trainer
def test_modes(gt, cfg, caplog):
    os.remove(gt.png(1))
    name = gt.panoptic()
    with pytest.raises(ValueError, match="CHECK_GT must be one of"):
        check_evaluation_dataset(name, "ignore")
    checks_logger = logging.getLogger("knet.evaluation")
    checks_logger.addHandler(caplog.handler)  # also when "knet" does not propagate
    try:
        check_evaluation_dataset(name, "off")  # skipped, with a log line
    finally:
        checks_logger.removeHandler(caplog.handler)
    assert any("not checked" in r.getMessage() for r in caplog.records)
    cfg.DATASETS.CHECK_GT = "off"
    check_evaluation_dataset_once(cfg, name)


def test_evaluation_tasks(gt, cfg):
    name = gt.panoptic()
    assert evaluation_tasks(cfg, name) == ("panoptic",)
    cfg.MODEL.KNET.TEST.INSTANCE_ON = cfg.MODEL.KNET.TEST.SEMANTIC_ON = True
    assert evaluation_tasks(cfg, name) == ("panoptic", "instance", "semantic")
    assert evaluation_tasks(cfg, gt.semantic()) == ("semantic",)


def test_trainer_test_loader_checks_once_then_uses_the_test_mapper(gt, cfg):
    from knet.engine import KNetTrainer

    good = gt.panoptic()
    batch = next(iter(KNetTrainer.build_test_loader(cfg, good)))
    ref = DatasetMapper(cfg, False)(DatasetCatalog.get(good)[0])
    assert torch.equal(batch[0]["image"], ref["image"])
    # checked once per process: a later defect is not looked for again
    _corrupt_png_data(gt.png(1))
    KNetTrainer.build_test_loader(cfg, good)
    # a bad dataset fails when its loader is built, before any inference
    bad = gt.panoptic()
    with pytest.raises(ValueError, match=os.path.basename(gt.png(1))):
        KNetTrainer.build_test_loader(cfg, bad)
