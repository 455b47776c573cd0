"""COCO-format panoptic datasets with semantic labels, as Mask2Former's
``coco_2017_*_panoptic_with_sem_seg``::

    {"file_name", "image_id", "height", "width", "pan_seg_file_name", "sem_seg_file_name",
     "segments_info": [{"id", "category_id" (contiguous), "isthing", "iscrowd", "area", ...}]}

Contiguous ids run over all classes, things first (so thing ids are 0..T-1).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

logger = logging.getLogger(__name__)


def contiguous_id_map(categories: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Map dataset category id -> contiguous id (the index in ``categories``)."""
    return {int(c["id"]): i for i, c in enumerate(categories)}


def load_json(path: str) -> dict[str, Any]:
    """Read a json file, raising errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Invalid JSON in {path}: {e}") from e


def get_panoptic_metadata(categories: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mask2Former-style class metadata of ordered ``categories`` (``id``, ``name``,
    ``isthing``, ``color``; things first): ``thing_*`` of the things, ``stuff_*`` of ALL classes
    (so that ``SemSegEvaluator`` and ``Visualizer.draw_sem_seg`` work)."""
    flags = [bool(c["isthing"]) for c in categories]
    if flags != sorted(flags, reverse=True):
        raise ValueError("Panoptic categories must list all thing classes before the stuff ones.")
    things = [c for c in categories if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [list(c["color"]) for c in things],
        "stuff_classes": [c["name"] for c in categories],
        "stuff_colors": [list(c["color"]) for c in categories],
        "thing_dataset_id_to_contiguous_id": contiguous_id_map(things),  # the things come first
        "stuff_dataset_id_to_contiguous_id": contiguous_id_map(categories),
    }


def load_panoptic_json_with_sem_seg(
    json_file: str,
    image_root: str,
    panoptic_root: str,
    sem_seg_root: str | None,
    metadata: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Load a COCO panoptic json into Detectron2 records (see the module docstring).

    Args:
        image_root: folder of the images (file names from the json's ``images``).
        sem_seg_root: folder of the semantic PNGs (named as the panoptic PNGs), or None.
        metadata: with ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id``.
    Raises:
        FileNotFoundError: the json, or the first record's image / PNGs, do not exist.
        ValueError: invalid json, an annotation without ``segments_info``, or a ``category_id``
            unknown to the metadata (the message names the json file, image and id).
    """
    data = load_json(json_file)
    thing_map = metadata["thing_dataset_id_to_contiguous_id"]
    stuff_map = metadata["stuff_dataset_id_to_contiguous_id"]
    images = {int(img["id"]): img for img in data.get("images", [])}
    if "annotations" not in data:
        raise ValueError(f"{json_file} has no 'annotations' list")

    records = []
    for ann in data["annotations"]:
        image_id, png_name = int(ann["image_id"]), ann.get("file_name")
        if "segments_info" not in ann:
            raise ValueError(
                f"{json_file}: the annotation of image_id {image_id} ({png_name}) has no "
                "'segments_info' key"
            )
        img = images.get(image_id)
        # Fall back to COCO's convention (same stem, .jpg) when the json has no images entry.
        img_name = img["file_name"] if img else os.path.splitext(png_name)[0] + ".jpg"
        segments = []
        for seg in map(copy.deepcopy, ann["segments_info"]):
            cat = int(seg["category_id"])
            if cat in thing_map:
                seg["category_id"], seg["isthing"] = thing_map[cat], True
            elif cat in stuff_map:
                seg["category_id"], seg["isthing"] = stuff_map[cat], False
            else:
                raise ValueError(
                    f"{json_file}: segment {seg.get('id')} of image_id {image_id} ({png_name}) has "
                    f"category_id {cat}, which is not in the dataset metadata"
                )
            seg.setdefault("iscrowd", 0)
            segments.append(seg)
        record = {
            "file_name": os.path.join(image_root, img_name),
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(panoptic_root, png_name),
            "segments_info": segments,
        }
        if sem_seg_root is not None:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, png_name)
        if img and "height" in img and "width" in img:
            record["height"], record["width"] = int(img["height"]), int(img["width"])
        records.append(record)

    if not records:
        raise ValueError(f"{json_file} has no annotations")
    # only the first: the mapper names any later missing file (a stat per image costs)
    first = records[0]
    for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
        if key in first and not os.path.isfile(first[key]):
            raise FileNotFoundError(
                f"{key} of the first record of {json_file} does not exist: {first[key]}"
            )
    logger.info("Loaded %d panoptic records from %s", len(records), json_file)
    return records


def coco_panoptic_metadata() -> dict[str, Any]:
    """Class metadata of COCO panoptic (133 classes, 80 things first), Mask2Former style."""
    return get_panoptic_metadata([dict(c) for c in COCO_CATEGORIES])
