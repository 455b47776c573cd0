"""Video datasets: KITTI-STEP and VIPSeg (video panoptic segmentation) and YouTube-VIS 2019
(video instance segmentation), read as the official Video K-Net loaders read them.

A video dataset's records are per-frame dicts, sorted by video then frame::

    {"file_name", "image_id" (int, unique), "video_id" (str), "frame_index" (int, 0-based
     position in its video), "height", "width", "dataset_name",
     panoptic formats: "label_file_name", "label_format" ("kitti_step" | "vipseg"),
     "ytvis": "dataset_video_id" (the json's video id), "annotations" [{"category_id"
         (contiguous), "instance_id", "segmentation" (RLE or polygons), "bbox", "bbox_mode",
         "iscrowd"}]}

Training splits (``pairs=True``) return *pair* records instead: a key frame's record plus
``"reference"``, the record of the frame at an offset drawn once per load
(:func:`pair_with_references`). With ``clip_frames`` (the clip-level VIS model), records are
*clips*: ``"frames"``, a list of frame records (:func:`clip_records`).
:func:`read_panoptic_frame` reads a frame's ground truth at its original size (for the
evaluators); the training mapper is
``knet.data.dataset_mappers.KNetVideoPanopticDatasetMapper``.

Panoptic label encodings (decoded by :func:`split_label`):

* KITTI-STEP: RGB PNG, R = semantic train id (255 void), instance = G * 256 + B (0 on stuff and
  on crowd thing regions). Identity of an object: train_id * 10000 + instance.
* VIPSeg: single-channel 16-bit PNG, raw v: 0 and 200 void; v > 128 a thing of class
  v // 100 - 1, instance v % 100 (0-based); otherwise the stuff class v - 1. Identity:
  (stuff-first class index) * 1000 + instance, stuff-first meaning stuff 0..S-1 then things.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from .panoptic import get_panoptic_metadata, load_json
from .toy import get_datasets_root, read_toy_marker

logger = logging.getLogger(__name__)

VIDEO_FORMATS = ("kitti_step", "vipseg", "ytvis")
PANOPTIC_FORMATS = ("kitti_step", "vipseg")
REFERENCE_OFFSETS = (-2, -1, 1, 2)  # official: one drawn per key frame, once per run
YTVIS_CLIP_FRAMES = 5  # official VIS training clips: frames f-2 .. f+2
VOID = 255  # ignore label of semantic maps
# frame numbers below this: image_id = video number * FRAME_ID_RANGE + frame (the official
# ``img_id``, whose value mod 10000 is the frame)
FRAME_ID_RANGE = 10000
# identity of an object across frames: class * divisor + instance (official, per format)
IDENTITY_DIVISOR = {"kitti_step": 10000, "vipseg": 1000}

# ----------------------------------------------------------------------------- classes
# KITTI-STEP: the 19 Cityscapes train ids (index = train id = R value); things person and car.
KITTI_STEP_CATEGORIES: list[dict[str, Any]] = [
    {"id": i, "name": name, "isthing": int(i in (11, 13)), "color": list(color)}
    for i, (name, color) in enumerate(
        [
            ("road", (128, 64, 128)),
            ("sidewalk", (244, 35, 232)),
            ("building", (70, 70, 70)),
            ("wall", (102, 102, 156)),
            ("fence", (190, 153, 153)),
            ("pole", (153, 153, 153)),
            ("traffic light", (250, 170, 30)),
            ("traffic sign", (220, 220, 0)),
            ("vegetation", (107, 142, 35)),
            ("terrain", (152, 251, 152)),
            ("sky", (70, 130, 180)),
            ("person", (220, 20, 60)),
            ("rider", (255, 0, 0)),
            ("car", (0, 0, 142)),
            ("truck", (0, 0, 70)),
            ("bus", (0, 60, 100)),
            ("train", (0, 80, 100)),
            ("motorcycle", (0, 0, 230)),
            ("bicycle", (119, 11, 32)),
        ]
    )
]

# VIPSeg: 124 classes (index = original class id), 58 things.
_VIPSEG_NAMES = (
    "wall ceiling door stair ladder escalator Playground_slide handrail_or_fence window rail goal "
    "pillar pole floor ground grass sand athletic_field road path crosswalk building house bridge "
    "tower windmill well_or_well_lid other_construction sky mountain stone wood ice snowfield "
    "grandstand sea river lake waterfall water billboard_or_Bulletin_Board sculpture pipeline flag "
    "parasol_or_umbrella cushion_or_carpet tent roadblock car bus truck bicycle motorcycle "
    "wheeled_machine ship_or_boat raft airplane tyre traffic_light lamp person cat dog horse "
    "cattle other_animal tree flower other_plant toy ball_net backboard skateboard bat ball "
    "cupboard_or_showcase_or_storage_rack box traveling_case_or_trolley_case basket "
    "bag_or_package trash_can cage plate tub_or_bowl_or_pot bottle_or_cup barrel fishbowl bed "
    "pillow table_or_desk chair_or_seat bench sofa shelf bathtub gun commode roaster other_machine "
    "refrigerator "
    "washing_machine Microwave_oven fan curtain textiles clothes painting_or_poster mirror "
    "flower_pot_or_vase clock book tool blackboard tissue screen_or_television computer printer "
    "Mobile_phone keyboard other_electronic_product fruit food instrument train"
).split()
_VIPSEG_THING_IDS = frozenset(
    [2, 4, 8, 10, 41, 43, 44, 46, 47, 48, 49, 50, 51, 52, 54, 55, 56, 60, 61, 62, 63, 64, 65]
    + [72, 74, 76, 77, 78, 79, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 95, 96, 97, 99]
    + [100, 101, 102, 106, 107, 108, 109, 114, 115, 116, 117, 118, 122, 123]
)
# RGB colours of the classes, in class id order (official), as hex
_VIPSEG_COLORS = [
    [int(h[i : i + 2], 16) for i in (0, 2, 4)]
    for h in (
        "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 "
        "96053d 787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff "
        "ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff 08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff "
        "e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff "
        "8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff "
        "0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 "
        "0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014 "
        "ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52 000aff 0070ff 3300ff 00c2ff 007aff "
        "00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff "
        "ff001f 00b8ff 00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3 "
        "ffcc00 ff008f 00ffeb 85ff00"
    ).split()
]
VIPSEG_CATEGORIES: list[dict[str, Any]] = [
    {"id": i, "name": name, "isthing": int(i in _VIPSEG_THING_IDS), "color": color}
    for i, (name, color) in enumerate(zip(_VIPSEG_NAMES, _VIPSEG_COLORS, strict=True))
]

# YouTube-VIS 2019: 40 thing classes in official order (category ids 1..40).
YTVIS_2019_CLASSES = (
    "person giant_panda lizard parrot skateboard sedan ape dog snake monkey hand rabbit duck cat "
    "cow fish train horse turtle bear motorbike giraffe leopard fox deer owl surfboard airplane "
    "truck zebra tiger elephant snowboard boat shark mouse frog eagle earless_seal tennis_racket"
).split()


def video_panoptic_metadata(
    categories: Sequence[Mapping[str, Any]], label_format: str
) -> dict[str, Any]:
    """Panoptic metadata of a video dataset whose ``categories`` (``id`` = the class value of the
    label files, ``name``, ``isthing``, ``color``) may interleave things and stuff.

    Contiguous ids put the things first, each group in ascending dataset id (the official
    label shift: KITTI-STEP becomes person, car, road, sidewalk, ...; VIPSeg things 0..57 then
    stuff 58..123). ``stuff_*`` list all classes (Mask2Former), ``ignore_label`` is 255.
    """
    ids = [int(c["id"]) for c in categories]
    if len(set(ids)) != len(ids) or not all(0 <= i < VOID for i in ids):
        raise ValueError(f"Video class ids must be distinct and in 0..254, got {ids}")
    ordered = sorted(categories, key=lambda c: (not c["isthing"], int(c["id"])))
    meta = get_panoptic_metadata(ordered)
    return {
        **meta,
        "evaluator_type": "video_panoptic",
        "ignore_label": VOID,
        "label_format": label_format,
        "label_divisor": IDENTITY_DIVISOR[label_format],
    }


def ytvis_metadata(categories: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Instance metadata of a YouTube-VIS dataset: ``categories`` (``id``, ``name``) sorted by
    id, default the 40 YouTube-VIS 2019 classes (ids 1..40)."""
    if categories is None:
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(YTVIS_2019_CLASSES)]
    ordered = sorted(categories, key=lambda c: int(c["id"]))
    return {
        "thing_classes": [c["name"] for c in ordered],
        "thing_dataset_id_to_contiguous_id": {int(c["id"]): i for i, c in enumerate(ordered)},
        "evaluator_type": "ytvis",
    }


# ----------------------------------------------------------------------------- label decoding
def encode_label_rgb(label: Image.Image, label_format: str, file_name: str = "") -> Image.Image:
    """A decoded label PNG as an 8-bit RGB image holding the same values, so that crops, flips
    and nearest-neighbour resizes (PIL's or Detectron2's) move the encoded values intact.

    KITTI-STEP labels are RGB already; a VIPSeg 16-bit value v becomes R = v // 256,
    G = v % 256, B = 0.
    """
    if label_format == "kitti_step":
        if label.mode != "RGB":
            raise ValueError(f"KITTI-STEP label {file_name} is a {label.mode} PNG, expected RGB")
        return label
    if label_format == "vipseg":
        raw = np.asarray(label)
        if raw.ndim != 2:
            raise ValueError(f"VIPSeg label {file_name} must have one channel, got {raw.shape}")
        raw = raw.astype(np.int64)
        if raw.min() < 0 or raw.max() > 0xFFFF:
            raise ValueError(f"VIPSeg label {file_name} has values outside 0..65535")
        rgb = np.zeros((*raw.shape, 3), np.uint8)
        rgb[..., 0], rgb[..., 1] = raw >> 8, raw & 0xFF
        return Image.fromarray(rgb)
    raise ValueError(f"Unknown panoptic video label format {label_format!r}")


def split_label(
    rgb: np.ndarray, label_format: str, file_name: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Class and instance of every pixel of an encoded label (:func:`encode_label_rgb`).

    Args:
        rgb: (H, W, 3) uint8.
    Returns:
        dataset class (H, W) int64 (255 void) and raw instance id (H, W) int64 (0 on stuff and
        void; KITTI-STEP: 0 also on crowd thing regions; VIPSeg things: 0-based).
    """
    rgb = rgb.astype(np.int64)
    if label_format == "kitti_step":
        return rgb[..., 0], rgb[..., 1] * 256 + rgb[..., 2]
    if label_format == "vipseg":
        v = rgb[..., 0] * 256 + rgb[..., 1]
        void = (v == 0) | (v == 200)
        thing = (v > 128) & ~void
        cls = np.where(thing, v // 100 - 1, v - 1)
        cls[void] = VOID
        inst = np.where(thing, v % 100, 0)
        invalid = ~void & (cls >= VOID)
        if invalid.any():
            raise ValueError(f"VIPSeg label {file_name} has an invalid value {v[invalid][0]}")
        return cls, inst
    raise ValueError(f"Unknown panoptic video label format {label_format!r}")


class LabelCodec:
    """What a panoptic video dataset's labels mean, from its metadata: lookup tables (256
    entries, indexed by the dataset class of :func:`split_label`) of the contiguous class (255:
    void, -1: a class the metadata does not know), of being a thing, and of the class part of
    the official identity."""

    def __init__(self, metadata: Any, label_format: str):
        if label_format not in PANOPTIC_FORMATS:
            raise ValueError(
                f"label_format must be one of {PANOPTIC_FORMATS}, not {label_format!r}"
            )
        get = metadata.get
        stuff_map = {int(k): int(v) for k, v in get("stuff_dataset_id_to_contiguous_id").items()}
        thing_map = {int(k): int(v) for k, v in get("thing_dataset_id_to_contiguous_id").items()}
        contiguous = np.full(VOID + 1, -1, np.int64)
        contiguous[VOID] = VOID
        for dataset_id, c in {**stuff_map, **thing_map}.items():
            contiguous[dataset_id] = c
        self.label_format = label_format
        self.contiguous = contiguous
        self.num_thing_classes = len(set(thing_map.values()))
        num_classes = len(set(stuff_map.values()) | set(thing_map.values()))
        self.is_thing = np.zeros(VOID + 1, bool)
        self.is_thing[list(thing_map)] = True
        self.divisor = IDENTITY_DIVISOR[label_format]
        if label_format == "kitti_step":  # train id * 10000 + instance (official)
            self.identity_class = np.arange(VOID + 1, dtype=np.int64)
        else:  # VIPSeg's stuff-first index (stuff 0..S-1, then things) * 1000 + instance
            t, s = self.num_thing_classes, num_classes - self.num_thing_classes
            self.identity_class = np.where(contiguous < t, contiguous + s, contiguous - t)

    def decode(
        self, rgb: np.ndarray, file_name: str = ""
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(contiguous class (255 void), raw instance, is-thing mask, identity) of each pixel of
        an encoded (H, W, 3) label; all (H, W), int64 but the bool mask."""
        cls, inst = split_label(rgb, self.label_format, file_name)
        contiguous = self.contiguous[cls]
        if (contiguous < 0).any():
            bad = sorted(set(cls[contiguous < 0].tolist()))
            raise ValueError(f"Label {file_name} has classes {bad[:10]} unknown to the dataset")
        thing = self.is_thing[cls]
        identity = self.identity_class[cls] * self.divisor + inst
        return contiguous, inst, thing, identity


@lru_cache(maxsize=64)
def _registered_codec(dataset_name: str, label_format: str) -> LabelCodec:
    return LabelCodec(MetadataCatalog.get(dataset_name), label_format)


def label_codec(record: Mapping[str, Any], metadata: Any = None) -> LabelCodec:
    """The :class:`LabelCodec` of a panoptic frame record: from ``metadata`` if given, else from
    the metadata of the record's ``dataset_name`` if registered, else the default classes of its
    ``label_format`` (KITTI-STEP's 19 / VIPSeg's 124)."""
    label_format = record["label_format"]
    if metadata is not None:
        return LabelCodec(metadata, label_format)
    name = record.get("dataset_name")
    if name and MetadataCatalog.get(name).get("stuff_dataset_id_to_contiguous_id", None):
        return _registered_codec(name, label_format)
    return _default_codec(label_format)


@lru_cache(maxsize=2)
def _default_codec(label_format: str) -> LabelCodec:
    categories = KITTI_STEP_CATEGORIES if label_format == "kitti_step" else VIPSEG_CATEGORIES
    return LabelCodec(video_panoptic_metadata(categories, label_format), label_format)


def read_label_rgb(record: Mapping[str, Any]) -> Image.Image:
    """A panoptic frame's label PNG, decoded and encoded as RGB (:func:`encode_label_rgb`)."""
    # imported here: the mappers' module imports this one
    from ..dataset_mappers.common import decode_image_checked

    file_name = record["label_file_name"]
    decoded = decode_image_checked(file_name, None, "panoptic label PNG")
    return encode_label_rgb(decoded, record["label_format"], file_name)


def read_panoptic_frame(
    record: Mapping[str, Any], metadata: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth of a panoptic frame record at its original size.

    Args:
        metadata: the dataset's metadata; default: see :func:`label_codec`.
    Returns:
        semantic (H, W) int64: contiguous class, 255 void; instance (H, W) int64: the instance
        id within its class (>= 1) on thing pixels, 0 on stuff, void and crowd thing regions
        (KITTI-STEP instance 0). VIPSeg's 0-based thing instances are shifted by one, as the
        official evaluator does.
    """
    codec = label_codec(record, metadata)
    file_name = record["label_file_name"]
    rgb = np.asarray(read_label_rgb(record))
    semantic, inst, thing, _ = codec.decode(rgb, file_name)
    if record["label_format"] == "vipseg":
        inst = np.where(thing, inst + 1, 0)
    instance = np.where(thing & (semantic != VOID), inst, 0)
    return semantic, instance


# ----------------------------------------------------------------------------- loaders
def _image_size(path: str) -> tuple[int, int]:
    """(height, width) read from the file header."""
    with Image.open(path) as im:
        return im.height, im.width


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found (or not a folder): {path}")


_KITTI_IMAGE = re.compile(r"^(\d+)_(\d+)_leftImg8bit\.png$")


def load_kitti_step_frames(split_dir: str, dataset_name: str = "") -> list[dict[str, Any]]:
    """Frame records of a KITTI-STEP split folder (``video_sequence/<split>``, flat:
    ``{seq:06d}_{frame:06d}_leftImg8bit.png`` and ``..._panoptic.png``), sorted by sequence then
    frame. Labels are optional (the test split has none) but must exist for all frames or none.

    ``image_id`` = seq * 10000 + frame number (the official ``img_id``); the size is read from
    the first frame of each sequence (a KITTI sequence has one size).
    """
    _require_dir(split_dir, "KITTI-STEP split folder")
    frames: dict[int, list[tuple[int, str]]] = {}
    for name in os.listdir(split_dir):
        m = _KITTI_IMAGE.match(name)
        if m:
            frames.setdefault(int(m.group(1)), []).append((int(m.group(2)), name))
    if not frames:
        raise FileNotFoundError(f"No *_leftImg8bit.png images in {split_dir}")
    records, labelled = [], []
    for seq in sorted(frames):
        numbers = sorted(frames[seq])
        height, width = _image_size(os.path.join(split_dir, numbers[0][1]))
        for position, (number, name) in enumerate(numbers):
            if number >= FRAME_ID_RANGE:
                raise ValueError(f"KITTI-STEP frame number {number} >= {FRAME_ID_RANGE}: {name}")
            label = os.path.join(split_dir, name.replace("_leftImg8bit.png", "_panoptic.png"))
            record = {
                "file_name": os.path.join(split_dir, name),
                "image_id": seq * FRAME_ID_RANGE + number,
                "video_id": f"{seq:06d}",
                "frame_index": position,
                "height": height,
                "width": width,
                "dataset_name": dataset_name,
            }
            has_label = os.path.isfile(label)
            labelled.append(has_label)
            if has_label:
                record.update(label_file_name=label, label_format="kitti_step")
            records.append(record)
    if any(labelled) and not all(labelled):
        missing = next(r["file_name"] for r, ok in zip(records, labelled) if not ok)
        raise FileNotFoundError(f"KITTI-STEP label missing for {missing} (_panoptic.png)")
    return records


def load_vipseg_frames(root: str, split: str, dataset_name: str = "") -> list[dict[str, Any]]:
    """Frame records of VIPSeg (``images/<video>/*.jpg``, ``panomasks/<video>/*.png``, the
    videos of ``<split>.txt`` in its order), frames in sorted name order.

    ``image_id`` = (index of the video in the split file) * 10000 + frame index (the official
    ``seq_id`` / ``img_id``); the size is read from the first frame of each video.
    """
    split_file = os.path.join(root, f"{split}.txt")
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"VIPSeg split file not found: {split_file}")
    with open(split_file) as f:
        videos = [line.strip() for line in f if line.strip()]
    records = []
    for index, video in enumerate(videos):
        image_dir = os.path.join(root, "images", video)
        label_dir = os.path.join(root, "panomasks", video)
        _require_dir(image_dir, "VIPSeg video folder")
        images = sorted(n for n in os.listdir(image_dir) if n.endswith(".jpg"))
        labels = sorted(n for n in os.listdir(label_dir) if n.endswith(".png"))
        stems = [os.path.splitext(n)[0] for n in images]
        if stems != [os.path.splitext(n)[0] for n in labels]:
            raise ValueError(f"VIPSeg video {video}: images and panomasks do not pair by name")
        if len(images) >= FRAME_ID_RANGE:
            raise ValueError(f"VIPSeg video {video} has >= {FRAME_ID_RANGE} frames")
        if not images:
            continue
        height, width = _image_size(os.path.join(image_dir, images[0]))
        for position, (image, label) in enumerate(zip(images, labels)):
            records.append(
                {
                    "file_name": os.path.join(image_dir, image),
                    "image_id": index * FRAME_ID_RANGE + position,
                    "video_id": video,
                    "frame_index": position,
                    "height": height,
                    "width": width,
                    "dataset_name": dataset_name,
                    "label_file_name": os.path.join(label_dir, label),
                    "label_format": "vipseg",
                }
            )
    return records


def load_ytvis_json(
    json_file: str, image_root: str, metadata: Mapping[str, Any], dataset_name: str = ""
) -> list[dict[str, Any]]:
    """Frame records of a CocoVID-style YouTube-VIS json (``videos``; ``images`` with
    ``video_id``, ``frame_id``; ``annotations`` with ``image_id``, ``instance_id``,
    ``category_id``, RLE or polygon ``segmentation``, ``bbox``, ``iscrowd``), sorted by video
    then ``frame_id``. ``frame_index`` is the position in the video; annotations get contiguous
    ``category_id`` and keep ``instance_id`` (the identity across frames). A json without
    ``annotations`` (the valid split) gives records without them.
    """
    data = load_json(json_file)
    if "images" not in data and isinstance(data.get("videos"), list):
        data = _cocovid_from_ytvis(data)
    for key in ("videos", "images"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{json_file} has no {key!r} list: not a CocoVID-style json")
    id_map = {int(k): v for k, v in metadata["thing_dataset_id_to_contiguous_id"].items()}
    video_names = {int(v["id"]): str(v.get("name", v["id"])) for v in data["videos"]}
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in data["images"]}
    annotations: dict[int, list[dict]] = {}
    for ann in data.get("annotations", []):
        if int(ann["category_id"]) not in id_map:
            raise ValueError(f"{json_file}: annotation {ann.get('id')} has an unknown category")
        segmentation = ann["segmentation"]
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            # uncompressed RLE (as YouTube-VIS stores it): compressed, as Detectron2 decodes it
            segmentation = mask_util.frPyObjects(segmentation, *segmentation["size"])
        obj = {
            "category_id": id_map[int(ann["category_id"])],
            "instance_id": int(ann["instance_id"]),
            "segmentation": segmentation,
            "iscrowd": int(ann.get("iscrowd", 0)),
        }
        bbox = ann.get("bbox")
        if bbox is None:  # optional in the json: the box of the mask
            rle = segmentation
            if not isinstance(segmentation, dict):
                rle = mask_util.merge(mask_util.frPyObjects(segmentation, *sizes[ann["image_id"]]))
            bbox = mask_util.toBbox(rle).tolist()
        obj.update(bbox=bbox, bbox_mode=BoxMode.XYWH_ABS)
        annotations.setdefault(int(ann["image_id"]), []).append(obj)
    has_annotations = "annotations" in data
    images = sorted(data["images"], key=lambda im: (int(im["video_id"]), int(im["frame_id"])))
    records, position, last_video = [], 0, None
    for im in images:
        video = int(im["video_id"])
        position = 0 if video != last_video else position + 1
        last_video = video
        record = {
            "file_name": os.path.join(image_root, im["file_name"]),
            "image_id": int(im["id"]),
            "video_id": video_names.get(video, str(video)),
            "dataset_video_id": video,  # the json's id (results files name videos by it)
            "frame_index": position,
            "height": int(im["height"]),
            "width": int(im["width"]),
            "dataset_name": dataset_name,
        }
        if has_annotations:
            record["annotations"] = annotations.get(int(im["id"]), [])
        records.append(record)
    return records


def _cocovid_from_ytvis(data: Mapping[str, Any]) -> dict[str, Any]:
    """The official YouTube-VIS json (``videos`` with ``file_names``; one annotation per track
    with per-frame ``segmentations`` / ``bboxes``, None where absent) in CocoVID style: one image
    per frame (id = video id * 10000 + frame), ``instance_id`` = the track's annotation id."""
    images, annotations = [], []
    frame_ids = {}
    for video in data["videos"]:
        for frame, file_name in enumerate(video["file_names"]):
            image_id = int(video["id"]) * FRAME_ID_RANGE + frame
            frame_ids[(int(video["id"]), frame)] = image_id
            images.append(
                {"id": image_id, "file_name": file_name, "video_id": int(video["id"])}
                | {"frame_id": frame, "height": video["height"], "width": video["width"]}
            )
    for track in data.get("annotations", []):
        bboxes = track.get("bboxes") or [None] * len(track["segmentations"])
        for frame, (segmentation, bbox) in enumerate(zip(track["segmentations"], bboxes)):
            if segmentation is None:  # the object is not in this frame
                continue
            ann = {
                "image_id": frame_ids[(int(track["video_id"]), frame)],
                "instance_id": int(track["id"]),
                "category_id": track["category_id"],
                "segmentation": segmentation,
                "iscrowd": track.get("iscrowd", 0),
            }
            annotations.append(ann | ({"bbox": bbox} if bbox is not None else {}))
    out = {"videos": data["videos"], "images": images, "categories": data.get("categories", [])}
    return out | ({"annotations": annotations} if "annotations" in data else {})


def pair_with_references(
    frames: Sequence[Mapping[str, Any]],
    offsets: Sequence[int] = REFERENCE_OFFSETS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Training pairs of the official sampler: one reference offset per frame, drawn in frame
    order by ``random.Random(seed)`` (so the same seed gives the same pairs in every process and
    every load); frames whose reference would fall outside their video are dropped.

    Returns:
        copies of the kept frame records, each with ``"reference"``: a copy of the record of the
        frame ``offset`` positions away (``frame_index``) in the same video.
    """
    rng = random.Random(seed)
    by_position = {(f["video_id"], f["frame_index"]): f for f in frames}
    pairs = []
    for frame in frames:
        offset = rng.choice(list(offsets))
        reference = by_position.get((frame["video_id"], frame["frame_index"] + offset))
        if reference is not None:
            pairs.append({**frame, "reference": dict(reference)})
    return pairs


def clip_records(frames: Sequence[Mapping[str, Any]], length: int = 0) -> list[dict[str, Any]]:
    """Clip records: ``{"video_id", "frame_index" (the clip's first frame), "frames": [frame
    records in order]}``, plus the first frame's "height", "width" and "dataset_video_id"
    where it has them.

    ``length`` > 0 (training, the official uniform sampler): for every frame f, the frames
    f - length // 2 ... f + (length - 1) // 2 of its video, kept only when all of them exist;
    0: one clip per whole video (inference).
    """
    videos: dict[Any, list[Mapping[str, Any]]] = {}
    for frame in frames:
        videos.setdefault(frame["video_id"], []).append(frame)
    clips = []
    for video, video_frames in videos.items():
        by_index = {f["frame_index"]: f for f in video_frames}
        if length > 0:
            windows = [
                [by_index.get(f + d) for d in range(-(length // 2), (length + 1) // 2)]
                for f in sorted(by_index)
            ]
            windows = [w for w in windows if all(x is not None for x in w)]
        else:
            windows = [[by_index[f] for f in sorted(by_index)]]
        for window in windows:
            clip = {"video_id": video, "frame_index": window[0]["frame_index"]}
            # the frames' size (Detectron2's aspect-ratio grouping reads it) and json video id
            for key in ("height", "width", "dataset_video_id"):
                if key in window[0]:
                    clip[key] = window[0][key]
            clips.append(clip | {"frames": [dict(f) for f in window]})
    return clips


def frame_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The frames of ``records`` in order: the ``"frames"`` of clip records, each file once
    (the windows overlap), and every other record itself."""
    frames: dict[Any, Mapping[str, Any]] = {}
    for record in records:
        for frame in record.get("frames", ()):
            frames.setdefault(frame.get("file_name", id(frame)), frame)
        if "frames" not in record:
            frames[id(record)] = record
    return list(frames.values())


# ----------------------------------------------------------------------------- registration
def _split_paths(format: str, root: str, split: str) -> dict[str, str]:
    """The files of ``split`` of a dataset in the official layout under ``root``."""
    if format == "kitti_step":
        return {"image_root": os.path.join(root, "video_sequence", split)}
    if format == "vipseg":
        return {
            "image_root": os.path.join(root, "images"),
            "panoptic_root": os.path.join(root, "panomasks"),
            "split_file": os.path.join(root, f"{split}.txt"),
        }
    return {
        "image_root": os.path.join(root, split, "JPEGImages"),
        "json_file": os.path.join(root, "annotations", f"youtube_vis_2019_{split}.json"),
    }


def register_video_dataset(
    name: str,
    format: str,
    root: str,
    split: str,
    *,
    pairs: bool | None = None,
    offsets: Sequence[int] = REFERENCE_OFFSETS,
    seed: int = 0,
    categories: Sequence[Mapping[str, Any]] | None = None,
    json_file: str | None = None,
    image_root: str | None = None,
    check: Callable[[], Any] | None = None,
    clip_frames: int = 0,
) -> None:
    """Register a video dataset in its official layout (reads no file).

    Args:
        format: "kitti_step" (``root/video_sequence/<split>/``), "vipseg" (``root/images``,
            ``root/panomasks``, ``root/<split>.txt``) or "ytvis" (``root/<split>/JPEGImages``,
            ``root/annotations/youtube_vis_2019_<split>.json``; ``json_file`` / ``image_root``
            override them).
        pairs: return key/reference pairs (:func:`pair_with_references` with ``offsets`` and
            ``seed``); default: when ``split`` starts with "train".
        categories: the classes (``id`` = class value in the labels, ``name``, ``isthing``,
            ``color``); default KITTI-STEP's 19 / VIPSeg's 124 / the json's (YouTube-VIS).
        check: called before loading (e.g. a check that generated data exist).
        clip_frames: > 0: clip records (:func:`clip_records`, the clip-level VIS model):
            windows of this many frames for a training split, whole videos otherwise; ``pairs``
            is then ignored.
    """
    if format not in VIDEO_FORMATS:
        raise ValueError(f"Unknown video dataset format {format!r}; valid: {VIDEO_FORMATS}")
    pairs = split.startswith("train") if pairs is None else pairs
    paths = _split_paths(format, root, split)
    if json_file is not None:
        paths["json_file"] = json_file
    if image_root is not None:
        paths["image_root"] = image_root
    if format == "ytvis":
        if categories is None:
            categories = [{"id": i + 1, "name": n} for i, n in enumerate(YTVIS_2019_CLASSES)]
        metadata = ytvis_metadata(categories)
    else:
        default = KITTI_STEP_CATEGORIES if format == "kitti_step" else VIPSEG_CATEGORIES
        metadata = video_panoptic_metadata(categories or default, format)

    def load() -> list[dict[str, Any]]:
        if check is not None:
            check()
        if format == "kitti_step":
            frames = load_kitti_step_frames(paths["image_root"], name)
        elif format == "vipseg":
            frames = load_vipseg_frames(root, split, name)
        else:
            frames = load_ytvis_json(paths["json_file"], paths["image_root"], metadata, name)
        if clip_frames > 0:
            clips = clip_records(frames, clip_frames if pairs else 0)
            logger.info(f"{name}: {len(clips)} clips of {len(frames)} frames")
            return clips
        if pairs:
            kept = pair_with_references(frames, offsets, seed)
            logger.info(f"{name}: {len(kept)} key/reference pairs of {len(frames)} frames")
            return kept
        return frames

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        **paths,
        **metadata,
        dataset_root=root,
        split=split,
        video_format=format,
        pairs=pairs and not clip_frames,
        clip_frames=clip_frames,
    )


# ----------------------------------------------------------------------------- toy video data
# Synthetic KITTI-STEP-layout data of tools/make_toy_video_dataset.py. Class ids interleave
# things and stuff, as KITTI's do, so the label shift is exercised.
TOY_VIDEO_CATEGORIES: list[dict[str, Any]] = [
    {"id": 0, "name": "ground", "isthing": 0, "color": [152, 251, 152]},
    {"id": 1, "name": "disc", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 3, "name": "block", "isthing": 1, "color": [250, 170, 30]},
    {"id": 4, "name": "wall", "isthing": 0, "color": [137, 54, 74]},
]
TOY_VIDEO_DIRNAME = "knet_toy_video"
TOY_VIDEO_FORMAT_VERSION = 1  # bump when the generator's output changes
TOY_VIDEO_COMMAND = "python tools/make_toy_video_dataset.py"


def toy_video_dataset_dir(root: str | None = None) -> str:
    """``<root>/knet_toy_video``, ``root`` defaulting to ``$DETECTRON2_DATASETS``."""
    return os.path.join(get_datasets_root() if root is None else root, TOY_VIDEO_DIRNAME)


def require_toy_video_dataset(root: str | None = None) -> str:
    """``<root>/knet_toy_video`` if a complete copy of the current format is there.

    Raises:
        FileNotFoundError: absent, incomplete or stale, naming :data:`TOY_VIDEO_COMMAND`.
    """
    out_dir = toy_video_dataset_dir(root)
    marker = read_toy_marker(out_dir)
    where = f"it writes into DETECTRON2_DATASETS, here {os.path.dirname(out_dir)}"
    if marker is None:
        raise FileNotFoundError(
            f"Toy video dataset not found in {out_dir}. Create it with `{TOY_VIDEO_COMMAND}` "
            f"({where}; a few seconds)."
        )
    if marker.get("version") != TOY_VIDEO_FORMAT_VERSION:
        raise FileNotFoundError(
            f"Toy video dataset in {out_dir} has format version {marker.get('version')}, this "
            f"code reads version {TOY_VIDEO_FORMAT_VERSION}. Regenerate it with "
            f"`{TOY_VIDEO_COMMAND}` ({where})."
        )
    return out_dir


def register_builtin_video(root: str) -> None:
    """KITTI-STEP, VIPSeg, YouTube-VIS 2019 and the toy video data under ``root`` (no I/O)."""
    for split in ("train", "val"):
        register_video_dataset(
            f"kitti_step_{split}", "kitti_step", os.path.join(root, "kitti-step"), split
        )
        register_video_dataset(f"vipseg_{split}", "vipseg", os.path.join(root, "VIPSeg"), split)
        ytvis_split = "train" if split == "train" else "valid"
        register_video_dataset(
            f"ytvis_2019_{split}",
            "ytvis",
            os.path.join(root, "youtube_vis_2019"),
            ytvis_split,
            clip_frames=YTVIS_CLIP_FRAMES,  # the clip-level model of the official VIS recipe
        )
        register_video_dataset(
            f"knet_toy_video_{split}",
            "kitti_step",
            toy_video_dataset_dir(root),
            split,
            categories=TOY_VIDEO_CATEGORIES,
            check=lambda: require_toy_video_dataset(root),
        )
