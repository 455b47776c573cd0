"""The kinds of dataset K-Net trains on and evaluates: the one table every other place asks.

A dataset's kind follows from its ``evaluator_type`` metadata ("coco", "coco_panoptic_seg",
"sem_seg", "video_panoptic", "ytvis"). :data:`DATASET_KINDS` holds, per kind, its training
mapper, meta-architecture, outputs (scored by ``knet.evaluation``) and class-count reader (used by
``knet.engine.dataset_config``); each format of ``knet.data.datasets.custom`` names its kind. A
video kind's classes are laid out as those of an image kind (:func:`class_layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

from .dataset_mappers import (
    KNetInstanceDatasetMapper,
    KNetPanopticDatasetMapper,
    KNetSemanticDatasetMapper,
    KNetTestDatasetMapper,
    KNetVideoPanopticDatasetMapper,
)

AUTO = -1  # class-count value meaning "from the training dataset" (the config's default)
# Detectron2's class metadata, as the visualiser reads it (what a model describes of itself)
CLASS_FIELDS = ("thing_classes", "thing_colors", "stuff_classes", "stuff_colors")


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
    colors: tuple[tuple[int, ...], ...] = ()  # RGB, one per class (or none)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        names = list(self.class_names)
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        panoptic = class_layout(self.kind) == "panoptic"
        things = f", {self.num_thing_classes} things" if panoptic else ""
        return f"{self.kind}, {self.num_classes} classes{things}: {shown}"


@dataclass(frozen=True)
class DatasetKind:
    """What K-Net does with one kind of dataset."""

    evaluator_type: str  # the metadata value that marks the kind
    mapper: type  # training mapper; INPUT.DATASET_MAPPER_NAME "knet_<kind>"
    meta_architecture: str
    outputs: tuple[str, ...]  # what a model trained on it predicts; the first is the default
    read_classes: Callable[[str, Any], DatasetClasses | None]  # (name, metadata)
    # the image kind whose class layout (counts, things first) this kind has; None: its own
    layout: str | None = None


def _colors(*lists: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(v) for v in c) for colors in lists for c in (colors or ()))


def _instance_classes(name: str, meta: Any) -> DatasetClasses | None:
    things = meta.get("thing_classes", None)
    colors = _colors(meta.get("thing_colors", None))
    if not things:
        return None
    return DatasetClasses(name, "instance", tuple(things), len(things), colors=colors)


def _semantic_classes(name: str, meta: Any) -> DatasetClasses | None:
    stuff = meta.get("stuff_classes", None)
    ignore = meta.get("ignore_label", 255)
    colors = _colors(meta.get("stuff_colors", None))
    return DatasetClasses(name, "semantic", tuple(stuff), 0, ignore, colors) if stuff else None


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
    thing_colors, stuff_colors = meta.get("thing_colors", None), meta.get("stuff_colors", None)
    colors = _colors(thing_colors, stuff_colors)
    if len(stuff) == n:  # Mask2Former / K-Net: stuff_classes lists all classes
        names, colors = stuff, _colors(stuff_colors)
    elif len(things) == n:  # Detectron2's standard panoptic metadata
        names, colors = things, _colors(thing_colors)
    elif len(things) == t and len(stuff) == n - t:
        names = things + stuff
    else:
        names = [str(i) for i in range(n)]
    return DatasetClasses(name, "panoptic", tuple(names), t, colors=colors)


def _video_classes(
    kind: str, read: Callable[[str, Any], DatasetClasses | None]
) -> Callable[[str, Any], DatasetClasses | None]:
    """The class reader of video ``kind``: ``read``'s classes, marked with ``kind``."""

    def read_video(name: str, meta: Any) -> DatasetClasses | None:
        info = read(name, meta)
        return None if info is None else replace(info, kind=kind)

    return read_video


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
    # key/reference frame pairs and clips (knet.data.datasets.video); one mapper reads both kinds
    "video_panoptic": DatasetKind(
        "video_panoptic",
        KNetVideoPanopticDatasetMapper,
        "VideoKNet",
        ("panoptic",),
        _video_classes("video_panoptic", _panoptic_classes),
        layout="panoptic",
    ),
    "video_instance": DatasetKind(
        "ytvis",
        KNetVideoPanopticDatasetMapper,
        "VideoKNetClip",
        ("instance",),
        _video_classes("video_instance", _instance_classes),
        layout="instance",
    ),
}


def class_layout(kind: str) -> str:
    """The image kind ("instance", "panoptic", "semantic") whose class layout ``kind`` has:
    "video_panoptic" -> "panoptic", "video_instance" -> "instance", an image kind -> itself."""
    return DATASET_KINDS[kind].layout or kind


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


def _config_classes(cfg: CfgNode) -> dict[str, list]:
    """The class metadata of ``MODEL.KNET.CLASS_NAMES`` / ``CLASS_COLORS`` as the datasets of the
    model's kind hold it: things (instance), things and all classes as stuff (panoptic, as
    Mask2Former), stuff (semantic); {} without names."""
    names, colors = list(cfg.MODEL.KNET.CLASS_NAMES), [list(c) for c in cfg.MODEL.KNET.CLASS_COLORS]
    n = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if names and (len(names) != n or len(colors) not in (0, n)):
        raise DatasetClassError(
            f"MODEL.KNET.CLASS_NAMES has {len(names)} names and CLASS_COLORS {len(colors)} "
            f"colours, but the model has {n} classes (MODEL.SEM_SEG_HEAD.NUM_CLASSES)"
        )
    semantic = cfg.MODEL.META_ARCHITECTURE == DATASET_KINDS["semantic"].meta_architecture
    things = 0 if semantic else cfg.MODEL.KNET.NUM_THING_CLASSES
    fields = {"thing_classes": names[:things], "thing_colors": colors[:things]}
    if things < len(names):
        fields.update(stuff_classes=names, stuff_colors=colors)
    return {key: value for key, value in fields.items() if value}


def registered_or(names: Sequence[str], classes: Mapping[str, Any]) -> Metadata:
    """The metadata of the first registered dataset of ``names`` (it wins: it may hold more, e.g.
    the files of evaluation), else a ``Metadata`` of ``classes`` (:data:`CLASS_FIELDS`)."""
    registered = set(DatasetCatalog.list())
    name = next((n for n in names if n in registered), None)
    return MetadataCatalog.get(name) if name else Metadata().set(**classes)


def model_metadata(cfg: CfgNode) -> Metadata:
    """The class names and colours to draw a model's outputs with: those of the first registered
    dataset of ``DATASETS.TEST`` then ``DATASETS.TRAIN``, else those its config carries (a run's
    ``config.yaml``: ``MODEL.KNET.CLASS_NAMES``), so no dataset needs registering; empty if neither
    (classes are drawn as numbers)."""
    return registered_or([*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN], _config_classes(cfg))


def model_description(cfg: CfgNode) -> dict[str, Any]:
    """What a checkpoint or an exported file stores to describe its model: the class metadata of
    :func:`model_metadata`, the input format and the test sizes."""
    meta = model_metadata(cfg)
    description = {k: list(meta.get(k)) for k in CLASS_FIELDS if meta.get(k, None)}
    return description | {
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
    }
