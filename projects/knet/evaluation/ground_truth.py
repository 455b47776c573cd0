"""Checks of an evaluation dataset's ground truth, run before inference starts
(:func:`knet.evaluation.check_evaluation_dataset` picks them per output).

Detectron2's evaluators read the ground truth only after the whole inference pass, and some
defects do not fail at all: a panoptic PNG segment id without a ``segments_info`` entry is
silently ignored by the PQ computation, a ``segments_info`` id absent from its PNG becomes a
missed segment. The checks, one per output (:func:`check_panoptic`, :func:`check_semantic`,
:func:`check_instances`), read every ground-truth file once (in a thread pool, and split over the
ranks of a distributed run) and fail within seconds with the dataset, the file and what is wrong.

The image files of every task must exist. ``DATASETS.CHECK_GT`` chooses what a segment-id
mismatch does ("error", "warn": one :class:`GroundTruthWarning` with counts, "off": skip all
checks); every other defect is an error unless the checks are off.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from panopticapi.utils import rgb2id
from PIL import Image

from ..data.dataset_mappers.common import read_image_checked

__all__ = [
    "CHECK_MODES",
    "GroundTruthWarning",
    "check_images_exist",
    "check_instances",
    "check_panoptic",
    "check_semantic",
]

logger = logging.getLogger(__name__)

CHECK_MODES = ("error", "warn", "off")
_MAX_LISTED = 5  # problems / ids quoted in one message
_SEGMENT_KEYS = ("id", "category_id", "iscrowd", "area")  # "area": used by the PQ computation
_ANNOTATION_KEYS = ("file_name", "image_id", "segments_info")
_CATEGORY_KEYS = ("id", "isthing")
_EXIF_ORIENTATION = 0x0112
# a check's records: the dataset's, loaded once, their images checked to exist
Records = Callable[[], Sequence[Mapping[str, Any]]]


class GroundTruthWarning(UserWarning):
    """Ground truth that evaluation tolerates but that likely makes its results wrong."""


@dataclass
class _FileResult:
    """Outcome of one ground-truth file: a fatal error, or segment ids that do not match."""

    index: int
    file_name: str
    error: str | None = None
    png_only: list[int] = field(default_factory=list)  # in the PNG, not in segments_info
    json_only: list[int] = field(default_factory=list)  # in segments_info, not in the PNG
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail): training set

    @property
    def bad(self) -> bool:
        return self.error is not None or bool(self.png_only or self.json_only or self.problems)


def _fail(dataset_name: str, file_name: str, what: str) -> ValueError:
    return ValueError(f"Ground truth of dataset {dataset_name!r}: {file_name}: {what}")


def _warn(message: str) -> None:
    logger.warning(message)
    if comm.is_main_process():
        warnings.warn(message, GroundTruthWarning, stacklevel=4)


def _listing(items: Sequence[Any]) -> str:
    """The first items of a list, with the total when some are left out."""
    shown = ", ".join(str(x) for x in items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown}, ... ({len(items)} in all)"


def _missing(obj: Any, keys: Sequence[str]) -> list[str]:
    return [k for k in keys if not isinstance(obj, dict) or k not in obj]


def _load_json(dataset_name: str, path: str | None, what: str) -> dict[str, Any]:
    if not path:
        raise ValueError(f"Ground truth of dataset {dataset_name!r}: the metadata has no {what}")
    if not PathManager.isfile(path):
        raise _fail(dataset_name, path, f"{what} does not exist")
    try:
        with PathManager.open(path, "r") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise _fail(dataset_name, path, f"cannot read {what}: {e}") from e
    if not isinstance(data, dict):
        raise _fail(dataset_name, path, f"{what} is not a json object")
    return data


def check_images_exist(dataset_name: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Every record has an existing ``file_name`` (one stat per image)."""
    for r in records:
        if "file_name" not in r:
            raise ValueError(
                f"Ground truth of dataset {dataset_name!r}: record of image_id "
                f"{r.get('image_id')} has no 'file_name'"
            )
        if not PathManager.isfile(r["file_name"]):
            raise _fail(dataset_name, r["file_name"], "image does not exist")


def _record_size(record: Mapping[str, Any]) -> tuple[int, int] | None:
    if "height" in record and "width" in record:
        return int(record["height"]), int(record["width"])
    return None


def _rotated(image: Image.Image) -> bool:
    """Whether the EXIF orientation of an open image turns it by 90 degrees (as Detectron2's
    ``read_image`` applies it), which swaps its height and width."""
    exif = image.getexif() if image.format != "PNG" else None  # PNG: getexif decodes
    return bool(exif) and exif.get(_EXIF_ORIENTATION) in (5, 6, 7, 8)


def _image_size(file_name: str) -> tuple[int, int]:
    """(height, width) of an image as ``read_image_checked`` returns it, from its header and
    EXIF orientation only (no pixel decoding)."""
    with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
        width, height = image.size
        rotated = _rotated(image)
    return (width, height) if rotated else (height, width)


# kinds of segmentation problems (:func:`_segmentation_problem`)
NO_SEGMENTATION = "annotation without segmentation"
SHORT_POLYGON = "polygon of fewer than 3 points"
RLE_SIZE = "RLE size differs from the image"
BAD_SEGMENTATION = "segmentation that cannot be decoded"
ZERO_AREA = "zero-area mask"


def _segmentation_problem(
    ann: Mapping[str, Any], size: Sequence[int] | None
) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with a COCO annotation's ``segmentation``, or None.

    Polygons need an even count of >= 6 numbers (pycocotools' evaluation fails on fewer, while
    Detectron2's ``load_coco_json`` drops them), an RLE the image's ``size`` ([height, width]);
    a crowd annotation may have none. The mask area is computed only when ``size`` is known.
    """
    segm = ann.get("segmentation")
    if not segm:
        return None if ann.get("iscrowd", 0) else (NO_SEGMENTATION, "a box only")
    try:
        if isinstance(segm, dict):
            if size is not None and list(segm["size"]) != list(size):
                return RLE_SIZE, f"RLE size {list(segm['size'])}, image {list(size)} (h, w)"
            rle = segm
            if isinstance(segm["counts"], list):
                rle = mask_util.frPyObjects(segm, *segm["size"])
        else:
            lengths = [len(p) for p in segm]
            if any(n < 6 or n % 2 for n in lengths):
                return SHORT_POLYGON, f"polygons of {lengths} numbers; expected an even count >= 6"
            if size is None:
                return None
            rle = mask_util.frPyObjects(segm, *size)
        area = int(np.sum(mask_util.area(rle)))
    except (TypeError, ValueError, KeyError) as e:
        return BAD_SEGMENTATION, f"{type(e).__name__}: {e}"
    return (ZERO_AREA, "the mask has no pixel") if area == 0 else None


# (index, label PNG, the image's (height, width) or its file, segment ids: None if semantic)
_LabelFile = tuple[int, str, tuple[int, int] | str, set[int] | None]


def _check_label_file(item: _LabelFile) -> _FileResult:
    """Read one label PNG (a panoptic one if it has segment ids), compare it with its image."""
    index, path, size, segment_ids = item
    panoptic = segment_ids is not None
    what = "panoptic PNG" if panoptic else "semantic label PNG"
    try:
        label = read_image_checked(path, "RGB" if panoptic else None, what)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            reason = "does not exist"
        else:  # what read_image_checked's exception says, without the file name (quoted anyway)
            cause = e.__cause__
            reason = f"cannot be decoded ({type(cause).__name__}: {cause})" if cause else str(e)
        return _FileResult(index, path, error=f"{what} {reason}")
    try:
        size = _image_size(size) if isinstance(size, str) else size
    except OSError as e:  # the image header (its existence was checked before)
        return _FileResult(index, path, error=f"cannot read the image {size}: {e}")
    if not panoptic and label.ndim != 2:
        error = f"the label map has {label.shape[2]} channels; expected one"
        return _FileResult(index, path, error=error)
    if label.dtype.kind not in "ui":  # e.g. a float (mode "F") or 1-bit PNG
        error = f"the label map holds {label.dtype} values; expected integer labels (8/16-bit)"
        return _FileResult(index, path, error=error)
    height, width = label.shape[:2]
    if (height, width) != tuple(size):
        name = "the panoptic PNG" if panoptic else "the label map"
        error = f"{name} is {width}x{height} but the image is {size[1]}x{size[0]} (width x height)"
        return _FileResult(index, path, error=error)
    if not panoptic:
        return _FileResult(index, path)
    png_ids = set(np.unique(rgb2id(label)).tolist()) - {0}
    png_only, json_only = sorted(png_ids - segment_ids), sorted(segment_ids - png_ids)
    return _FileResult(index, path, png_only=png_only, json_only=json_only)


def _run_sharded(
    items: Sequence[Any],
    stop: Callable[[_FileResult], bool],
    check: Callable[[Any], _FileResult] = _check_label_file,
) -> tuple[int, list[_FileResult]]:
    """``check`` (default: :func:`_check_label_file`) of this rank's share of ``items`` in a
    thread pool (PIL and numpy release the GIL while decoding), and the bad results of all ranks.

    A rank stops at its first bad result for which ``stop`` is true, so that a fatal defect is
    reported without reading the rest. Returns (number of items checked, bad results in item
    order); every rank returns the same, so every rank raises or warns alike.
    """
    shard = items[comm.get_rank() :: comm.get_world_size()]
    checked, bad = 0, []
    workers = max(1, min(8, (os.cpu_count() or 1) // comm.get_world_size()))
    executor = ThreadPoolExecutor(workers)
    try:
        for result in executor.map(check, shard):
            checked += 1
            if result.bad:
                bad.append(result)
                if stop(result):
                    break
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    gathered = comm.all_gather((checked, bad))
    return (
        sum(n for n, _ in gathered),
        sorted((r for _, b in gathered for r in b), key=lambda r: r.index),
    )


def _panoptic_structure_problems(data: Mapping[str, Any]) -> list[str]:
    """Missing keys and inconsistent ids of a COCO panoptic json (no file access)."""
    problems = [
        f"no '{k}' list" for k in ("annotations", "categories") if not isinstance(data.get(k), list)
    ]
    if problems:
        return problems
    category_ids = set()
    for i, cat in enumerate(data["categories"]):
        if missing := _missing(cat, _CATEGORY_KEYS):
            problems.append(f"category #{i} has no {missing}")
        else:
            category_ids.add(cat["id"])
    for i, ann in enumerate(data["annotations"]):
        if missing := _missing(ann, _ANNOTATION_KEYS):
            problems.append(f"annotation #{i} has no {missing}")
            continue
        where = f"annotation of image_id {ann['image_id']} ({ann['file_name']})"
        if not isinstance(ann["segments_info"], list):
            problems.append(f"{where}: 'segments_info' is not a list")
            continue
        seen = set()
        for j, seg in enumerate(ann["segments_info"]):
            if missing := _missing(seg, _SEGMENT_KEYS):
                problems.append(f"{where}: segment #{j} has no {missing}")
                continue
            if seg["id"] == 0:
                problems.append(f"{where}: segment #{j} has id 0, which is reserved for void")
            elif seg["id"] in seen:
                problems.append(f"{where}: segment id {seg['id']} occurs twice")
            seen.add(seg["id"])
            if seg["category_id"] not in category_ids:
                problems.append(
                    f"{where}: segment {seg['id']} has category_id {seg['category_id']}, which "
                    "is not in 'categories'"
                )
    return problems


def _ids_mismatch(r: _FileResult) -> str:
    parts = []
    if r.png_only:
        parts.append(f"ids in the PNG without a segments_info entry: {_listing(r.png_only)}")
    if r.json_only:
        parts.append(f"segments_info ids absent from the PNG: {_listing(r.json_only)}")
    return "; ".join(parts)


def check_panoptic(dataset_name: str, metadata: Any, load_records: Records, mode: str) -> str:
    """The panoptic json's structure, then every annotation's PNG: it exists, decodes, has the
    image's size, and its segment ids (0 = void) are exactly the ``segments_info`` ids."""
    json_file = metadata.get("panoptic_json", None)
    data = _load_json(dataset_name, json_file, "panoptic json (metadata 'panoptic_json')")
    problems = _panoptic_structure_problems(data)
    if problems:
        raise _fail(dataset_name, json_file, f"{len(problems)} problem(s): {_listing(problems)}")
    records = load_records()
    panoptic_root = metadata.get("panoptic_root", None)
    if not panoptic_root:
        raise ValueError(f"Ground truth of dataset {dataset_name!r}: no 'panoptic_root' metadata")

    # every annotation needs a prediction: the PQ computation fails on one without
    record_ids = {r.get("image_id") for r in records}
    orphans = [a for a in data["annotations"] if a["image_id"] not in record_ids]
    if orphans:
        raise _fail(
            dataset_name,
            os.path.join(panoptic_root, orphans[0]["file_name"]),
            f"image_id {orphans[0]['image_id']} is not an image of the dataset, so it gets no "
            f"prediction ({len(orphans)} such annotations in {json_file})",
        )
    # the image's (height, width): the json's images entry, else the record's height/width,
    # else (a file name) the image file's header, read by the worker
    sizes = {r.get("image_id"): _record_size(r) or r["file_name"] for r in records}
    for im in data.get("images", []):
        if isinstance(im, dict) and {"id", "height", "width"} <= im.keys():
            sizes[im["id"]] = (int(im["height"]), int(im["width"]))
    items = []
    for i, ann in enumerate(data["annotations"]):
        png = os.path.join(panoptic_root, ann["file_name"])
        items.append((i, png, sizes.get(ann["image_id"]), {s["id"] for s in ann["segments_info"]}))
    checked, bad = _run_sharded(items, stop=lambda r: r.error is not None or mode == "error")
    for r in bad:
        if r.error is not None:
            raise _fail(dataset_name, r.file_name, r.error)
    if bad and mode == "error":
        raise _fail(
            dataset_name,
            bad[0].file_name,
            f"segment ids do not match the segments_info of {json_file}: {_ids_mismatch(bad[0])}"
            " (DATASETS.CHECK_GT='warn' evaluates anyway, with a warning)",
        )
    if bad:
        png_only = sum(len(r.png_only) for r in bad)
        json_only = sum(len(r.json_only) for r in bad)
        _warn(
            f"Ground truth of dataset {dataset_name!r}: {len(bad)} of {checked} panoptic PNGs "
            f"under {panoptic_root} have segment ids that do not match their segments_info in "
            f"{json_file}: {png_only} ids in the PNGs without a segments_info entry, {json_only} "
            f"segments_info ids absent from the PNGs; PQ may be wrong. First: "
            f"{bad[0].file_name}: {_ids_mismatch(bad[0])}"
        )
    return f"{checked} panoptic PNGs"


def check_semantic(dataset_name: str, metadata: Any, load_records: Records, mode: str) -> str:
    """Every ``sem_seg_file_name`` exists, decodes to one channel, has the image's size."""
    records = load_records()
    for r in records:
        if "sem_seg_file_name" not in r:
            raise _fail(dataset_name, r["file_name"], "the record has no 'sem_seg_file_name'")
    items = [
        (i, r["sem_seg_file_name"], _record_size(r) or r["file_name"], None)
        for i, r in enumerate(records)
    ]
    checked, bad = _run_sharded(items, stop=lambda r: True)
    if bad:
        raise _fail(dataset_name, bad[0].file_name, bad[0].error)
    return f"{checked} semantic label PNGs"


def check_instances(dataset_name: str, metadata: Any, load_records: Records, mode: str) -> str:
    """The instances json exists and has ``images`` and ``categories``; without ``annotations``
    Detectron2's ``COCOEvaluator`` only writes the predictions, which is warned about."""
    json_file = metadata.get("json_file", None)
    if not json_file:
        # Detectron2's COCOEvaluator then converts the dataset's records itself
        logger.info("%r has no 'json_file' metadata: no instances json to check", dataset_name)
        return "no instances json"
    data = _load_json(dataset_name, json_file, "instances json (metadata 'json_file')")
    missing = [k for k in ("images", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise _fail(dataset_name, json_file, f"no {missing} list(s)")
    if not isinstance(data.get("annotations"), list):
        _warn(
            f"Ground truth of dataset {dataset_name!r}: {json_file} has no 'annotations' list, "
            "so COCOEvaluator will only write the predictions, without mask AP"
        )
        return "the instances json"
    # pycocotools fails on these deep inside the evaluation, naming no file
    sizes = {
        im["id"]: (im["height"], im["width"])
        for im in data["images"]
        if isinstance(im, dict) and {"id", "height", "width"} <= im.keys()
    }
    problems = []
    for a in data["annotations"]:
        problem = _segmentation_problem(a, sizes.get(a.get("image_id")))
        if problem and problem[0] != ZERO_AREA:  # an empty mask scores as one
            where = f"annotation {a.get('id')} of image_id {a.get('image_id')}"
            problems.append(f"{where}: {problem[0]} ({problem[1]})")
    if problems:
        raise _fail(
            dataset_name, json_file, f"{len(problems)} invalid segmentations: {_listing(problems)}"
        )
    return "the instances json"
