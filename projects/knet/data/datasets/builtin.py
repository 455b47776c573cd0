"""Registration of K-Net's datasets (runs on ``import knet``; generates or reads nothing).

Registered names:

* ``knet_toy_{train,val}_panoptic_with_sem_seg``: toy panoptic records (``evaluator_type``
  ``coco_panoptic_seg``; ``json_file`` points at the toy instance json for mask AP).
* ``knet_toy_{train,val}``: toy instances (Detectron2 COCO format, ``evaluator_type="coco"``).
* ``knet_toy_sem_seg_{train,val}``: toy semantic segmentation (``evaluator_type="sem_seg"``).
* ``coco_sample_val_panoptic_with_sem_seg`` / ``coco_sample_val``: the 2 real COCO val images of
  the shared sample (``$KNET_SHARED_DATA/coco_panoptic_sample``), semantic PNGs and instance json
  derived into ``$KNET_CACHE/prepared`` on first use.
* ``ade20k_sample_sem_seg_{train,val}``: the shared ADE20K street-scene sample, labels converted
  into ``$KNET_CACHE/prepared`` on first use.
* ``coco_2017_{train,val}_panoptic_with_sem_seg``: full COCO, Mask2Former's layout (skipped if
  already registered, e.g. by Mask2Former).

Paths in the metadata and in the loaders are resolved when used (see :mod:`.catalog`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, List

from detectron2.data.datasets import load_coco_json, load_sem_seg
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from .catalog import register_dataset
from .panoptic import (
    coco_panoptic_metadata,
    coco_panoptic_with_sem_seg_paths,
    get_panoptic_metadata,
    load_panoptic_json_with_sem_seg,
)
from .paths import file_lock, get_prepared_root, require_shared_path
from .prepare import (
    prepare_ade20k_sem_seg,
    prepare_instances_from_panoptic,
    prepare_semantic_from_panoptic,
)
from .toy import TOY_CATEGORIES, ensure_toy_dataset

__all__ = [
    "get_toy_metadata",
    "toy_paths",
    "coco_sample_paths",
    "ade20k_sample_paths",
    "register_all",
]

TOY_SPLITS = ("train", "val")
ADE_SPLITS = {"train": "training", "val": "validation"}
_PANOPTIC_EXTRA = {
    "evaluator_type": "coco_panoptic_seg",
    "ignore_label": 255,
    "label_divisor": 1000,
}


# --------------------------------------------------------------------------- toy
def get_toy_metadata() -> Dict[str, Any]:
    """Class metadata of the toy dataset (no files needed): Mask2Former panoptic convention."""
    return get_panoptic_metadata(TOY_CATEGORIES)


def toy_paths(split: str) -> Dict[str, str]:
    """Paths of toy ``split`` files; generates the toy dataset first if it is absent."""
    root = ensure_toy_dataset()
    return {
        "image_root": os.path.join(root, split),
        "panoptic_root": os.path.join(root, f"panoptic_{split}"),
        "panoptic_json": os.path.join(root, f"panoptic_{split}.json"),
        "sem_seg_root": os.path.join(root, f"semantic_{split}"),
        "json_file": os.path.join(root, f"instances_{split}.json"),
    }


def _lazy(paths_fn: Callable[[], Dict[str, str]], keys: List[str]) -> Dict[str, Callable[[], str]]:
    return {k: (lambda k=k: paths_fn()[k]) for k in keys}


def _load_toy_panoptic(split: str) -> List[dict]:
    p = toy_paths(split)
    return load_panoptic_json_with_sem_seg(
        p["panoptic_json"],
        p["image_root"],
        p["panoptic_root"],
        p["sem_seg_root"],
        get_toy_metadata(),
    )


def _load_toy_instances(split: str) -> List[dict]:
    p = toy_paths(split)
    return load_coco_json(p["json_file"], p["image_root"], dataset_name=f"knet_toy_{split}")


def _load_toy_sem_seg(split: str) -> List[dict]:
    p = toy_paths(split)
    records = load_sem_seg(p["sem_seg_root"], p["image_root"], gt_ext="png", image_ext="jpg")
    with open(p["panoptic_json"]) as f:
        images = {os.path.splitext(im["file_name"])[0]: im for im in json.load(f)["images"]}
    for r in records:
        im = images[os.path.splitext(os.path.basename(r["file_name"]))[0]]
        r.update(image_id=im["id"], height=im["height"], width=im["width"])
    return records


def _register_toy() -> None:
    meta = get_toy_metadata()
    things = {
        "thing_classes": meta["thing_classes"],
        "thing_colors": meta["thing_colors"],
        "thing_dataset_id_to_contiguous_id": meta["thing_dataset_id_to_contiguous_id"],
    }
    for split in TOY_SPLITS:
        paths = lambda s=split: toy_paths(s)  # noqa: E731
        register_dataset(
            f"knet_toy_{split}_panoptic_with_sem_seg",
            lambda s=split: _load_toy_panoptic(s),
            _lazy(
                paths, ["image_root", "panoptic_root", "panoptic_json", "sem_seg_root", "json_file"]
            ),
            **meta,
            **_PANOPTIC_EXTRA,
        )
        register_dataset(
            f"knet_toy_{split}",
            lambda s=split: _load_toy_instances(s),
            _lazy(paths, ["image_root", "json_file"]),
            evaluator_type="coco",
            **things,
        )
        register_dataset(
            f"knet_toy_sem_seg_{split}",
            lambda s=split: _load_toy_sem_seg(s),
            _lazy(paths, ["image_root", "sem_seg_root"]),
            evaluator_type="sem_seg",
            ignore_label=255,
            stuff_classes=meta["stuff_classes"],
            stuff_colors=meta["stuff_colors"],
            stuff_dataset_id_to_contiguous_id=meta["stuff_dataset_id_to_contiguous_id"],
        )


# --------------------------------------------------------------------------- shared samples
def _source_stamp(path: str) -> Dict[str, Any]:
    st = os.stat(path)
    return {"source": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _prepare_once(out_dir: str, stamp: Dict[str, Any], prepare: Callable[[str], None]) -> None:
    """Run ``prepare(tmp_dir)`` and move the result to ``out_dir`` unless it is up to date."""
    marker = os.path.join(out_dir, "_COMPLETE.json")

    def up_to_date() -> bool:
        try:
            with open(marker) as f:
                return json.load(f) == stamp
        except (OSError, ValueError):
            return False

    if up_to_date():
        return
    with file_lock(out_dir):
        if up_to_date():
            return
        tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
        try:
            prepare(tmp_dir)
            with open(os.path.join(tmp_dir, "_COMPLETE.json"), "w") as f:
                json.dump(stamp, f)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp_dir, out_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # only left over if prepare() failed


def coco_sample_paths() -> Dict[str, str]:
    """Paths of the shared COCO panoptic sample, preparing its derived files in the cache.

    Raises:
        FileNotFoundError: naming the missing folder and ``KNET_SHARED_DATA``.
    """
    sample = require_shared_path("coco_panoptic_sample", "sample_data")
    pan_json = require_shared_path("coco_panoptic_sample", "sample_data", "panoptic_examples.json")
    pan_root = require_shared_path("coco_panoptic_sample", "sample_data", "panoptic_examples")
    out_dir = os.path.join(get_prepared_root(), "coco_panoptic_sample")

    def prepare(tmp: str) -> None:
        prepare_semantic_from_panoptic(pan_json, pan_root, os.path.join(tmp, "panoptic_semseg_val"))
        prepare_instances_from_panoptic(pan_json, pan_root, os.path.join(tmp, "instances_val.json"))

    _prepare_once(out_dir, _source_stamp(pan_json), prepare)
    return {
        "image_root": os.path.join(sample, "input_images"),
        "panoptic_root": pan_root,
        "panoptic_json": pan_json,
        "sem_seg_root": os.path.join(out_dir, "panoptic_semseg_val"),
        "json_file": os.path.join(out_dir, "instances_val.json"),
    }


def _load_coco_sample() -> List[dict]:
    p = coco_sample_paths()
    return load_panoptic_json_with_sem_seg(
        p["panoptic_json"],
        p["image_root"],
        p["panoptic_root"],
        p["sem_seg_root"],
        coco_panoptic_metadata(),
    )


def _load_coco_sample_instances() -> List[dict]:
    p = coco_sample_paths()
    return load_coco_json(p["json_file"], p["image_root"], dataset_name="coco_sample_val")


def _register_coco_sample() -> None:
    meta = coco_panoptic_metadata()
    register_dataset(
        "coco_sample_val_panoptic_with_sem_seg",
        _load_coco_sample,
        _lazy(
            coco_sample_paths,
            ["image_root", "panoptic_root", "panoptic_json", "sem_seg_root", "json_file"],
        ),
        **meta,
        **_PANOPTIC_EXTRA,
    )
    register_dataset(
        "coco_sample_val",
        _load_coco_sample_instances,
        _lazy(coco_sample_paths, ["image_root", "json_file"]),
        evaluator_type="coco",
        thing_classes=meta["thing_classes"],
        thing_colors=meta["thing_colors"],
        thing_dataset_id_to_contiguous_id=meta["thing_dataset_id_to_contiguous_id"],
    )


def ade20k_sample_paths(split: str) -> Dict[str, str]:
    """Paths of the shared ADE20K sample ``split`` ("train"/"val"), labels prepared in the cache."""
    ade = require_shared_path("ade20k_sample", "ADEChallengeData2016")
    out_dir = os.path.join(get_prepared_root(), "ade20k_sample", "ADEChallengeData2016")
    stamp = {"source": os.path.abspath(ade), "files": sorted(_list_pngs(ade))}
    _prepare_once(out_dir, stamp, lambda tmp: prepare_ade20k_sem_seg(ade, tmp))
    return {
        "image_root": os.path.join(ade, "images", ADE_SPLITS[split]),
        "sem_seg_root": os.path.join(out_dir, "annotations_detectron2", ADE_SPLITS[split]),
    }


def _list_pngs(ade: str) -> List[str]:
    out = []
    for split in ADE_SPLITS.values():
        d = os.path.join(ade, "annotations", split)
        if os.path.isdir(d):
            out += [f"{split}/{n}:{os.path.getsize(os.path.join(d, n))}" for n in os.listdir(d)]
    return out


def _register_ade20k_sample() -> None:
    for split in ADE_SPLITS:
        paths = lambda s=split: ade20k_sample_paths(s)  # noqa: E731
        register_dataset(
            f"ade20k_sample_sem_seg_{split}",
            lambda p=paths: load_sem_seg(p()["sem_seg_root"], p()["image_root"], "png", "jpg"),
            _lazy(paths, ["image_root", "sem_seg_root"]),
            stuff_classes=list(ADE20K_SEM_SEG_CATEGORIES),
            evaluator_type="sem_seg",
            ignore_label=255,
        )


# --------------------------------------------------------------------------- full COCO
def _load_coco_full(split: str) -> List[dict]:
    p = coco_panoptic_with_sem_seg_paths(split)
    if not os.path.isdir(p["sem_seg_root"]):
        raise FileNotFoundError(
            f"Semantic labels not found: {p['sem_seg_root']}. Create them with "
            "tools/prepare_coco_semantic_from_panoptic.py (see datasets/README.md)."
        )
    return load_panoptic_json_with_sem_seg(
        p["panoptic_json"],
        p["image_root"],
        p["panoptic_root"],
        p["sem_seg_root"],
        coco_panoptic_metadata(),
    )


def _register_coco_full() -> None:
    meta = coco_panoptic_metadata()
    for split in ("train", "val"):
        paths = lambda s=split: coco_panoptic_with_sem_seg_paths(s)  # noqa: E731
        register_dataset(
            f"coco_2017_{split}_panoptic_with_sem_seg",
            lambda s=split: _load_coco_full(s),
            _lazy(
                paths, ["image_root", "panoptic_root", "panoptic_json", "sem_seg_root", "json_file"]
            ),
            **meta,
            **_PANOPTIC_EXTRA,
        )


def register_all() -> None:
    """Register every K-Net dataset (idempotent: already registered names are skipped)."""
    _register_toy()
    _register_coco_sample()
    _register_ade20k_sample()
    _register_coco_full()
