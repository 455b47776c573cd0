"""The check of a training set before training starts (:func:`check_training_dataset`).

Otherwise a missing image or a bbox-only annotation fails when the loader draws it, hours in, a
polygon of fewer than 3 points trains and then breaks COCO evaluation, and an empty or all-crowd
set ends in Detectron2's bare "No valid data found". Every image is decoded and compared with its
record, every mask / label PNG checked with the helpers of :mod:`.ground_truth` (thread pool, split
over the ranks); all problems are reported at once. The result is cached in ``$KNET_CACHE/checks``
(default ``~/.cache/knet``), keyed by the records and their files' sizes and mtimes.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import time
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from ..data.dataset_mappers.common import read_image_checked
from ..data.kinds import kind_of
from . import ground_truth as gt

__all__ = ["TrainingSetError", "check_training_dataset"]

logger = logging.getLogger(__name__)

_VERSION = b"knet-training-set-check-1"  # part of the cache key: bump when the checks change
# problem kind: (what to do, modes that only warn about it); any other problem raises
PROBLEMS = {
    "empty training set": ("register the right image folder / json, or drop the dataset", ()),
    "no trainable annotation": ("give the objects to learn iscrowd=0 and a mask", ()),
    "missing image": ("restore the file, or remove its record", ()),
    "unreadable image": ("re-encode or remove the image", ()),
    "image size differs from its record": ("fix the record's height/width", ()),
    "bad label file": ("regenerate the label PNG", ()),
    gt.NO_SEGMENTATION: ("add a polygon / RLE mask, set iscrowd=1, or remove it", ()),
    gt.BAD_SEGMENTATION: ("fix or remove the annotation", ()),
    gt.RLE_SIZE: ("re-encode the mask at the image's size", ()),
    gt.SHORT_POLYGON: ("remove such polygons: COCO evaluation fails on them", ("warn",)),
    "panoptic segment ids differ from segments_info": ("fix the PNG or its json", ("warn",)),
    gt.ZERO_AREA: ("training skips such masks; remove them", ("error", "warn")),
}


class TrainingSetError(ValueError):
    """The training set has problems that would fail or silently damage training."""


def _check_record(item: tuple[int, dict[str, Any], list[dict], str | None]) -> gt._FileResult:
    """Decode one record's image, compare it with the record, check its annotations / label."""
    index, record, annotations, kind = item
    file_name = record.get("file_name")
    result = gt._FileResult(index, str(file_name))
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
    stated = gt._record_size(record)
    if stated and stated != size:
        with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
            exif = gt._rotated(image) and stated == size[::-1]
        why = "; its EXIF orientation turns it by 90 degrees (applied when read)" if exif else ""
        add(("image size differs from its record", f"{file_name}: {size[1]}x{size[0]}, record "
             f"{stated[1]}x{stated[0]} (width x height){why}"))  # fmt: skip
    label_key = {"panoptic": "pan_seg_file_name", "semantic": "sem_seg_file_name"}.get(kind or "")
    if label_key and label_key not in record:
        add(("bad label file", f"{file_name}: the record has no {label_key!r}"))
    elif label_key:
        ids = {s["id"] for s in record.get("segments_info", [])} if kind == "panoptic" else None
        label = gt._check_label_file((index, record[label_key], size, ids))
        if label.error:
            add(("bad label file", f"{label.file_name}: {label.error}"))
        elif label.png_only or label.json_only:
            kind_ids = "panoptic segment ids differ from segments_info"
            add((kind_ids, f"{label.file_name}: {gt._ids_mismatch(label)}"))
    for k, ann in enumerate(annotations):
        if problem := gt._segmentation_problem(ann, size):
            add((problem[0], f"{file_name} annotation {ann.get('id', f'#{k}')}: {problem[1]}"))
    return result


def _annotations(name: str, records: list[dict], kind: str | None) -> list[list[dict]]:
    """Per record, its instance annotations: those of the metadata's ``json_file`` when there is
    one (``load_coco_json`` drops short polygons and annotation ids), else the record's."""
    if kind != "instance":
        return [[] for _ in records]
    json_file = MetadataCatalog.get(name).get("json_file", None)
    if not json_file:
        return [r.get("annotations", []) for r in records]
    by_image = collections.defaultdict(list)
    for ann in gt._load_json(name, json_file, "instances json").get("annotations", []):
        by_image[ann.get("image_id")].append(ann)
    return [by_image.get(r.get("image_id"), []) for r in records]


def _cache_file(name: str, records: list[dict]) -> str:
    """``$KNET_CACHE/checks/<hash>.json``; the hash covers the records (annotations included), the
    instances json and the size and mtime of every file the records name."""
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
    _, bad = gt._run_sharded(items, stop=lambda r: False, check=_check_record)
    found: dict[str, list] = {}
    for problem, detail in [p for r in bad for p in r.problems]:
        count_examples = found.setdefault(problem, [0, []])
        count_examples[0] += 1
        if len(count_examples[1]) < gt._MAX_LISTED:
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
            training skips, as Detectron2 does; they are warned about). "warn": also polygons of
            fewer than 3 points (Detectron2's loader drops them) and panoptic segment-id
            mismatches only warn. "off": skip the check (logged).
    Raises:
        TrainingSetError: one message listing every kind of problem with its count and first
            examples (file, annotation id, what was expected).
    """
    if mode not in gt.CHECK_MODES:
        raise ValueError(f"DATASETS.CHECK_GT must be one of {list(gt.CHECK_MODES)}, got {mode!r}")
    if mode == "off":
        logger.warning("Training set %r is not checked (DATASETS.CHECK_GT='off')", name)
        return
    start, records = time.perf_counter(), DatasetCatalog.get(name)
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
    gt._warn(message)
