"""Video data: KITTI-STEP / VIPSeg / YouTube-VIS loaders and label decoding, key/reference
pairing, the pair mapper's shared augmentation and filters, and the toy video generator."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from PIL import Image
from scripts import load_script

import knet  # noqa: F401  (registers the datasets)
from knet import add_knet_config
from knet.data.dataset_mappers import KNetVideoPanopticDatasetMapper
from knet.data.datasets import (
    KITTI_STEP_CATEGORIES,
    TOY_VIDEO_CATEGORIES,
    TOY_VIDEO_COMMAND,
    YTVIS_2019_CLASSES,
    pair_with_references,
    read_panoptic_frame,
    register_video_dataset,
    require_toy_video_dataset,
)
from knet.data.datasets.video import LabelCodec, clip_records, load_kitti_step_frames
from knet.data.kinds import (
    build_test_mapper,
    build_train_mapper,
    class_layout,
    dataset_classes,
    kind_of,
)
from knet.evaluation.video import YouTubeVISResultsWriter

toy_video = load_script("tools/make_toy_video_dataset.py")

_NAMES: set[str] = set()


def _register(name: str, *args, **kwargs) -> str:
    """Register a test dataset under a fresh name (the catalog is process-wide)."""
    name = f"{name}_{len(_NAMES)}"
    _NAMES.add(name)
    register_video_dataset(name, *args, **kwargs)
    return name


def _kitti_label(cls: np.ndarray, inst: np.ndarray) -> np.ndarray:
    return np.stack([cls, inst // 256, inst % 256], -1).astype(np.uint8)


def _write_kitti(folder: Path, seq: int, frame: int, image: np.ndarray, label: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{seq:06d}_{frame:06d}"
    Image.fromarray(image).save(f"{stem}_leftImg8bit.png")
    Image.fromarray(label).save(f"{stem}_panoptic.png")


# 4 x 6 KITTI-STEP label: road 0, sky 10, rider 12, person 11 (instance 1), car 13 (instance
# 258 = G 1, B 2), a crowd car region (instance 0), void 255
_K_CLS = np.array(
    [
        [10, 10, 10, 10, 255, 255],
        [11, 11, 13, 13, 13, 12],
        [11, 11, 13, 13, 13, 12],
        [0, 0, 0, 13, 13, 0],
    ]
)
_K_INST = np.array(
    [
        [0, 0, 0, 0, 0, 0],
        [1, 1, 258, 258, 258, 0],
        [1, 1, 258, 258, 258, 0],
        [0, 0, 0, 0, 0, 0],
    ]
)
# model order: person 0, car 1, road 2, ..., sky 12, rider 13
_K_SEMANTIC = np.array(
    [
        [12, 12, 12, 12, 255, 255],
        [0, 0, 1, 1, 1, 13],
        [0, 0, 1, 1, 1, 13],
        [2, 2, 2, 1, 1, 2],
    ]
)


@pytest.fixture()
def kitti_root(tmp_path):
    """KITTI-STEP layout: val with sequence 3 (frames 0..2) and sequence 1 (frames 0..1)."""
    folder = tmp_path / "video_sequence" / "val"
    rng = np.random.default_rng(0)
    for seq, frames in ((3, 3), (1, 2)):
        for f in range(frames):
            image = rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)
            _write_kitti(folder, seq, f, image, _kitti_label(_K_CLS, _K_INST))
    return tmp_path


def test_kitti_step_metadata_label_shift():
    name = "kitti_step_train"
    assert kind_of(name) == "video_panoptic" and class_layout("video_panoptic") == "panoptic"
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "video_panoptic" and meta.ignore_label == 255
    classes = dataset_classes(name, load=False)
    assert classes.class_names[:4] == ("person", "car", "road", "sidewalk")
    assert classes.class_names[12:14] == ("sky", "rider")
    assert classes.num_thing_classes == 2 and classes.num_classes == 19
    assert meta.thing_dataset_id_to_contiguous_id == {11: 0, 13: 1}
    assert [c["name"] for c in KITTI_STEP_CATEGORIES if c["isthing"]] == ["person", "car"]
    # stuff train id c -> c - #{thing ids < c} + 2
    stuff = meta.stuff_dataset_id_to_contiguous_id
    for c in range(19):
        if c not in (11, 13):
            assert stuff[c] == c - sum(t < c for t in (11, 13)) + 2
    vip = dataset_classes("vipseg_val", load=False)
    assert vip.num_classes == 124 and vip.num_thing_classes == 58
    assert vip.class_names[0] == "door" and vip.class_names[58] == "wall"
    yt = dataset_classes("ytvis_2019_train", load=False)
    assert kind_of("ytvis_2019_train") == "video_instance"
    assert yt.class_names == tuple(YTVIS_2019_CLASSES) and len(yt.class_names) == 40


def test_kitti_step_loader_and_ground_truth(kitti_root):
    name = _register("kitti_test", "kitti_step", str(kitti_root), "val")
    records = DatasetCatalog.get(name)
    assert [(r["video_id"], r["frame_index"]) for r in records] == [
        ("000001", 0),
        ("000001", 1),
        ("000003", 0),
        ("000003", 1),
        ("000003", 2),
    ]
    assert [r["image_id"] for r in records] == [10000, 10001, 30000, 30001, 30002]
    r = records[2]
    assert (r["height"], r["width"], r["label_format"]) == (4, 6, "kitti_step")
    assert r["label_file_name"].endswith("000003_000000_panoptic.png")
    assert "reference" not in r  # a val split: plain frames
    semantic, instance = read_panoptic_frame(r)
    assert semantic.dtype == instance.dtype == np.int64
    np.testing.assert_array_equal(semantic, _K_SEMANTIC)
    # instance ids on things only; the crowd car region (instance 0) stays 0
    expected = np.where(np.isin(_K_CLS, (11, 13)), _K_INST, 0)
    np.testing.assert_array_equal(instance, expected)
    assert instance[3, 3] == 0 and semantic[3, 3] == 1


def test_kitti_step_test_split_and_missing_labels(kitti_root):
    folder = kitti_root / "video_sequence" / "val"
    os.remove(folder / "000001_000001_panoptic.png")
    with pytest.raises(FileNotFoundError, match="000001_000001_leftImg8bit"):
        load_kitti_step_frames(str(folder))
    for label in folder.glob("*_panoptic.png"):
        label.unlink()
    records = load_kitti_step_frames(str(folder))  # the test split: images only
    assert len(records) == 5 and not any("label_file_name" in r for r in records)
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        load_kitti_step_frames(str(kitti_root))


def test_kitti_step_custom_classes(tmp_path):
    """The toy's own classes: ids interleave things (1, 3) and stuff (0, 2, 4)."""
    folder = tmp_path / "video_sequence" / "train"
    cls = np.array([[0, 1, 2, 3, 4, 255]])
    inst = np.array([[0, 5, 0, 7, 0, 0]])
    image = np.zeros((1, 6, 3), np.uint8)
    for f in range(3):
        _write_kitti(folder, 0, f, image, _kitti_label(cls, inst))
    name = _register(
        "toy_layout",
        "kitti_step",
        str(tmp_path),
        "train",
        pairs=False,
        categories=TOY_VIDEO_CATEGORIES,
    )
    assert MetadataCatalog.get(name).stuff_classes == ["disc", "block", "ground", "sky", "wall"]
    records = DatasetCatalog.get(name)
    semantic, instance = read_panoptic_frame(records[0])
    np.testing.assert_array_equal(semantic, [[2, 0, 3, 1, 4, 255]])
    np.testing.assert_array_equal(instance, [[0, 5, 0, 7, 0, 0]])
    # the default KITTI-STEP classes read the same file otherwise (0 = road -> 2, 1 = sidewalk)
    default, _ = read_panoptic_frame(records[0], MetadataCatalog.get("kitti_step_val"))
    np.testing.assert_array_equal(default, [[2, 3, 4, 5, 6, 255]])
    with pytest.raises(ValueError, match="unknown to the dataset"):  # class 7 is not a toy class
        LabelCodec(MetadataCatalog.get(name), "kitti_step").decode(
            _kitti_label(np.array([[7]]), np.array([[0]]))
        )


def _write_vipseg(root: Path, video: str, raws: list[np.ndarray]) -> None:
    for sub in ("images", "panomasks"):
        (root / sub / video).mkdir(parents=True, exist_ok=True)
    for f, raw in enumerate(raws):
        stem = f"{f * 5:08d}"  # VIPSeg frame names are not contiguous numbers
        image = np.full((*raw.shape, 3), 100, np.uint8)
        Image.fromarray(image).save(root / "images" / video / f"{stem}.jpg")
        Image.fromarray(raw.astype(np.uint16)).save(root / "panomasks" / video / f"{stem}.png")


def test_vipseg_decode(tmp_path):
    # raw values: 0 and 200 void; 1 = wall (class 0); 29 = sky (class 28); person (class 60)
    # instance 1 = 61 * 100 + 1; car (class 48) instance 0 = 4900
    raw = np.array([[0, 200, 1, 29], [6101, 6101, 4900, 4900]])
    _write_vipseg(tmp_path, "vid_b", [raw, raw])
    _write_vipseg(tmp_path, "vid_a", [raw])
    (tmp_path / "val.txt").write_text("vid_b\nvid_a\n")
    name = _register("vipseg_test", "vipseg", str(tmp_path), "val")
    records = DatasetCatalog.get(name)
    assert [(r["video_id"], r["frame_index"], r["image_id"]) for r in records] == [
        ("vid_b", 0, 0),
        ("vid_b", 1, 1),
        ("vid_a", 0, 10000),
    ]
    semantic, instance = read_panoptic_frame(records[0])
    # things first (sorted original ids: car is the 10th thing, person the 18th); stuff from 58
    # (wall 58; sky: 24 stuff ids below 28 -> 82)
    np.testing.assert_array_equal(semantic, [[255, 255, 58, 82], [17, 17, 9, 9]])
    # 0-based VIPSeg instances + 1, as the official evaluator
    np.testing.assert_array_equal(instance, [[0, 0, 0, 0], [2, 2, 1, 1]])
    codec = LabelCodec(MetadataCatalog.get(name), "vipseg")
    rgb = np.asarray(Image.open(records[0]["label_file_name"]))
    assert rgb.dtype == np.uint16  # a 16-bit PNG, read without clipping
    from knet.data.datasets.video import encode_label_rgb

    encoded = np.asarray(encode_label_rgb(Image.open(records[0]["label_file_name"]), "vipseg"))
    _, _, thing, identity = codec.decode(encoded)
    # official identity: stuff-first class index (things 66 + rank) * 1000 + raw instance
    assert identity[1, 0] == (66 + 17) * 1000 + 1 and identity[1, 2] == (66 + 9) * 1000
    np.testing.assert_array_equal(thing, [[False] * 4, [True] * 4])
    with pytest.raises(ValueError, match="invalid value"):
        codec.decode(np.array([[[200, 0, 0]]], np.uint8))  # 51200 -> class 511


def _polygon_square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _ytvis_json(tmp_path: Path) -> Path:
    h, w = 8, 10
    images, annotations = [], []
    ann_id = 1
    # video 7 with frames 2, 0, 1 listed out of order; video 3 with one frame
    for image_id, (video, frame) in enumerate([(7, 2), (7, 0), (3, 0), (7, 1)], start=1):
        name = f"v{video}/{frame:05d}.jpg"
        (tmp_path / "JPEGImages" / f"v{video}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "JPEGImages" / name)
        images.append(
            {"id": image_id, "file_name": name, "height": h, "width": w, "frame_id": frame}
            | {"video_id": video}
        )
        mask = np.zeros((h, w), np.uint8, order="F")
        mask[1:4, 1 + frame : 4 + frame] = 1
        rle = mask_util.encode(mask)
        rle["counts"] = rle["counts"].decode()
        # instance 11 (category 8 = dog) as RLE, instance 12 (category 1 = person) as a polygon,
        # and a crowd region (category 1)
        annotations += [
            {"id": ann_id, "image_id": image_id, "video_id": video, "instance_id": 11}
            | {"category_id": 8, "segmentation": rle, "bbox": [1 + frame, 1, 3, 3], "iscrowd": 0},
            {"id": ann_id + 1, "image_id": image_id, "video_id": video, "instance_id": 12}
            | {"category_id": 1, "segmentation": _polygon_square(5, 4, 9, 8)}
            | {"bbox": [5, 4, 4, 4], "iscrowd": 0},
            {"id": ann_id + 2, "image_id": image_id, "video_id": video, "instance_id": 13}
            | {"category_id": 1, "segmentation": _polygon_square(0, 5, 3, 8)}
            | {"bbox": [0, 5, 3, 3], "iscrowd": 1},
        ]
        ann_id += 3
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(YTVIS_2019_CLASSES)]
    videos = [{"id": 7, "name": "v7"}, {"id": 3, "name": "v3"}]
    data = {"videos": videos, "images": images, "annotations": annotations}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data | {"categories": categories}))
    return path


def test_ytvis_loader_and_mapper(tmp_path):
    json_file = _ytvis_json(tmp_path)
    image_root = str(tmp_path / "JPEGImages")
    kw = {"json_file": str(json_file), "image_root": image_root}
    name = _register("ytvis_test", "ytvis", str(tmp_path), "valid", **kw)
    records = DatasetCatalog.get(name)
    assert [(r["video_id"], r["frame_index"]) for r in records] == [
        ("v3", 0),
        ("v7", 0),
        ("v7", 1),
        ("v7", 2),
    ]
    anns = records[1]["annotations"]
    assert [(a["category_id"], a["instance_id"], a["iscrowd"]) for a in anns] == [
        (7, 11, 0),
        (0, 12, 0),
        (0, 13, 1),
    ]
    train = _register(
        "ytvis_test_train", "ytvis", str(tmp_path), "x", pairs=True, offsets=(1,), **kw
    )
    pairs = DatasetCatalog.get(train)  # "x" is not a training split name: pairs as asked
    assert [(p["frame_index"], p["reference"]["frame_index"]) for p in pairs] == [(0, 1), (1, 2)]
    assert all(p["reference"]["video_id"] == p["video_id"] == "v7" for p in pairs)
    mapper = KNetVideoPanopticDatasetMapper(augmentations=[], image_format="RGB")
    pair = {**records[1], "reference": records[3]}  # frames 0 and 2 of v7
    out = mapper(pair)
    assert "sem_seg" not in out
    for frame, o in ((0, out), (2, out["reference"])):
        inst = o["instances"]
        assert inst.gt_ids.tolist() == [11, 12]  # the crowd annotation is left out
        assert inst.gt_classes.tolist() == [7, 0]
        expected = np.zeros((8, 10), bool)
        expected[1:4, 1 + frame : 4 + frame] = True
        np.testing.assert_array_equal(inst.gt_masks[0].numpy(), expected)
        assert inst.gt_masks[1].sum() > 9  # the polygon, rasterised


def test_clip_records_windows_and_whole_videos():
    """Training clips: every frame's window f-2 .. f+2 when all 5 frames exist (the official
    uniform sampler); inference: one clip per video, frames in order."""
    frames = [
        {"video_id": v, "frame_index": i, "dataset_video_id": n}
        for v, n, length in (("a", 1, 7), ("b", 2, 4))
        for i in range(length)
    ]
    clips = clip_records(frames, 5)
    assert [(c["video_id"], [f["frame_index"] for f in c["frames"]]) for c in clips] == [
        ("a", [0, 1, 2, 3, 4]),
        ("a", [1, 2, 3, 4, 5]),
        ("a", [2, 3, 4, 5, 6]),
    ]  # video b has 4 frames: no full window
    videos = clip_records(list(reversed(frames)))
    assert [(c["video_id"], c["dataset_video_id"], len(c["frames"])) for c in videos] == [
        ("b", 2, 4),
        ("a", 1, 7),
    ]
    assert [f["frame_index"] for f in videos[1]["frames"]] == list(range(7))
    assert clip_records(frames, 4)[0]["frames"][0]["frame_index"] == 0  # f-2 .. f+1


def test_ytvis_clips_mapped_with_one_transform_and_written_as_results(tmp_path):
    json_file = _ytvis_json(tmp_path)
    kw = {"json_file": str(json_file), "image_root": str(tmp_path / "JPEGImages")}
    train = _register("ytvis_clips", "ytvis", str(tmp_path), "train", clip_frames=3, **kw)
    (clip,) = DatasetCatalog.get(train)  # video v7 has 3 frames, v3 one
    assert MetadataCatalog.get(train).clip_frames == 3 and not MetadataCatalog.get(train).pairs
    mapper = KNetVideoPanopticDatasetMapper(augmentations=[T.RandomFlip(1.0)], image_format="RGB")
    out = mapper(clip)
    assert out["video_id"] == "v7" and out["dataset_video_id"] == 7 and len(out["frames"]) == 3
    for frame, o in enumerate(out["frames"]):
        expected = np.zeros((8, 10), bool)
        expected[1:4, 1 + frame : 4 + frame] = True
        np.testing.assert_array_equal(o["instances"].gt_masks[0].numpy(), expected[:, ::-1])
        assert o["instances"].gt_ids.tolist() == [11, 12]
    for frame in clip["frames"]:
        frame["annotations"] = []
    assert mapper(clip) is None  # no object in any frame

    val = _register("ytvis_videos", "ytvis", str(tmp_path), "valid", clip_frames=3, **kw)
    videos = DatasetCatalog.get(val)
    assert [(v["video_id"], len(v["frames"])) for v in videos] == [("v3", 1), ("v7", 3)]
    cfg = get_cfg()
    add_knet_config(cfg)
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", "16", "INPUT.MAX_SIZE_TEST", "100"])
    inputs = build_test_mapper(cfg)(videos[1])
    assert [f["image"].shape for f in inputs["frames"]] == [(3, 16, 20)] * 3
    assert "annotations" not in inputs["frames"][0]

    writer = YouTubeVISResultsWriter(val, str(tmp_path / "out"))
    masks = torch.zeros(2, 3, 8, 10, dtype=torch.bool)
    masks[0, 0, 1:3, 2:5] = masks[0, 2, 4:6, 0:2] = True  # absent from frame 1
    masks[1, :, 5:8, 5:9] = True
    outputs = {"pred_scores": torch.tensor([0.9, 0.4]), "pred_labels": torch.tensor([7, 0])}
    writer.process([videos[1]], [outputs | {"pred_masks": masks}])
    assert writer.evaluate() == {}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["video_id"], r["category_id"], r["score"]) for r in results] == [
        (7, 8, pytest.approx(0.9)),
        (7, 1, pytest.approx(0.4)),
    ]
    assert results[0]["segmentations"][1] is None
    for result, tube in zip(results, masks):
        for rle, mask in zip(result["segmentations"], tube):
            if rle is not None:
                np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), mask.numpy())


def test_ytvis_official_json(tmp_path):
    """The official YouTube-VIS json: per-track annotations, uncompressed RLE, None where the
    object is absent."""
    h, w = 6, 8
    masks = [np.zeros((h, w), np.uint8, order="F") for _ in range(3)]
    masks[0][1:3, 1:3] = 1
    masks[2][2:5, 4:7] = 1

    def uncompressed(m):  # column-major run lengths, starting with zeros
        flat = np.asfortranarray(m).flatten(order="F")
        runs, value, count = [], 0, 0
        for v in flat:
            if v != value:
                runs.append(count)
                value, count = v, 0
            count += 1
        return {"counts": runs + [count], "size": [h, w]}

    segmentations = [uncompressed(masks[0]), None, uncompressed(masks[2])]
    data = {
        "videos": [
            {"id": 5, "height": h, "width": w, "file_names": [f"v5/{i}.jpg" for i in range(3)]}
        ],
        "annotations": [
            {"id": 40, "video_id": 5, "category_id": 3, "iscrowd": 0}
            | {"segmentations": segmentations, "bboxes": [[1, 1, 2, 2], None, [4, 2, 3, 3]]}
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(YTVIS_2019_CLASSES)],
    }
    (tmp_path / "train.json").write_text(json.dumps(data))
    for i in range(3):
        (tmp_path / "v5").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "v5" / f"{i}.jpg")
    kw = {"json_file": str(tmp_path / "train.json"), "image_root": str(tmp_path)}
    name = _register("ytvis_official", "ytvis", str(tmp_path), "valid", **kw)
    records = DatasetCatalog.get(name)
    assert [(r["video_id"], r["frame_index"], r["image_id"]) for r in records] == [
        ("5", 0, 50000),
        ("5", 1, 50001),
        ("5", 2, 50002),
    ]
    assert [len(r["annotations"]) for r in records] == [1, 0, 1]
    assert records[0]["annotations"][0]["category_id"] == 2  # parrot, id 3 -> 2
    mapper = KNetVideoPanopticDatasetMapper(augmentations=[], image_format="RGB")
    out = mapper({**records[0], "reference": records[2]})
    for o, m in ((out, masks[0]), (out["reference"], masks[2])):
        assert o["instances"].gt_ids.tolist() == [40]
        np.testing.assert_array_equal(o["instances"].gt_masks[0].numpy(), m.astype(bool))
    assert mapper({**records[0], "reference": records[1]}) is None  # absent in the reference


def _frames(videos: dict[str, int]) -> list[dict]:
    return [
        {"file_name": f"{v}/{i}.png", "video_id": v, "frame_index": i}
        for v, n in videos.items()
        for i in range(n)
    ]


def test_pairing_drawn_once_by_seed():
    frames = _frames({"a": 6, "b": 3, "c": 1})
    pairs = pair_with_references(frames, seed=5)
    assert pairs == pair_with_references(frames, seed=5)  # reproducible
    # the official draw: one offset per frame, in frame order, from one seeded generator
    rng = random.Random(5)
    offsets = [rng.choice([-2, -1, 1, 2]) for _ in frames]
    expected = [
        (f["video_id"], f["frame_index"], f["frame_index"] + o)
        for f, o in zip(frames, offsets)
        if 0 <= f["frame_index"] + o < {"a": 6, "b": 3, "c": 1}[f["video_id"]]
    ]
    got = [(p["video_id"], p["frame_index"], p["reference"]["frame_index"]) for p in pairs]
    assert got == expected and len(got) < len(frames)
    assert all(p["reference"]["video_id"] == p["video_id"] for p in pairs)
    assert not any(p["video_id"] == "c" for p in pairs)  # a 1-frame video has no reference
    seeds = {
        tuple(x["reference"]["frame_index"] for x in pair_with_references(frames, seed=s))
        for s in range(5)
    }
    assert len(seeds) > 1  # the seed matters
    # out-of-range references are dropped, never clamped
    forward = pair_with_references(frames, offsets=(1,))
    assert [(p["video_id"], p["frame_index"]) for p in forward] == [("a", i) for i in range(5)] + [
        ("b", 0),
        ("b", 1),
    ]
    assert pair_with_references(frames, offsets=(7,)) == []
    assert "reference" not in frames[0]  # inputs untouched


def test_registered_training_split_pairs(kitti_root):
    os.rename(kitti_root / "video_sequence" / "val", kitti_root / "video_sequence" / "train")
    name = _register("kitti_pairs", "kitti_step", str(kitti_root), "train", seed=1)
    first, second = DatasetCatalog.get(name), DatasetCatalog.get(name)
    assert first == second and first  # drawn once per load, the same draw every load
    assert all("reference" in p for p in first)
    frames = load_kitti_step_frames(str(kitti_root / "video_sequence" / "train"), name)
    assert first == pair_with_references(frames, seed=1)


# ----------------------------------------------------------------------------- the mapper
def _pair_dataset(tmp_path: Path, key_label: np.ndarray, ref_label: np.ndarray) -> list[dict]:
    folder = tmp_path / "video_sequence" / "val"
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (*key_label.shape[:2], 3), dtype=np.uint8)
    _write_kitti(folder, 0, 0, image, key_label)
    _write_kitti(folder, 0, 1, image, ref_label)
    name = _register("pair", "kitti_step", str(tmp_path), "val")
    frames = DatasetCatalog.get(name)
    return [{**frames[0], "reference": frames[1]}]


def _scene(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    cls = np.zeros((h, w), np.int64)  # road
    cls[: h // 3] = 10  # sky
    inst = np.zeros((h, w), np.int64)
    cls[15:30, 5:20], inst[15:30, 5:20] = 13, 1  # car 1
    cls[10:25, 30:38], inst[10:25, 30:38] = 11, 2  # person 2
    cls[30:38, 40:55], inst[30:38, 40:55] = 13, 0  # crowd car region
    cls[0:3, 0:5] = 255
    return cls, inst


def test_mapper_shared_augmentation(tmp_path):
    cls, inst = _scene()
    label = _kitti_label(cls, inst)
    pair = _pair_dataset(tmp_path, label, label)[0]
    augs = [
        T.ResizeShortestEdge((30, 60), 1000, "range"),
        T.RandomFlip(0.5),
        T.RandomCrop("absolute", (24, 32)),
    ]
    mapper = KNetVideoPanopticDatasetMapper(augmentations=augs, image_format="BGR")
    sizes, images = set(), []
    torch.manual_seed(0)
    np.random.seed(0)
    for _ in range(12):
        out = mapper(pair)
        if out is None:  # the crop missed every thing: allowed, drawn again by MapDataset
            continue
        ref = out["reference"]
        assert out["frame_index"] == 0 and ref["frame_index"] == 1 and ref["video_id"] == "000000"
        assert torch.equal(out["image"], ref["image"])  # the same resize, flip and crop
        assert torch.equal(out["sem_seg"], ref["sem_seg"])
        a, b = out["instances"], ref["instances"]
        assert torch.equal(a.gt_masks, b.gt_masks) and torch.equal(a.gt_ids, b.gt_ids)
        assert a.gt_masks.dtype == torch.bool and a.gt_ids.dtype == torch.int64
        assert out["sem_seg"].dtype == torch.int64 and out["image"].shape[1:] == (24, 32)
        # masks agree with sem_seg, and gt_ids are class train id * 10000 + instance
        for m, c, i in zip(a.gt_masks, a.gt_classes, a.gt_ids):
            assert (out["sem_seg"][m] == c).all()
            assert int(i) // 10000 == {0: 11, 1: 13}[int(c)]
        images.append(out["image"])
        sizes.add(tuple(out["image"].shape))
    assert len(images) >= 3
    assert len({hashlib.md5(i.numpy().tobytes()).hexdigest() for i in images}) > 1  # random


def test_mapper_targets_without_augmentation(tmp_path):
    cls, inst = _scene()
    pair = _pair_dataset(tmp_path, _kitti_label(cls, inst), _kitti_label(cls, inst))[0]
    out = KNetVideoPanopticDatasetMapper(augmentations=[], image_format="RGB")(pair)
    inst_out = out["instances"]
    # crowd thing regions are instances (official KITTI-STEP training): ids 110002, 130000, 130001
    assert inst_out.gt_ids.tolist() == [110002, 130000, 130001]
    assert inst_out.gt_classes.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(inst_out.gt_masks[2].numpy(), (cls == 13) & (inst == 1))
    expected_sem = np.where(
        cls == 255, 255, np.select([cls == 11, cls == 13, cls == 10], [0, 1, 12], 2)
    )
    np.testing.assert_array_equal(out["sem_seg"].numpy(), expected_sem)
    assert (out["height"], out["width"]) == (40, 60)
    no_crowd = KNetVideoPanopticDatasetMapper(
        augmentations=[], image_format="RGB", crowd_as_instances=False
    )(pair)
    assert no_crowd["instances"].gt_ids.tolist() == [110002, 130001]
    assert torch.equal(no_crowd["sem_seg"], out["sem_seg"])  # the crowd keeps its class


def test_mapper_filters(tmp_path):
    cls, inst = _scene()
    stuff_only = _kitti_label(np.where(np.isin(cls, (11, 13)), 0, cls), np.zeros_like(inst))
    mapper = KNetVideoPanopticDatasetMapper(augmentations=[], image_format="RGB")
    label = _kitti_label(cls, inst)
    assert mapper(_pair_dataset(tmp_path / "a", label, stuff_only)[0]) is None
    assert mapper(_pair_dataset(tmp_path / "b", stuff_only, label)[0]) is None
    # no identity in common: the key holds person 2 only, the reference person 7 and cars
    key_only_person = _kitti_label(np.where(cls == 13, 0, cls), np.where(cls == 13, 0, inst))
    other = _kitti_label(cls, np.where(inst > 0, inst + 5, 0))
    disjoint = _pair_dataset(tmp_path / "c", key_only_person, other)[0]
    disjoint_ref_ids = {110007, 130006, 130000}
    assert mapper(disjoint) is None
    loose = KNetVideoPanopticDatasetMapper(
        augmentations=[], image_format="RGB", require_common_instance=False
    )(disjoint)
    assert set(loose["reference"]["instances"].gt_ids.tolist()) == disjoint_ref_ids
    # a crop that keeps only stuff (rows 0..9 hold sky and road only)
    crop = [T.CropTransform(0, 0, 60, 9)]
    cropped = KNetVideoPanopticDatasetMapper(augmentations=crop, image_format="RGB")
    assert cropped(_pair_dataset(tmp_path / "d", label, label)[0]) is None
    small = np.zeros((20, 30, 3), np.uint8)
    _write_kitti(
        tmp_path / "e" / "video_sequence" / "val", 0, 0, small, _kitti_label(*_scene(20, 30))
    )
    _write_kitti(
        tmp_path / "e" / "video_sequence" / "val", 0, 1, np.zeros((40, 60, 3), np.uint8), label
    )
    frames = DatasetCatalog.get(_register("sizes", "kitti_step", str(tmp_path / "e"), "val"))
    frames[1].update(height=40, width=60)  # the loader reads the size of a video's first frame
    with pytest.raises(ValueError, match="one transform"):
        mapper({**frames[0], "reference": frames[1]})
    with pytest.raises(ValueError, match="pair"):
        mapper(DatasetCatalog.get(_register("plain", "kitti_step", str(tmp_path / "d"), "val"))[0])


def test_mapper_from_config_and_kind():
    cfg = get_cfg()
    add_knet_config(cfg)
    cfg.INPUT.DATASET_MAPPER_NAME = "knet_video_panoptic"
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = "absolute", (64, 96)
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper, KNetVideoPanopticDatasetMapper)
    kinds = [type(a) for a in mapper.augmentations.augs]
    assert kinds == [T.ResizeShortestEdge, T.RandomFlip, T.RandomCrop]  # official order


# ----------------------------------------------------------------------------- the toy
def test_toy_video_render_deterministic_with_tracks():
    images, labels, infos = toy_video.render_video([0, 0, 0])
    again = toy_video.render_video([0, 0, 0])
    assert all(np.array_equal(a, b) for a, b in zip(images + labels, again[0] + again[1]))
    other = toy_video.render_video([1, 0, 0])
    assert not np.array_equal(images[0], other[0][0])
    assert len(images) == 8 and images[0].shape == (128, 192, 3)


def test_toy_video_dataset(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=TOY_VIDEO_COMMAND):
        require_toy_video_dataset(root)
    out = toy_video.generate_toy_video_dataset(root, num_train=3, num_val=1, seed=4)
    assert require_toy_video_dataset(root) == out
    name = _register(
        "toy_video", "kitti_step", out, "train", pairs=False, categories=TOY_VIDEO_CATEGORIES
    )
    frames = DatasetCatalog.get(name)
    assert len(frames) == 3 * 8 and len({f["video_id"] for f in frames}) == 3
    occluded = reentered = 0
    for video in sorted({f["video_id"] for f in frames}):
        tracks: dict[int, list[int]] = {}  # instance id (G, B) -> frames where visible
        for f in (f for f in frames if f["video_id"] == video):
            semantic, instance = read_panoptic_frame(f)
            assert set(np.unique(semantic)) <= {0, 1, 2, 3, 4, 255}
            for c in (0, 1):  # disc, block: one class per identity
                for i in np.unique(instance[semantic == c]).tolist():
                    assert i >= 1
                    tracks.setdefault(c * 1000 + i, []).append(f["frame_index"])
        assert len(tracks) >= 3
        assert any(len(t) >= 6 for t in tracks.values())  # persistent ids
        # an identity absent in some frames and present before and after: left and re-entered
        reentered += any(t != list(range(t[0], t[-1] + 1)) for t in tracks.values())
    for v in range(3):
        _, _, infos = toy_video.render_video([4, 0, v])
        occluded += any(o["occluded"] > 0 and o["visible"] > 0 for i in infos for o in i)
    assert reentered >= 1 and occluded >= 2
    # the same seed gives the same files
    again = toy_video.generate_toy_video_dataset(str(tmp_path / "again"), 3, 1, seed=4)

    def digest(folder: str) -> dict[str, str]:
        files = sorted(Path(folder).rglob("*.png"))
        return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}

    assert digest(out) == digest(again) and digest(out)
    # the mapper trains on its pairs
    pairs = pair_with_references(frames, seed=0)
    mapper = KNetVideoPanopticDatasetMapper(augmentations=[], image_format="RGB")
    outputs = [mapper(p) for p in pairs]
    assert sum(o is not None for o in outputs) >= len(pairs) // 2
    for o in filter(None, outputs):
        shared = set(o["instances"].gt_ids.tolist()) & set(
            o["reference"]["instances"].gt_ids.tolist()
        )
        assert shared


def test_toy_video_registration(tmp_path):
    from knet.data.datasets import get_datasets_root
    from knet.data.datasets.video import toy_video_dataset_dir

    for split in ("train", "val"):
        name = f"knet_toy_video_{split}"
        assert kind_of(name) == "video_panoptic"
        classes = dataset_classes(name, load=False)
        assert classes.class_names == ("disc", "block", "ground", "sky", "wall")
        folder = os.path.join(toy_video_dataset_dir(get_datasets_root()), "video_sequence", split)
        assert MetadataCatalog.get(name).image_root == folder
    # the builtin names check for the files as this one does: absent -> the command is named
    name = _register(
        "toy_absent",
        "kitti_step",
        toy_video_dataset_dir(str(tmp_path)),
        "train",
        categories=TOY_VIDEO_CATEGORIES,
        check=lambda: require_toy_video_dataset(str(tmp_path)),
    )
    with pytest.raises(FileNotFoundError, match=TOY_VIDEO_COMMAND):
        DatasetCatalog.get(name)
