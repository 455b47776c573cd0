"""The kinds of dataset K-Net trains on and evaluates: the one table every other place asks.

A dataset's kind follows from its ``evaluator_type`` metadata ("coco", "coco_panoptic_seg",
"sem_seg"). :data:`DATASET_KINDS` holds, per kind, its training mapper, meta-architecture,
outputs (scored by ``knet.evaluation``) and class-count reader (used by
``knet.engine.dataset_config``); each format of ``knet.data.datasets.custom`` names its kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from .dataset_mappers import (
    KNetInstanceDatasetMapper,
    KNetPanopticDatasetMapper,
    KNetSemanticDatasetMapper,
    KNetTestDatasetMapper,
)

AUTO = -1  # class-count value meaning "from the training dataset" (the config's default)


class DatasetClassError(ValueError):
    """The config does not fit a dataset (class counts, outputs, mapper or kernel head)."""


class DatasetNotRegisteredError(KeyError):
    """A dataset named by the config is not registered."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class DatasetClasses:
    """The classes of a registered dataset, in contiguous-id order."""

    name: str
    kind: str  # a key of DATASET_KINDS
    class_names: tuple[str, ...]
    num_thing_classes: int  # instance: all classes; semantic: 0
    ignore_label: int | None = None  # semantic data: the label value of void pixels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        names = list(self.class_names)
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        things = f", {self.num_thing_classes} things" if self.kind == "panoptic" else ""
        return f"{self.kind}, {self.num_classes} classes{things}: {shown}"


@dataclass(frozen=True)
class DatasetKind:
    """What K-Net does with one kind of dataset."""

    evaluator_type: str  # the metadata value that marks the kind
    mapper: type  # training mapper; INPUT.DATASET_MAPPER_NAME "knet_<kind>"
    meta_architecture: str
    outputs: tuple[str, ...]  # what a model trained on it predicts; the first is the default
    read_classes: Callable[[str, Any], DatasetClasses | None]  # (name, metadata)


def _instance_classes(name: str, meta: Any) -> DatasetClasses | None:
    things = meta.get("thing_classes", None)
    return DatasetClasses(name, "instance", tuple(things), len(things)) if things else None


def _semantic_classes(name: str, meta: Any) -> DatasetClasses | None:
    stuff = meta.get("stuff_classes", None)
    ignore = meta.get("ignore_label", 255)
    return DatasetClasses(name, "semantic", tuple(stuff), 0, ignore) if stuff else None


def _panoptic_classes(name: str, meta: Any) -> DatasetClasses | None:
    thing_map = meta.get("thing_dataset_id_to_contiguous_id", None) or {}
    stuff_map = meta.get("stuff_dataset_id_to_contiguous_id", None) or {}
    if not thing_map and not stuff_map:
        return None
    thing_ids = sorted(set(thing_map.values()))
    all_ids = sorted(set(thing_ids) | set(stuff_map.values()))
    n, t = len(all_ids), len(thing_ids)
    if all_ids != list(range(n)) or thing_ids != list(range(t)):
        raise DatasetClassError(
            f"Panoptic dataset {name!r}: K-Net numbers the classes 0..N-1 with the thing classes "
            f"first, but the metadata maps things to {thing_ids[:10]} and all classes to "
            f"{all_ids[:10]}"
        )
    things = list(meta.get("thing_classes", None) or [])
    stuff = list(meta.get("stuff_classes", None) or [])
    if len(stuff) == n:  # Mask2Former / K-Net: stuff_classes lists all classes
        names = stuff
    elif len(things) == n:  # Detectron2's standard panoptic metadata
        names = things
    elif len(things) == t and len(stuff) == n - t:
        names = things + stuff
    else:
        names = [str(i) for i in range(n)]
    return DatasetClasses(name, "panoptic", tuple(names), t)


DATASET_KINDS: dict[str, DatasetKind] = {
    "instance": DatasetKind(
        "coco", KNetInstanceDatasetMapper, "KNet", ("instance",), _instance_classes
    ),
    "panoptic": DatasetKind(
        "coco_panoptic_seg",
        KNetPanopticDatasetMapper,
        "KNet",
        ("panoptic", "instance", "semantic"),
        _panoptic_classes,
    ),
    "semantic": DatasetKind(
        "sem_seg", KNetSemanticDatasetMapper, "SemanticKNet", ("semantic",), _semantic_classes
    ),
}


def mapper_name(kind: str) -> str:
    """The ``INPUT.DATASET_MAPPER_NAME`` of ``kind``'s training mapper."""
    return f"knet_{kind}"


def build_train_mapper(cfg: CfgNode) -> Callable[[dict], dict]:
    """The training mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME`` (a ValueError lists the
    valid names)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    mappers = {mapper_name(kind): k.mapper for kind, k in DATASET_KINDS.items()}
    if name not in mappers:
        raise ValueError(
            f"Unknown INPUT.DATASET_MAPPER_NAME {name!r}; valid names: {', '.join(sorted(mappers))}"
        )
    return mappers[name](cfg, is_train=True)


def build_test_mapper(cfg: CfgNode) -> Callable[[dict], dict]:
    """The inference mapper for ``cfg``, whatever the training mapper is."""
    return KNetTestDatasetMapper(cfg, is_train=False)


def not_registered(name: str) -> DatasetNotRegisteredError:
    return DatasetNotRegisteredError(
        f"Dataset {name!r} (named by DATASETS.TRAIN / DATASETS.TEST) is not registered. Register "
        f"it on the command line, e.g. '--dataset {name} coco-instances JSON IMAGE_ROOT', "
        f"'--dataset {name} coco-panoptic JSON PNG_DIR IMAGE_ROOT' or '--dataset {name} sem-seg "
        "IMAGE_DIR LABEL_DIR --classes CLASSES.txt' (datasets/README.md), or in Python with "
        "knet.data.datasets.register_custom_dataset, or name a registered dataset."
    )


def kind_of(name: str) -> str | None:
    """The kind of registered dataset ``name``, or None for one K-Net does not evaluate."""
    evaluator_type = MetadataCatalog.get(name).get("evaluator_type", None)
    return next((k for k, v in DATASET_KINDS.items() if v.evaluator_type == evaluator_type), None)


def dataset_classes(name: str, load: bool = True) -> DatasetClasses | None:
    """The classes of registered dataset ``name`` from its metadata, or None (a kind K-Net does
    not evaluate, no class metadata).

    Args:
        load: without class names in the metadata (e.g. ``register_coco_instances``, whose loader
            sets them), load the dataset once.
    Raises:
        DatasetNotRegisteredError: ``name`` is not registered.
        DatasetClassError: a panoptic dataset whose contiguous ids do not put the things first.
    """
    if name not in DatasetCatalog.list():
        raise not_registered(name)
    kind = kind_of(name)
    if kind is None:
        return None
    read = DATASET_KINDS[kind].read_classes
    info = read(name, MetadataCatalog.get(name))
    if info is None and load:
        DatasetCatalog.get(name)
        info = read(name, MetadataCatalog.get(name))
    return info
