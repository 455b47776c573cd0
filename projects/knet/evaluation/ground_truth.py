"""Checks of ground truth: of an evaluation dataset before inference (one per output), of a
training set before training (:func:`check_training_dataset`).

Detectron2's evaluators read the ground truth only after the whole inference pass, and some
defects do not fail at all: PQ silently ignores a PNG segment id without a ``segments_info``
entry, and counts a ``segments_info`` id absent from its PNG as a missed segment. In training, a
missing image or a bbox-only annotation fails when the loader draws it, hours in, a polygon of
fewer than 3 points trains and then breaks COCO evaluation, and an empty or all-crowd set ends in
Detectron2's bare "No valid data found". The checks read every file once (thread pool, split over
the ranks) and name the dataset, the file and what is wrong. ``DATASETS.CHECK_GT``: "error",
"warn" (segment-id mismatches become one :class:`GroundTruthWarning` with counts; other defects
still raise) or "off". A training set's result is cached in ``$KNET_CACHE/checks`` (default
``~/.cache/knet``), keyed by the records and their files' stats.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from panopticapi.utils import rgb2id
from PIL import Image

from ..data.dataset_mappers.common import read_image_checked
from ..data.datasets.video import frame_records
from ..data.kinds import kind_of

logger = logging.getLogger(__name__)

CHECK_MODES = ("error", "warn", "off")
_MAX_LISTED = 5  # problems / ids quoted in one message
_SEGMENT_KEYS = ("id", "category_id", "iscrowd", "area")  # "area": used by the PQ computation
_ANNOTATION_KEYS = ("file_name", "image_id", "segments_info")
_CATEGORY_KEYS = ("id", "isthing")
_EXIF_ORIENTATION = 0x0112
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


def skip_checks(mode: str, message: str, name: str) -> bool:
    """Whether ``DATASETS.CHECK_GT`` is "off" (then ``message % name`` is logged); raises on an
    unknown mode."""
    if mode not in CHECK_MODES:
        raise ValueError(f"DATASETS.CHECK_GT must be one of {list(CHECK_MODES)}, got {mode!r}")
    if mode == "off":
        logger.warning(message, name)
    return mode == "off"


def _warn(message: str) -> None:
    logger.warning(message)
    if comm.is_main_process():
        warnings.warn(message, GroundTruthWarning, stacklevel=4)


def _listing(items: Sequence[Any]) -> str:
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
    """Every record (every frame of a clip record) has an existing ``file_name`` (one stat per
    image)."""
    for r in frame_records(records):
        if "file_name" not in r:
            raise ValueError(
                f"Ground truth of dataset {dataset_name!r}: record of image_id "
                f"{r.get('image_id')} has no 'file_name'"
            )
        if not PathManager.isfile(r["file_name"]):
            raise _fail(dataset_name, r["file_name"], "image does not exist")


def _record_size(record: Mapping[str, Any]) -> tuple[int, int] | None:
    has_size = "height" in record and "width" in record
    return (int(record["height"]), int(record["width"])) if has_size else None


def _rotated(image: Image.Image) -> bool:
    """Whether the EXIF orientation of an open image (applied when read) swaps height and width."""
    exif = image.getexif() if image.format != "PNG" else None  # PNG: getexif decodes
    return bool(exif) and exif.get(_EXIF_ORIENTATION) in (5, 6, 7, 8)


def _image_size(file_name: str) -> tuple[int, int]:
    """(height, width) of an image as ``read_image_checked`` returns it, without decoding it."""
    with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
        width, height = image.size
        rotated = _rotated(image)
    return (width, height) if rotated else (height, width)


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
    ``load_coco_json`` drops them), an RLE the image's ``size`` (h, w); a crowd annotation may
    have none. The mask area is computed only when ``size`` is known.
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
    height, width = label.shape[:2]
    name = "the panoptic PNG" if panoptic else "the label map"
    if not panoptic and label.ndim != 2:
        error = f"the label map has {label.shape[2]} channels; expected one"
    elif label.dtype.kind not in "ui":  # e.g. a float (mode "F") or 1-bit PNG
        error = f"the label map holds {label.dtype} values; expected integer labels (8/16-bit)"
    elif (height, width) != tuple(size):
        error = f"{name} is {width}x{height} but the image is {size[1]}x{size[0]} (width x height)"
    else:
        error = None
    if error or not panoptic:
        return _FileResult(index, path, error=error)
    png_ids = set(np.unique(rgb2id(label)).tolist()) - {0}
    png_only, json_only = sorted(png_ids - segment_ids), sorted(segment_ids - png_ids)
    return _FileResult(index, path, png_only=png_only, json_only=json_only)


def _run_sharded(
    items: Sequence[Any],
    stop: Callable[[_FileResult], bool],
    check: Callable[[Any], _FileResult] = _check_label_file,
) -> tuple[int, list[_FileResult]]:
    """``check`` of this rank's share of ``items`` in a thread pool (PIL and numpy release the
    GIL while decoding), stopping at the first bad result for which ``stop`` is true.

    Returns (items checked, bad results in item order) of all ranks, so all raise or warn alike.
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


def check_label_files(dataset_name: str, records: list[dict], key: str) -> str:
    """Every record's label file ``key`` (e.g. a video frame's) exists and has its image's size,
    read from the files' headers."""
    for r in records:
        path = r.get(key)
        if not path:
            raise _fail(dataset_name, r["file_name"], f"the record has no {key!r}")
        if not os.path.isfile(path):
            raise _fail(dataset_name, path, "the label file does not exist")
        size, label = _record_size(r) or _image_size(r["file_name"]), _image_size(path)
        if label != size:
            raise _fail(
                dataset_name,
                path,
                f"the label file is {label[1]}x{label[0]} but the image is {size[1]}x{size[0]} "
                "(width x height)",
            )
    return f"{len(records)} label files"


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


# ----------------------------------------------------------------------------- training sets
_VERSION = b"knet-training-set-check-1"  # part of the cache key: bump when the checks change
# problem kind: (what to do, modes that only warn about it); any other problem raises
PROBLEMS = {
    "empty training set": ("register the right image folder / json, or drop the dataset", ()),
    "no trainable annotation": ("give the objects to learn iscrowd=0 and a mask", ()),
    "missing image": ("restore the file, or remove its record", ()),
    "unreadable image": ("re-encode or remove the image", ()),
    "image size differs from its record": ("fix the record's height/width", ()),
    "bad label file": ("regenerate the label PNG", ()),
    NO_SEGMENTATION: ("add a polygon / RLE mask, set iscrowd=1, or remove it", ()),
    BAD_SEGMENTATION: ("fix or remove the annotation", ()),
    RLE_SIZE: ("re-encode the mask at the image's size", ()),
    SHORT_POLYGON: ("remove such polygons: COCO evaluation fails on them", ("warn",)),
    "panoptic segment ids differ from segments_info": ("fix the PNG or its json", ("warn",)),
    ZERO_AREA: ("training skips such masks; remove them", ("error", "warn")),
}


class TrainingSetError(ValueError):
    """The training set has problems that would fail or silently damage training."""


def _check_record(item: tuple[int, dict[str, Any], list[dict], str | None]) -> _FileResult:
    """Decode one record's image, compare it with the record, check its annotations / label."""
    index, record, annotations, kind = item
    file_name = record.get("file_name")
    result = _FileResult(index, str(file_name))
    add = result.problems.append
    if not file_name:
        add(("missing image", f"record of image_id {record.get('image_id')}: no 'file_name'"))
        return result
    try:
        size = tuple(read_image_checked(file_name, None, "image").shape[:2])
    except FileNotFoundError:
        add(("missing image", file_name))
        return result
    except ValueError as e:
        add(("unreadable image", str(e)))
        return result
    stated = _record_size(record)
    if stated and stated != size:
        with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
            exif = _rotated(image) and stated == size[::-1]
        why = "; its EXIF orientation turns it by 90 degrees (applied when read)" if exif else ""
        add(("image size differs from its record", f"{file_name}: {size[1]}x{size[0]}, record "
             f"{stated[1]}x{stated[0]} (width x height){why}"))  # fmt: skip
    label_key = {"panoptic": "pan_seg_file_name", "semantic": "sem_seg_file_name"}.get(kind or "")
    if kind == "video_panoptic":
        label_key = "label_file_name"
        try:
            check_label_files("", [{**record, "height": size[0], "width": size[1]}], label_key)
        except ValueError as e:
            add(("bad label file", str(e).split(": ", 1)[1]))
        return result
    if label_key and label_key not in record:
        add(("bad label file", f"{file_name}: the record has no {label_key!r}"))
    elif label_key:
        ids = {s["id"] for s in record.get("segments_info", [])} if kind == "panoptic" else None
        label = _check_label_file((index, record[label_key], size, ids))
        if label.error:
            add(("bad label file", f"{label.file_name}: {label.error}"))
        elif label.png_only or label.json_only:
            kind_ids = "panoptic segment ids differ from segments_info"
            add((kind_ids, f"{label.file_name}: {_ids_mismatch(label)}"))
    for k, ann in enumerate(annotations):
        if problem := _segmentation_problem(ann, size):
            add((problem[0], f"{file_name} annotation {ann.get('id', f'#{k}')}: {problem[1]}"))
    return result


def _annotations(name: str, records: list[dict], kind: str | None) -> list[list[dict]]:
    """Per record, its instance annotations: those of the metadata's ``json_file`` if any
    (``load_coco_json`` drops short polygons and annotation ids), else the record's."""
    if kind != "instance":
        return [[] for _ in records]
    json_file = MetadataCatalog.get(name).get("json_file", None)
    if not json_file:
        return [r.get("annotations", []) for r in records]
    by_image = collections.defaultdict(list)
    for ann in _load_json(name, json_file, "instances json").get("annotations", []):
        by_image[ann.get("image_id")].append(ann)
    return [by_image.get(r.get("image_id"), []) for r in records]


def _cache_file(name: str, records: list[dict]) -> str:
    """``$KNET_CACHE/checks/<hash>.json``, hashing the records, and the size and mtime of the
    instances json and of every file the records name."""
    digest = hashlib.sha256(_VERSION)
    # records hold plain values and, from some loaders, numpy arrays (whole, not summarised)
    as_text = json.dumps(
        records, sort_keys=True, default=lambda o: getattr(o, "tolist", o.__repr__)()
    )
    digest.update(as_text.encode())
    keys = ("file_name", "pan_seg_file_name", "sem_seg_file_name")
    files = [r[k] for r in records for k in keys if k in r]
    for path in [MetadataCatalog.get(name).get("json_file", None), *files]:
        try:
            st = os.stat(path)
            digest.update(f"{st.st_size} {st.st_mtime_ns};".encode())
        except (OSError, TypeError):  # a missing file / no json
            digest.update(b"-;")
    cache = os.environ.get("KNET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "knet")
    return os.path.join(cache, "checks", f"training_set_{digest.hexdigest()[:32]}.json")


def _find_problems(name: str, records: list[dict]) -> dict[str, list]:
    """{problem kind: [count, first examples]} of the training set ``name``."""
    kind = kind_of(name)
    if not records:
        meta = MetadataCatalog.get(name).as_dict()
        paths = {k: v for k, v in meta.items() if k.endswith(("json", "json_file", "root"))}
        return {"empty training set": [1, [f"its loader gave no record (metadata: {paths})"]]}
    annotations = _annotations(name, records, kind)
    items = [(i, r, a, kind) for i, (r, a) in enumerate(zip(records, annotations))]
    _, bad = _run_sharded(items, stop=lambda r: False, check=_check_record)
    found: dict[str, list] = {}
    for problem, detail in [p for r in bad for p in r.problems]:
        count_examples = found.setdefault(problem, [0, []])
        count_examples[0] += 1
        if len(count_examples[1]) < _MAX_LISTED:
            count_examples[1].append(detail)
    if kind in ("instance", "panoptic"):  # the masks the model learns from
        per_image = (
            [r.get("segments_info", []) for r in records] if kind == "panoptic" else annotations
        )
        objects = [a for image_objects in per_image for a in image_objects]
        if not [a for a in objects if not a.get("iscrowd", 0)]:
            crowd = f", all {len(objects)} crowd (iscrowd=1)" if objects else ""
            what = f"{len(records)} images with {len(objects)} annotations{crowd}: Detectron2 "
            what += "drops crowd-only images and K-Net learns from non-crowd masks only"
            found["no trainable annotation"] = [1, [what]]
    return found


def _report(name: str, images: int, found: dict[str, list], mode: str) -> str:
    lines = [f"Training set {name!r} ({images} images): {len(found)} kind(s) of problems:"]
    for kind, (fix, _) in PROBLEMS.items():
        if kind in found:
            count, examples = found[kind]
            lines.append(f"  {kind}: {count} ({fix}); first: {'; '.join(examples)}")
    lines.append(
        f"DATASETS.CHECK_GT={mode!r}: 'warn' trains without polygons of fewer than 3 points and "
        "mismatched panoptic ids (with a warning), 'off' skips this check."
    )
    return "\n".join(lines)


def check_training_dataset(name: str, mode: str = "error") -> None:
    """Check the training set ``name`` before training; see the module docstring.

    Args:
        mode: ``DATASETS.CHECK_GT``. "error": raise on any problem but zero-area masks (which
            training skips; warned about). "warn": polygons of fewer than 3 points (which
            Detectron2's loader drops) and panoptic segment-id mismatches only warn too. "off".
    Raises:
        TrainingSetError: every kind of problem with its count and first examples.
    """
    if skip_checks(mode, "Training set %r is not checked (DATASETS.CHECK_GT='off')", name):
        return
    start, records = time.perf_counter(), DatasetCatalog.get(name)
    records = frame_records(records)  # (clip records: their frames)
    cache_file = _cache_file(name, records)
    found = None
    if comm.is_main_process() and os.path.isfile(cache_file):
        try:
            with open(cache_file) as f:
                found = json.load(f)["problems"]
            logger.info("Training set %r was checked before (%s): not read again", name, cache_file)
        except (OSError, ValueError, KeyError):  # unreadable: check again
            found = None
    found = comm.all_gather(found)[0]  # the main process's: every rank decides alike
    if found is None:
        found = _find_problems(name, records)
        if comm.is_main_process():
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            with open(cache_file + ".tmp", "w") as f:
                json.dump({"dataset": name, "images": len(records), "problems": found}, f)
            os.replace(cache_file + ".tmp", cache_file)
        elapsed = time.perf_counter() - start
        rate = len(records) / max(elapsed, 1e-9)
        logger.info("Checked training set %r: %d images in %.1fs (%.0f images/s)",
                    name, len(records), elapsed, rate)  # fmt: skip
    if not found:
        return
    message = _report(name, len(records), found, mode)
    if any(mode not in PROBLEMS[kind][1] for kind in found):
        raise TrainingSetError(message)
    _warn(message)
