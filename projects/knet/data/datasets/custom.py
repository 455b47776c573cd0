"""Register your own dataset from files: COCO instances, COCO panoptic or semantic label maps.

:func:`register_custom_dataset` in Python, and the same from the command line of
``train_net.py`` and ``demo/demo.py`` (``knet.engine.arguments``)::

    --dataset NAME coco-instances JSON IMAGE_ROOT
    --dataset NAME coco-panoptic JSON PNG_DIR IMAGE_ROOT
    --dataset NAME sem-seg IMAGE_DIR LABEL_DIR --classes CLASSES.txt [--ignore-label 255]
                                                [--image-ext jpg] [--label-ext png]
    --dataset NAME sem-seg-list LIST_FILE --classes CLASSES.txt [--ignore-label 255]

Each registers exactly ``NAME`` (one per split: ``DATASETS.TRAIN`` / ``DATASETS.TEST``), with
Detectron2's records and metadata, so training, the evaluators and the visualiser all work:

* ``coco-instances``: ``register_coco_instances``, with the class metadata set at registration
  (as ``load_coco_json`` computes it), so that the class count is known before loading.
* ``coco-panoptic``: ``register_coco_panoptic`` (PQ), with the images named by the json's
  ``images`` (Detectron2 assumes ``<png name>.jpg``) and the thing classes first
  (:func:`knet.data.datasets.get_panoptic_metadata`).
* ``sem-seg``: ``load_sem_seg`` (label PNGs matched to images by relative path),
  ``evaluator_type="sem_seg"``, ``ignore_label``, and ``stuff_classes`` from ``CLASSES.txt``
  (line ``k``, counted from 0, names label value ``k``; a first line ``__ignore__``, as labelme
  writes it, is skipped).
* ``sem-seg-list``: the same, with the image / label pairs listed in a text file.

Categories without annotations (e.g. a labelling tool's ``_background_``) are reported in one
warning; ``drop_categories`` (``DATASETS.DROP_CATEGORIES``) leaves those named out of the class
list, ``drop_empty`` (``DATASETS.DROP_EMPTY_CATEGORIES``, for the training datasets) all of them,
and the metadata's ``dropped_categories`` lists the names left out.
Registration reads the json (or the class list) and checks that the folders exist.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets import load_coco_json, load_sem_seg, register_coco_instances
from detectron2.utils.colormap import colormap

from .builtin import register_instances, register_panoptic_with_sem_seg, register_sem_seg
from .panoptic import get_panoptic_metadata, load_json

__all__ = ["DATASET_FORMATS", "DatasetFormat", "register_custom_dataset"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# names under which labelling tools export a background category
BACKGROUND_NAMES = {"_background_", "__background__", "background", "bg"}

# name -> the arguments it was registered with (registering the same again is a no-op)
_REGISTERED: dict[str, tuple[Any, ...]] = {}


def register_custom_dataset(
    name: str, fmt: str, *paths: str, drop_categories: Sequence[str] = (), **options: Any
) -> Metadata:
    """Register dataset ``name`` from the files ``paths`` in format ``fmt`` (a key of
    :data:`DATASET_FORMATS`) and return its metadata.

    Args:
        drop_categories: names of categories without annotations to leave out.
        options: ``drop_empty``: leave out every category without annotations (not label maps,
            whose classes are their label values); the sem-seg formats take ``classes`` (a text
            file with one class name per line, or the list of names) and ``ignore_label`` (255),
            sem-seg also ``image_ext`` (default: the one extension of the images) and
            ``label_ext`` ("png").
    Raises:
        FileNotFoundError: a file or folder does not exist (named in the message).
        ValueError: bad arguments or annotations, or ``name`` already registered otherwise.
    """
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; one of: {', '.join(DATASET_FORMATS)}")
    spec = DATASET_FORMATS[fmt]
    if len(paths) != len(spec.positional):
        raise ValueError(
            f"{fmt} dataset {name!r} takes {len(spec.positional)} paths: "
            + ", ".join(spec.positional)
        )
    if not options.get("drop_empty") or spec.kind == "semantic":
        options.pop("drop_empty", None)  # (a label map's classes are its label values)
    unknown = sorted(set(options) - {spec.keyword(o) for o in spec.options} - {"drop_empty"})
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not options of {fmt} datasets")
    paths = tuple(os.fspath(p) for p in paths)
    options_key = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    key = (fmt, paths, options_key, tuple(drop_categories))
    if _REGISTERED.get(name) == key:
        return MetadataCatalog.get(name)
    if name in DatasetCatalog.list():
        raise ValueError(
            f"a dataset named {name!r} is already registered"
            + (" with other files" if name in _REGISTERED else "")
            + "; register yours under another name"
        )
    spec.register(name, *paths, drop_categories=drop_categories, **options)
    _REGISTERED[name] = key
    return MetadataCatalog.get(name)


def palette(n: int) -> list[list[int]]:
    """``n`` distinct RGB colours: Detectron2's colormap, then deterministic random colours."""
    base = [[int(round(c)) for c in rgb] for rgb in colormap(rgb=True, maximum=255)]
    extra = np.random.default_rng(0).integers(0, 256, size=(max(n - len(base), 0), 3))
    return (base + extra.tolist())[:n]


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found (or not a folder): {path}")


def _require_lists(json_file: str, data: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    for key in keys:
        if not isinstance(data.get(key), list):
            raise ValueError(f"{json_file} has no {key!r} list: not a COCO {what} json")


def _split_categories(
    name: str,
    source: str,
    categories: Sequence[Mapping[str, Any]],
    counts: Mapping[int, int],
    what: str,
    drop_categories: Sequence[str],
    drop_empty: bool = False,
) -> list[Mapping[str, Any]]:
    """The categories to keep; report unused ones, drop the requested unused ones (all unused
    ones with ``drop_empty``) and list them in the metadata's ``dropped_categories``."""

    def listed(cats: Sequence[Mapping[str, Any]]) -> str:
        return ", ".join(f"{c['name']!r} (id {c['id']})" for c in cats)

    unused = [c for c in categories if not counts.get(int(c["id"]), 0)]
    dropped = [c for c in categories if c["name"] in drop_categories or drop_empty and c in unused]
    used = [c for c in dropped if counts.get(int(c["id"]), 0)]
    if used:
        c = used[0]
        raise ValueError(
            f"Dataset {name!r}: cannot drop category {c['name']!r} (id {c['id']}): "
            f"{counts[int(c['id'])]} {what} of {source} use it; only categories without "
            "annotations can be dropped"
        )
    kept = [c for c in categories if c not in dropped]
    if not kept:
        raise ValueError(f"Dataset {name!r}: no category left in {source}")
    if dropped:
        MetadataCatalog.get(name).set(dropped_categories=[c["name"] for c in dropped])
        logger.info(
            f"Dataset {name!r}: left out the categories without {what} {listed(dropped)} "
            "(DATASETS.DROP_CATEGORIES / DROP_EMPTY_CATEGORIES)"
        )
    empty = [c for c in kept if not counts.get(int(c["id"]), 0)]
    if empty:
        names = [c["name"] for c in empty]
        background = any(n.lower() in BACKGROUND_NAMES for n in names)
        logger.warning(
            f"Dataset {name!r}: {len(empty)} of {len(kept)} categories have no {what} in "
            f"{source}: {listed(empty)}."
            + (" A background class exported by the labelling tool?" if background else "")
            + " They count as classes the model must learn; to leave them out, add "
            "DATASETS.DROP_EMPTY_CATEGORIES True to the training command (its config.yaml "
            "records them for later commands)."
        )
    return kept


def _register_coco_instances(name: str, json_file: str, image_root: str, **drop: Any) -> None:
    data = load_json(json_file)
    _require_dir(image_root, f"Image folder of {json_file}")
    _require_lists(json_file, data, ("images", "annotations", "categories"), "instances")
    categories = sorted(data["categories"], key=lambda c: int(c["id"]))
    if not categories:
        raise ValueError(f"{json_file} has an empty 'categories' list")
    counts = collections.Counter(int(a["category_id"]) for a in data["annotations"])
    kept = _split_categories(name, json_file, categories, counts, "annotations", **drop)
    # as load_coco_json computes them (it sets the same values when loading)
    colors = palette(len(kept))
    id_map = {int(c["id"]): i for i, c in enumerate(kept)}
    metadata = {
        "thing_classes": [c["name"] for c in kept],
        "thing_colors": [list(c.get("color", colors[i])) for i, c in enumerate(kept)],
        "thing_dataset_id_to_contiguous_id": id_map,
    }
    lacking = sum(1 for a in data["annotations"] if "area" not in a or "iscrowd" not in a)
    if len(kept) == len(categories) and not lacking:
        register_coco_instances(name, metadata, json_file, image_root)
        return
    # Without "json_file" in the metadata, COCOEvaluator converts the records (kept categories,
    # areas from the masks) into the COCO json it evaluates against.
    if lacking:
        logger.info(
            f"Dataset {name!r}: {lacking} annotations of {json_file} lack 'area' or 'iscrowd'; "
            "mask AP is computed against the COCO json Detectron2's COCOEvaluator converts from "
            "the records"
        )
    load = partial(_load_coco_instances, json_file, image_root, id_map)
    register_instances(name, load, {"image_root": image_root}, metadata)


def _load_coco_instances(
    json_file: str, image_root: str, id_map: Mapping[int, int]
) -> list[dict[str, Any]]:
    """``load_coco_json`` with the category ids mapped by ``id_map`` (some categories left out)."""
    records = load_coco_json(json_file, image_root, dataset_name=None)
    for record in records:
        for obj in record["annotations"]:
            obj["category_id"] = id_map[int(obj["category_id"])]
    return records


def _register_coco_panoptic(
    name: str, json_file: str, png_dir: str, image_root: str, **drop: Any
) -> None:
    data = load_json(json_file)
    _require_dir(png_dir, f"Panoptic PNG folder of {json_file}")
    _require_dir(image_root, f"Image folder of {json_file}")
    _require_lists(json_file, data, ("annotations", "categories"), "panoptic")
    for c in data["categories"]:
        missing = [k for k in ("id", "name", "isthing") if k not in c]
        if missing:
            raise ValueError(f"{json_file}: category {c} lacks {missing}")
    # things first, then stuff, each in the json's order (a stable sort), with a colour each
    ordered = sorted(data["categories"], key=lambda c: not c["isthing"])
    colors = palette(len(ordered))
    categories = [
        {**c, "id": int(c["id"]), "color": list(c.get("color", colors[i]))}
        for i, c in enumerate(ordered)
    ]
    counts = collections.Counter(
        int(s["category_id"]) for a in data["annotations"] for s in a.get("segments_info", [])
    )
    kept = _split_categories(name, json_file, categories, counts, "segments", **drop)
    paths = {"image_root": image_root, "panoptic_root": png_dir, "panoptic_json": json_file}
    register_panoptic_with_sem_seg(name, get_panoptic_metadata(kept), paths)


def read_class_names(classes: str | Sequence[str]) -> list[str]:
    """Class names of a sem-seg dataset: a file with one name per line (see the module docstring)
    or a list."""
    if isinstance(classes, str):
        if not os.path.isfile(classes):
            raise FileNotFoundError(f"Class list not found: {classes}")
        with open(classes, encoding="utf-8") as f:
            names = [line.strip() for line in f.read().rstrip().splitlines()]
        if names and names[0] == "__ignore__":
            logger.info("%s: skipped the first line '__ignore__' (labelme's void label)", classes)
            names = names[1:]
        source = classes
    else:
        names, source = [str(c) for c in classes], "the class list"
    if not names:
        raise ValueError(f"{source} names no class")
    blank = [i for i, n in enumerate(names) if not n]
    if blank:
        raise ValueError(
            f"{source}: class {blank[0]} has an empty name; give one name per line, the line "
            "order being the label values 0, 1, 2, ..."
        )
    return names


def _guess_image_ext(image_dir: str) -> str:
    names = os.listdir(image_dir)
    found = {os.path.splitext(f)[1].lower() for f in names if f.lower().endswith(IMAGE_EXTENSIONS)}
    if not found:
        raise ValueError(f"No image ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    if len(found) > 1:
        raise ValueError(
            f"{image_dir} holds images of several types ({', '.join(sorted(found))}); "
            "choose one with --image-ext"
        )
    return found.pop()[1:]


def _sem_seg_metadata(
    name: str,
    drop: Sequence[str],
    classes: str | Sequence[str] | None = None,
    ignore_label: int = 255,
) -> dict[str, Any]:
    """The metadata of a label-map dataset with the class names of ``classes``."""
    if classes is None:
        raise ValueError(f"sem-seg dataset {name!r} needs its class names (--classes FILE)")
    names = read_class_names(classes)
    droppable = [n for n in names if n in drop]
    if droppable:
        raise ValueError(
            f"Dataset {name!r}: DATASETS.DROP_CATEGORIES names {droppable}, but the classes of a "
            "sem-seg dataset are its label values: relabel the PNGs instead"
        )
    if not 0 <= ignore_label <= 65535 or ignore_label < len(names):
        raise ValueError(
            f"Dataset {name!r}: ignore label {ignore_label} must be >= the number of classes "
            f"({len(names)}) and a valid PNG value"
        )
    return {
        "ignore_label": ignore_label,
        "stuff_classes": names,
        "stuff_colors": palette(len(names)),
        "stuff_dataset_id_to_contiguous_id": {i: i for i in range(len(names))},
    }


def _register_sem_seg(
    name: str, image_dir: str, label_dir: str, drop_categories: Sequence[str], **options: Any
) -> None:
    image_ext, label_ext = options.pop("image_ext", None), options.pop("label_ext", "png")
    metadata = _sem_seg_metadata(name, drop_categories, **options)
    _require_dir(image_dir, "Image folder")
    _require_dir(label_dir, "Label folder")
    image_ext = (image_ext or _guess_image_ext(image_dir)).lstrip(".")
    label_ext = label_ext.lstrip(".")
    load = partial(_load_sem_seg_checked, label_dir, image_dir, label_ext, image_ext)
    register_sem_seg(name, load, {"image_root": image_dir, "sem_seg_root": label_dir}, metadata)


def _load_sem_seg_checked(
    label_dir: str, image_dir: str, label_ext: str, image_ext: str
) -> list[dict[str, Any]]:
    """``load_sem_seg``, checking that each label file has the image's name (Detectron2 pairs
    the sorted lists when both folders hold as many files)."""
    records = load_sem_seg(label_dir, image_dir, gt_ext=label_ext, image_ext=image_ext)
    for r in records:
        image = os.path.splitext(os.path.relpath(r["file_name"], image_dir))[0]
        label = os.path.splitext(os.path.relpath(r["sem_seg_file_name"], label_dir))[0]
        if image != label:
            raise ValueError(
                f"{label_dir} and {image_dir} do not hold the same names: {r['sem_seg_file_name']}"
                f" is paired with {r['file_name']}; every image needs a label file of the same "
                "name"
            )
    return records


def _register_sem_seg_list(
    name: str, list_file: str, drop_categories: Sequence[str], **options: Any
) -> None:
    """Image / label-map pairs listed in a text file, one ``IMAGE LABEL`` pair per line, relative
    to the list's folder (the split files of MMSeg and DeepLab)."""
    metadata = _sem_seg_metadata(name, drop_categories, **options)
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"List file not found: {list_file}")
    register_sem_seg(name, partial(_load_sem_seg_list, list_file), {}, metadata)


def _load_sem_seg_list(list_file: str) -> list[dict[str, Any]]:
    root = os.path.dirname(list_file)
    with open(list_file, encoding="utf-8") as f:
        lines = [(i, line.split()) for i, line in enumerate(f, 1) if line.strip()]
    bad = next((i for i, pair in lines if len(pair) != 2), None)
    if bad is not None:
        raise ValueError(f"{list_file}, line {bad}: expected 'IMAGE LABEL'")
    return [
        {"file_name": os.path.join(root, image), "sem_seg_file_name": os.path.join(root, label)}
        for _, (image, label) in lines
    ]


@dataclass(frozen=True)
class DatasetFormat:
    """A format of dataset files: its kind (``knet.data.kinds``), its command-line arguments and
    its ``register(name, *paths, drop_categories, **options)``."""

    kind: str
    positional: tuple[str, ...]  # metavars of the paths
    register: Callable[..., None]
    options: tuple[str, ...] = ()  # per-dataset options (each takes one value)
    required: tuple[str, ...] = ()

    @staticmethod
    def keyword(option: str) -> str:
        """The keyword argument that ``option`` sets ("--ignore-label": "ignore_label")."""
        return option[2:].replace("-", "_")


# Adding a format is adding an entry here (and its register function above).
DATASET_FORMATS: dict[str, DatasetFormat] = {
    "coco-instances": DatasetFormat("instance", ("JSON", "IMAGE_ROOT"), _register_coco_instances),
    "coco-panoptic": DatasetFormat(
        "panoptic", ("JSON", "PNG_DIR", "IMAGE_ROOT"), _register_coco_panoptic
    ),
    "sem-seg": DatasetFormat(
        "semantic",
        ("IMAGE_DIR", "LABEL_DIR"),
        _register_sem_seg,
        ("--classes", "--ignore-label", "--image-ext", "--label-ext"),
        ("--classes",),
    ),
    "sem-seg-list": DatasetFormat(
        "semantic",
        ("LIST_FILE",),
        _register_sem_seg_list,
        ("--classes", "--ignore-label"),
        ("--classes",),
    ),
}
