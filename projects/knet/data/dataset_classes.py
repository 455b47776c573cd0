"""Class counts and outputs of a K-Net config, taken from its datasets and checked against them.

A K-Net model has ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` classes, the first
``MODEL.KNET.NUM_THING_CLASSES`` of them things; a dataset that disagrees fails deep in the
matcher or the losses, after the model and the data loader are built. :func:`configure_for_datasets`
runs before that:

* a key **not set** by the config file (with its ``_BASE_`` files) or the command line, or set to
  ``-1``, is **taken from the first training dataset's metadata**: instance data (``coco``) has
  ``NUM_CLASSES = NUM_THING_CLASSES = len(thing_classes)``; panoptic data
  (``coco_panoptic_seg``) all classes, the things first; semantic data (``sem_seg``)
  ``len(stuff_classes)`` classes, and its ``ignore_label`` sets ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``;
* ``MODEL.KNET.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON`` not set explicitly are switched to what the
  training data lets the model predict and the test datasets can evaluate (instance data:
  instances; panoptic data: panoptic, plus instances / semantic where the test datasets have an
  instances json / semantic labels; semantic data: semantic);
* one log line says what was chosen; every value, explicit or chosen, is then checked against
  every training and test dataset, and a mismatch is a :class:`DatasetClassError` that names the
  key, both numbers and the dataset. The dataset mapper and the kernel head must suit the data
  (an instance dataset with the panoptic mapper, say, is an error too).

A ``CfgNode`` cannot tell a default from an explicit value, so ``train_net.py`` and the demo pass
the keys their config file and options set (:func:`explicit_config_keys`); without them (the
trainer's own check), only ``-1`` means "from the dataset".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "AUTO",
    "DatasetClassError",
    "DatasetClasses",
    "DatasetNotRegisteredError",
    "configure_for_datasets",
    "configured_for_datasets",
    "dataset_classes",
    "explicit_config_keys",
]

logger = logging.getLogger(__name__)

AUTO = -1  # class-count value meaning "from the training dataset"
NUM_CLASSES = "MODEL.SEM_SEG_HEAD.NUM_CLASSES"
NUM_THING_CLASSES = "MODEL.KNET.NUM_THING_CLASSES"
IGNORE_VALUE = "MODEL.SEM_SEG_HEAD.IGNORE_VALUE"
OUTPUT_KEYS = {
    "panoptic": "MODEL.KNET.TEST.PANOPTIC_ON",
    "instance": "MODEL.KNET.TEST.INSTANCE_ON",
    "semantic": "MODEL.KNET.TEST.SEMANTIC_ON",
}
OUTPUT_NAMES = {"panoptic": "panoptic_seg", "instance": "instances", "semantic": "sem_seg"}
KINDS = {"coco": "instance", "coco_panoptic_seg": "panoptic", "sem_seg": "semantic"}
MAPPERS = {"instance": "knet_instance", "panoptic": "knet_panoptic", "semantic": "knet_semantic"}
META_ARCHITECTURES = {"instance": "KNet", "panoptic": "KNet", "semantic": "SemanticKNet"}
# what a model trained on each kind of data predicts, and (no test dataset) computes by default
PRODUCIBLE = {
    "instance": ("instance",),
    "panoptic": ("panoptic", "instance", "semantic"),
    "semantic": ("semantic",),
}
DEFAULT_OUTPUTS = {"instance": ("instance",), "panoptic": ("panoptic",), "semantic": ("semantic",)}
TEMPLATES = "configs/custom/ (datasets/README.md, 'Your own data')"


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
    kind: str  # "instance" | "panoptic" | "semantic"
    class_names: tuple[str, ...]
    num_thing_classes: int  # instance: all classes; semantic: 0
    ignore_label: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        names = list(self.class_names)
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        things = f", {self.num_thing_classes} things" if self.kind == "panoptic" else ""
        return f"{self.kind}, {self.num_classes} classes{things}: {shown}"


def _not_registered(name: str) -> DatasetNotRegisteredError:
    return DatasetNotRegisteredError(
        f"Dataset {name!r} (named by DATASETS.TRAIN / DATASETS.TEST) is not registered. Register "
        f"it on the command line, e.g. '--dataset {name} coco-instances JSON IMAGE_ROOT', "
        f"'--dataset {name} coco-panoptic JSON PNG_DIR IMAGE_ROOT' or '--dataset {name} sem-seg "
        "IMAGE_DIR LABEL_DIR --classes CLASSES.txt' (datasets/README.md), or in Python with "
        "knet.data.datasets.register_custom_dataset, or name a registered dataset."
    )


def dataset_classes(name: str, load: bool = True) -> DatasetClasses | None:
    """The classes of registered dataset ``name`` from its metadata, or None for a dataset type
    K-Net does not evaluate or a dataset without class metadata.

    Args:
        load: if the metadata has no class names yet (e.g. a dataset registered with Detectron2's
            ``register_coco_instances``, whose loader sets them), load the dataset once.
    Raises:
        DatasetNotRegisteredError: ``name`` is not registered.
        DatasetClassError: a panoptic dataset whose contiguous ids do not put the things first.
    """
    if name not in DatasetCatalog.list():
        raise _not_registered(name)
    kind = KINDS.get(MetadataCatalog.get(name).get("evaluator_type", None))
    if kind is None:
        return None
    info = _from_metadata(name, kind, MetadataCatalog.get(name))
    if info is None and load:
        DatasetCatalog.get(name)
        info = _from_metadata(name, kind, MetadataCatalog.get(name))
    return info


def _from_metadata(name: str, kind: str, meta: Any) -> DatasetClasses | None:
    ignore = meta.get("ignore_label", 255)
    if kind == "instance":
        things = meta.get("thing_classes", None)
        if not things:
            return None
        return DatasetClasses(name, kind, tuple(things), len(things), ignore)
    if kind == "semantic":
        stuff = meta.get("stuff_classes", None)
        if not stuff:
            return None
        return DatasetClasses(name, kind, tuple(stuff), 0, ignore)
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
    return DatasetClasses(name, kind, tuple(names), t, ignore)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    for key, value in d.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, full + ".")
        else:
            yield full


def explicit_config_keys(config_file: str = "", opts: Sequence[str] = ()) -> frozenset[str]:
    """The keys (``"MODEL.SEM_SEG_HEAD.NUM_CLASSES"``, ...) that ``config_file`` (with its
    ``_BASE_`` files) and the ``KEY VALUE`` list ``opts`` set."""
    keys = set()
    if config_file:
        keys.update(_flatten(CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)))
    keys.update(str(k) for k in list(opts)[0::2])
    return frozenset(keys)


def _get(cfg: CfgNode, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: CfgNode, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def _is_auto(cfg: CfgNode, key: str, explicit: frozenset[str] | None) -> bool:
    if key in (NUM_CLASSES, NUM_THING_CLASSES) and _get(cfg, key) == AUTO:
        return True
    return explicit is not None and key not in explicit


def _has_field(name: str, key: str) -> bool:
    """Whether the metadata of ``name`` has ``key`` (a path field whose files are missing
    counts: the evaluator reports that)."""
    try:
        return MetadataCatalog.get(name).get(key, None) is not None
    except (OSError, ValueError):
        return True


def _evaluable(output: str, d: DatasetClasses) -> bool:
    """Whether ``knet.evaluation.build_evaluator`` can evaluate ``output`` on dataset ``d``."""
    if d.kind != "panoptic":
        return output == d.kind
    if output == "instance":
        return _has_field(d.name, "json_file")
    if output == "semantic":
        return _has_field(d.name, "sem_seg_root")
    return True


def _expected_counts(d: DatasetClasses, ref: DatasetClasses) -> dict[str, int]:
    """The class-count keys dataset ``d`` determines, for a model trained on ``ref``'s kind."""
    if d.kind == "semantic":
        return {NUM_CLASSES: d.num_classes}
    if d.kind == "panoptic":
        return {NUM_CLASSES: d.num_classes, NUM_THING_CLASSES: d.num_thing_classes}
    if ref.kind == "instance":
        return {NUM_CLASSES: d.num_classes, NUM_THING_CLASSES: d.num_classes}
    return {NUM_THING_CLASSES: d.num_classes}  # instance AP of a panoptic model


def configure_for_datasets(
    cfg: CfgNode, explicit: frozenset[str] | None = None, mode: str = "train"
) -> str | None:
    """Take the class counts and outputs of ``cfg`` from its datasets and check them (see the
    module docstring). ``cfg`` must not be frozen.

    Args:
        explicit: the keys the config file and the command line set
            (:func:`explicit_config_keys`); None: every key counts as set, except class counts
            of ``-1``.
        mode: "train" (every dataset of ``DATASETS.TRAIN`` and ``DATASETS.TEST`` must be
            registered, and the dataset mapper must fit), "eval" (``DATASETS.TEST`` must be) or
            "inference" (datasets not registered are skipped: the demo).
    Returns:
        the log line of what was taken from the datasets, or None if nothing was.
    Raises:
        DatasetNotRegisteredError, DatasetClassError: with the key, the numbers and the dataset.
    """
    if mode not in ("train", "eval", "inference"):
        raise ValueError(f"mode must be 'train', 'eval' or 'inference', not {mode!r}")
    if cfg.MODEL.META_ARCHITECTURE not in META_ARCHITECTURES.values():
        return None
    train, test = list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST)
    registered = set(DatasetCatalog.list())
    required = {"train": train + test, "eval": test, "inference": []}[mode]
    for name in required:
        if name not in registered:
            raise _not_registered(name)
    infos: dict[str, DatasetClasses] = {}
    for name in dict.fromkeys(train + test):
        if name in registered:
            info = dataset_classes(name, load=mode != "inference")
            if info is not None:
                infos[name] = info
    ref_name = next((n for n in train if n in infos), None)
    ref_name = ref_name or next((n for n in test if n in infos), None)
    auto = {key: _is_auto(cfg, key, explicit) for key in (NUM_CLASSES, NUM_THING_CLASSES)}
    if ref_name is None:
        unresolved = [k for k in (NUM_CLASSES, NUM_THING_CLASSES) if _get(cfg, k) == AUTO]
        if mode == "inference" and (train or test):
            logger.warning(
                "None of the datasets %s is registered with class names: outputs are drawn with "
                "class numbers. Pass the dataset options of training (--dataset ...) for names.",
                list(dict.fromkeys(train + test)),
            )
        if unresolved:
            raise DatasetClassError(
                f"{unresolved[0]} is -1 (take it from the dataset), but no dataset of "
                f"DATASETS.TRAIN {train} / DATASETS.TEST {test} is registered with class "
                "metadata; register it (--dataset) or set the number"
            )
        return None

    ref = infos[ref_name]
    arch, needed = cfg.MODEL.META_ARCHITECTURE, META_ARCHITECTURES[ref.kind]
    if arch != needed:
        raise DatasetClassError(
            f"Dataset {ref.name!r} is {ref.kind} data but MODEL.META_ARCHITECTURE is {arch!r} "
            f"(kernel head {cfg.MODEL.KNET.KERNEL_HEAD_NAME!r}); {ref.kind} data needs {needed!r}: "
            f"start from a {ref.kind} template in {TEMPLATES}"
        )
    if mode == "train":
        for name in train:
            if name in infos and infos[name].kind != ref.kind:
                raise DatasetClassError(
                    f"DATASETS.TRAIN mixes {ref.kind} data ({ref.name!r}) and "
                    f"{infos[name].kind} data ({name!r}); one dataset mapper reads one kind"
                )
        mapper = cfg.INPUT.DATASET_MAPPER_NAME
        if mapper in MAPPERS.values() and mapper != MAPPERS[ref.kind]:
            raise DatasetClassError(
                f"Dataset {ref.name!r} is {ref.kind} data but INPUT.DATASET_MAPPER_NAME is "
                f"{mapper!r}; {ref.kind} data needs {MAPPERS[ref.kind]!r} (see the {ref.kind} "
                f"templates in {TEMPLATES})"
            )

    chosen: list[str] = []
    for key, value in _expected_counts(ref, ref).items():
        if auto[key]:
            _set(cfg, key, value)
            chosen.append(f"{key.rsplit('.', 1)[1]} {value}")
    if (
        ref.kind == "semantic"
        and ref.ignore_label is not None
        and _is_auto(cfg, IGNORE_VALUE, explicit)
    ):
        if _get(cfg, IGNORE_VALUE) != ref.ignore_label:
            _set(cfg, IGNORE_VALUE, ref.ignore_label)
            chosen.append(f"IGNORE_VALUE {ref.ignore_label}")
    for key in (NUM_CLASSES, NUM_THING_CLASSES):
        if _get(cfg, key) == AUTO and not (ref.kind == "semantic" and key == NUM_THING_CLASSES):
            raise DatasetClassError(f"{key} is -1 but dataset {ref.name!r} does not determine it")

    for d in infos.values():
        _check_dataset(cfg, d, ref, arch == "SemanticKNet", auto, explicit)

    outputs = _configure_outputs(cfg, ref, [infos[n] for n in test if n in infos], explicit, mode)
    if not chosen and not outputs:
        return None
    enabled = [OUTPUT_NAMES[o] for o in OUTPUT_KEYS if _get(cfg, OUTPUT_KEYS[o])]
    parts = []
    if chosen:
        parts.append(", ".join(chosen) + " from the dataset")
    if outputs:
        parts.append(f"outputs {', '.join(enabled) or 'none'} (" + ", ".join(outputs) + ")")
    line = f"Dataset {ref.name!r} ({ref.describe()}): " + "; ".join(parts)
    logger.info(line)
    return line


def _check_dataset(
    cfg: CfgNode,
    d: DatasetClasses,
    ref: DatasetClasses,
    semantic_model: bool,
    auto: Mapping[str, bool],
    explicit: frozenset[str] | None,
) -> None:
    if semantic_model and d.kind != "semantic":
        raise DatasetClassError(
            f"Dataset {d.name!r} is {d.kind} data; the semantic model trained on {ref.name!r} "
            "cannot be evaluated on it"
        )
    for key, expected in _expected_counts(d, ref).items():
        value = _get(cfg, key)
        if value == expected:
            continue
        what = "thing classes" if key == NUM_THING_CLASSES else "classes"
        if auto[key] and d.name != ref.name:
            hint = (
                f"The value was taken from the training dataset {ref.name!r}: its training and "
                "test datasets must have the same classes."
            )
        elif explicit is None:
            hint = f"Set it to {AUTO} to take it from the dataset, or correct it."
        else:
            hint = (
                f"Leave {key} out of the config and the command line (or set it to {AUTO}) to "
                "take it from the dataset, or correct it."
            )
        raise DatasetClassError(
            f"{key} is {value}, but dataset {d.name!r} has {expected} {what} ({d.describe()}). "
            + hint
        )
    if d.kind == ref.kind and d.name != ref.name and d.class_names != ref.class_names:
        logger.warning(
            "Datasets %r and %r have the same number of classes but other names or another "
            "order: %s / %s",
            ref.name,
            d.name,
            list(ref.class_names)[:8],
            list(d.class_names)[:8],
        )
    if semantic_model and d.ignore_label is not None:
        value = _get(cfg, IGNORE_VALUE)
        if value != d.ignore_label:
            raise DatasetClassError(
                f"{IGNORE_VALUE} is {value}, but dataset {d.name!r} marks unlabelled pixels with "
                f"{d.ignore_label} (its ignore_label); they must agree"
            )


def _configure_outputs(
    cfg: CfgNode,
    ref: DatasetClasses,
    tests: Sequence[DatasetClasses],
    explicit: frozenset[str] | None,
    mode: str,
) -> list[str]:
    """Switch the outputs not set explicitly; check the others. Returns how they were chosen."""
    producible = PRODUCIBLE[ref.kind]
    chosen = []
    for output, key in OUTPUT_KEYS.items():
        if _is_auto(cfg, key, explicit):
            if tests:
                on = output in producible and all(_evaluable(output, d) for d in tests)
            else:
                on = output in DEFAULT_OUTPUTS[ref.kind]
            _set(cfg, key, on)
            chosen.append(f"{key.rsplit('.', 1)[1]} {on}")
        elif _get(cfg, key) and output not in producible:
            raise DatasetClassError(
                f"{key} is True, but a model trained on {ref.kind} data ({ref.name!r}) cannot "
                f"predict {OUTPUT_NAMES[output]}"
                + (" (it has no stuff classes)" if output == "panoptic" else "")
                + f"; set {key} False"
            )
    if chosen:
        chosen[-1] += f", from the {ref.kind} data" + (" and the test datasets" if tests else "")
    if mode != "inference":
        for d in tests:
            if not any(_get(cfg, OUTPUT_KEYS[o]) and _evaluable(o, d) for o in OUTPUT_KEYS):
                raise DatasetClassError(
                    f"No output of {list(OUTPUT_KEYS.values())} that is on can be evaluated on "
                    f"dataset {d.name!r} ({d.kind} data)"
                    + (
                        ": instance AP needs an instances json (metadata 'json_file'), mIoU "
                        "semantic labels (metadata 'sem_seg_root')"
                        if d.kind == "panoptic"
                        else f": turn on {OUTPUT_KEYS[d.kind]}"
                    )
                )
    return chosen


def configured_for_datasets(cfg: CfgNode) -> CfgNode:
    """``cfg`` checked against its datasets for training, with class counts of ``-1`` filled in
    (a copy if anything changes; frozen if ``cfg`` was). Used by ``KNetTrainer``."""
    if cfg.MODEL.META_ARCHITECTURE not in META_ARCHITECTURES.values():
        return cfg
    out = cfg.clone()
    out.defrost()
    configure_for_datasets(out, explicit=None, mode="train")
    if out == cfg:
        return cfg
    if cfg.is_frozen():
        out.freeze()
    return out
