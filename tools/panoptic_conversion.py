"""Derive semantic / instance ground truth from COCO-format panoptic annotations, and prepare
ADE20K semantic labels the Detectron2 way (for the ``prepare_*`` tools and the toy generator).

* panoptic PNG: RGB, segment id = R + 256 * G + 256**2 * B (``panopticapi.utils.rgb2id``), 0 = void.
* semantic PNG: single channel uint8, contiguous class id (index in the ordered category list:
  things first, then stuff), 255 = void / ignore. Crowd segments get their class id.
* instance json: COCO instance format, things only, one annotation per thing segment (crowd ones
  with ``iscrowd=1``), RLE masks, annotation ids from 1.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from panopticapi.utils import rgb2id
from PIL import Image

from knet.data.dataset_mappers import read_image_checked
from knet.data.datasets.panoptic import contiguous_id_map, load_json

logger = logging.getLogger(__name__)

Segments = Iterable[Mapping[str, Any]]  # segments_info: ``id``, dataset ``category_id``, ...
Categories = Sequence[Mapping[str, Any]]


def read_panoptic_png(path: str) -> np.ndarray:
    """(H, W) int32 segment ids (0 = void) of an RGB panoptic PNG; FileNotFoundError /
    ValueError naming ``path`` if it is missing or cannot be decoded."""
    return rgb2id(read_image_checked(path, "RGB", "panoptic PNG")).astype(np.int32)


def semantic_from_panoptic(
    pan_ids: np.ndarray, segments_info: Segments, id_map: Mapping[int, int], ignore_label: int = 255
) -> np.ndarray:
    """(H, W) segment ids -> (H, W) uint8 contiguous class ids (``id_map`` of each segment's
    dataset ``category_id``, crowd included), ``ignore_label`` elsewhere."""
    out = np.full(pan_ids.shape, ignore_label, dtype=np.uint8)
    for seg in segments_info:
        out[pan_ids == seg["id"]] = id_map[int(seg["category_id"])]
    return out


def thing_annotations_from_panoptic(
    pan_ids: np.ndarray,
    segments_info: Segments,
    image_id: int,
    thing_ids: Iterable[int],
    first_ann_id: int,
) -> list[dict[str, Any]]:
    """COCO instance annotations (RLE, ``iscrowd`` copied, ids from ``first_ann_id``) of the thing
    segments of one image that are not empty in ``pan_ids``."""
    thing_ids = set(int(t) for t in thing_ids)
    anns = []
    for seg in segments_info:
        if int(seg["category_id"]) not in thing_ids:
            continue
        mask = pan_ids == seg["id"]
        if not mask.any():
            continue
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")  # json-ready
        anns.append(
            {
                "id": first_ann_id + len(anns),
                "image_id": image_id,
                "category_id": int(seg["category_id"]),
                "segmentation": rle,
                "area": int(mask_util.area(rle)),
                "bbox": [float(x) for x in mask_util.toBbox(rle)],
                "iscrowd": int(seg.get("iscrowd", 0)),
            }
        )
    return anns


def _load_panoptic_json(panoptic_json: str) -> dict[str, Any]:
    """The COCO panoptic json, each of whose annotations must have ``segments_info``."""
    data = load_json(panoptic_json)
    for ann in data["annotations"]:
        if "segments_info" not in ann:
            raise ValueError(
                f"{panoptic_json}: annotation {ann.get('file_name')} has no segments_info"
            )
    return data


def _semantic_worker(args: tuple[str, str, list[dict], dict[int, int]]) -> None:
    pan_path, out_path, segments_info, id_map = args
    sem = semantic_from_panoptic(read_panoptic_png(pan_path), segments_info, id_map)
    Image.fromarray(sem).save(out_path)


def prepare_semantic_from_panoptic(
    panoptic_json: str,
    panoptic_root: str,
    output_dir: str,
    categories: Categories | None = None,
    num_workers: int = 0,
) -> int:
    """Write one semantic PNG per annotation of ``panoptic_json`` (PNGs in ``panoptic_root``) into
    ``output_dir``, under the panoptic PNG's name; returns their number. ``categories``, in order,
    give the contiguous ids (default: Detectron2's ``COCO_CATEGORIES``, ids 0..132);
    ``num_workers`` processes (0: this one)."""
    categories = [dict(c) for c in COCO_CATEGORIES] if categories is None else categories
    id_map = contiguous_id_map(categories)
    data = _load_panoptic_json(panoptic_json)
    os.makedirs(output_dir, exist_ok=True)
    jobs = []
    for ann in data["annotations"]:
        for seg in ann["segments_info"]:
            if int(seg["category_id"]) not in id_map:
                raise ValueError(
                    f"{panoptic_json}: category_id {seg['category_id']} of {ann['file_name']} is "
                    "not among the given categories"
                )
        pan_path = os.path.join(panoptic_root, ann["file_name"])
        out_path = os.path.join(output_dir, ann["file_name"])
        jobs.append((pan_path, out_path, ann["segments_info"], id_map))
    if num_workers > 0:
        with mp.Pool(processes=num_workers) as pool:
            pool.map(_semantic_worker, jobs, chunksize=16)
    else:
        for job in jobs:
            _semantic_worker(job)
    logger.info("Wrote %d semantic PNGs to %s", len(jobs), output_dir)
    return len(jobs)


def prepare_instances_from_panoptic(
    panoptic_json: str, panoptic_root: str, output_json: str, categories: Categories | None = None
) -> int:
    """Write a COCO instance json (things only, annotation ids from 1, the panoptic json's
    ``images``) derived from panoptic annotations; returns the number of annotations.
    ``categories`` (default: ``COCO_CATEGORIES``) with ``isthing``: the thing ones are written."""
    categories = [dict(c) for c in COCO_CATEGORIES] if categories is None else categories
    data = _load_panoptic_json(panoptic_json)
    things = [c for c in categories if c.get("isthing", 0)]
    thing_ids = [int(c["id"]) for c in things]
    anns: list[dict[str, Any]] = []
    for ann in data["annotations"]:
        pan_ids = read_panoptic_png(os.path.join(panoptic_root, ann["file_name"]))
        anns += thing_annotations_from_panoptic(
            pan_ids, ann["segments_info"], int(ann["image_id"]), thing_ids, len(anns) + 1
        )
    cat_keys = ("id", "name", "supercategory", "isthing", "color")
    out = {
        "info": data.get("info", {}),
        "licenses": data.get("licenses", []),
        "images": data["images"],
        "annotations": anns,
        "categories": [{k: c[k] for k in cat_keys if k in c} for c in things],
    }
    os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
    with open(output_json, "w") as f:
        json.dump(out, f)
    logger.info("Wrote %d instance annotations to %s", len(anns), output_json)
    return len(anns)


def prepare_ade20k_sem_seg(
    ade_root: str,
    output_root: str | None = None,
    splits: Sequence[str] = ("training", "validation"),
) -> int:
    """Convert ``<ade_root>/annotations/<split>/*.png`` (0 = other, 1..150 = classes) into
    ``<output_root>/annotations_detectron2/<split>/*.png`` (default root: ``ade_root``) with
    ``label - 1`` in uint8 (classes 0..149, 255 = ignore); returns the number of PNGs written."""
    output_root = ade_root if output_root is None else output_root
    count = 0
    for split in splits:
        in_dir = os.path.join(ade_root, "annotations", split)
        if not os.path.isdir(in_dir):
            raise FileNotFoundError(f"ADE20K annotation folder not found: {in_dir}")
        out_dir = os.path.join(output_root, "annotations_detectron2", split)
        os.makedirs(out_dir, exist_ok=True)
        for name in sorted(os.listdir(in_dir)):
            if not name.endswith(".png"):
                continue
            path = os.path.join(in_dir, name)
            label = np.asarray(read_image_checked(path, None, "ADE20K label"), dtype=np.uint8)
            # uint8 arithmetic wraps 0 - 1 to 255, exactly like Detectron2's script
            Image.fromarray(label - np.uint8(1)).save(os.path.join(out_dir, name))
            count += 1
    logger.info("Wrote %d ADE20K label maps under %s", count, output_root)
    return count
