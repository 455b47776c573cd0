"""K-Net's built-in datasets, registered on ``import knet`` under ``$DETECTRON2_DATASETS``
(default ``datasets``, read at import; no file read):

* ``knet_toy_{train,val}_panoptic_with_sem_seg`` (with ``json_file`` for mask AP),
  ``knet_toy_{train,val}`` (its instances), ``knet_toy_sem_seg_{train,val}`` (its semantic
  labels): the synthetic toy data of ``tools/make_toy_dataset.py``, named when it is absent.
* ``coco_2017_{train,val}_panoptic_with_sem_seg``: COCO in Mask2Former's layout (unless already
  registered, e.g. by Mask2Former).
* video data (:mod:`.video`): ``kitti_step_{train,val}``, ``vipseg_{train,val}``,
  ``ytvis_2019_{train,val}`` in their official layouts, and ``knet_toy_video_{train,val}`` of
  ``tools/make_toy_video_dataset.py``; the training splits return key/reference pairs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg

from .panoptic import coco_panoptic_metadata, get_panoptic_metadata, load_panoptic_json_with_sem_seg
from .toy import TOY_CATEGORIES, get_datasets_root, require_toy_dataset, toy_dataset_dir
from .video import register_builtin_video

# Detectron2's metadata of panoptic datasets
PANOPTIC_EXTRA = {"evaluator_type": "coco_panoptic_seg", "ignore_label": 255, "label_divisor": 1000}


def register_panoptic_with_sem_seg(
    name: str, metadata: dict[str, Any], paths: dict[str, str], check: Callable | None = None
) -> None:
    """Register COCO panoptic records (with semantic labels where ``paths`` has a
    ``sem_seg_root``) and the metadata of ``register_coco_panoptic``; ``check()`` runs first."""

    def load() -> list[dict]:
        if check is not None:
            check()
        return load_panoptic_json_with_sem_seg(
            paths["panoptic_json"],
            paths["image_root"],
            paths["panoptic_root"],
            paths.get("sem_seg_root"),
            metadata,
        )

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(**paths, **metadata, **PANOPTIC_EXTRA)


def register_instances(
    name: str, load: Callable[[], list[dict]], paths: dict[str, str], metadata: dict[str, Any]
) -> None:
    """Register the instance records of ``load()`` with the thing classes of ``metadata`` and the
    ``image_root`` and ``json_file`` (mask AP scored against it) that ``paths`` has."""
    DatasetCatalog.register(name, load)
    things = {k: v for k, v in metadata.items() if k.startswith("thing_")}
    files = {k: paths[k] for k in ("image_root", "json_file") if k in paths}
    MetadataCatalog.get(name).set(**files, evaluator_type="coco", **things)


def register_sem_seg(
    name: str, load: Callable[[], list[dict]], paths: dict[str, str], metadata: dict[str, Any]
) -> None:
    """Register the label-map records of ``load()`` with the ``stuff_*`` classes and
    ``ignore_label`` (default 255) of ``metadata`` and the ``image_root`` / ``sem_seg_root`` that
    ``paths`` has."""
    DatasetCatalog.register(name, load)
    stuff = {k: v for k, v in metadata.items() if k.startswith("stuff_")}
    roots = {k: paths[k] for k in ("image_root", "sem_seg_root") if k in paths}
    kind = {"evaluator_type": "sem_seg", "ignore_label": metadata.get("ignore_label", 255)}
    MetadataCatalog.get(name).set(**roots, **kind, **stuff)


def _load_toy_sem_seg(root: str, paths: dict[str, str]) -> list[dict]:
    require_toy_dataset(root)
    records = load_sem_seg(paths["sem_seg_root"], paths["image_root"], "png", "jpg")
    with open(paths["panoptic_json"]) as f:
        images = {os.path.splitext(im["file_name"])[0]: im for im in json.load(f)["images"]}
    for r in records:
        im = images[os.path.splitext(os.path.basename(r["file_name"]))[0]]
        r.update(image_id=im["id"], height=im["height"], width=im["width"])
    return records


def _load_toy_instances(root: str, paths: dict[str, str], name: str) -> list[dict]:
    require_toy_dataset(root)
    return load_coco_json(paths["json_file"], paths["image_root"], dataset_name=name)


def register_toy(root: str) -> None:
    """The six toy datasets, with the files under ``<root>/knet_toy``."""
    meta = get_panoptic_metadata(TOY_CATEGORIES)
    toy = toy_dataset_dir(root)
    for split in ("train", "val"):
        p = {
            "image_root": os.path.join(toy, split),
            "panoptic_root": os.path.join(toy, f"panoptic_{split}"),
            "panoptic_json": os.path.join(toy, f"panoptic_{split}.json"),
            "sem_seg_root": os.path.join(toy, f"semantic_{split}"),
            "json_file": os.path.join(toy, f"instances_{split}.json"),
        }
        register_panoptic_with_sem_seg(
            f"knet_toy_{split}_panoptic_with_sem_seg", meta, p, lambda: require_toy_dataset(root)
        )
        instances = f"knet_toy_{split}"
        register_instances(instances, partial(_load_toy_instances, root, p, instances), p, meta)
        register_sem_seg(f"knet_toy_sem_seg_{split}", partial(_load_toy_sem_seg, root, p), p, meta)


def register_coco_panoptic_with_sem_seg(root: str) -> None:
    """COCO 2017 panoptic under ``<root>/coco``, unless already registered."""
    coco = os.path.join(root, "coco")
    for split in ("train", "val"):
        name = f"coco_2017_{split}_panoptic_with_sem_seg"
        if name in DatasetCatalog.list():
            continue
        paths = {
            "image_root": os.path.join(coco, f"{split}2017"),
            "panoptic_root": os.path.join(coco, f"panoptic_{split}2017"),
            "panoptic_json": os.path.join(coco, "annotations", f"panoptic_{split}2017.json"),
            "sem_seg_root": os.path.join(coco, f"panoptic_semseg_{split}2017"),
            "json_file": os.path.join(coco, "annotations", f"instances_{split}2017.json"),
        }

        def check(semantic: str = paths["sem_seg_root"]) -> None:
            if not os.path.isdir(semantic):
                raise FileNotFoundError(
                    f"Semantic labels not found: {semantic}. Create them with "
                    "tools/prepare_coco_semantic_from_panoptic.py (see datasets/README.md)."
                )

        register_panoptic_with_sem_seg(name, coco_panoptic_metadata(), paths, check)


_root = get_datasets_root()
register_toy(_root)
register_coco_panoptic_with_sem_seg(_root)
register_builtin_video(_root)
