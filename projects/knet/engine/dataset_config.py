"""Class counts and outputs of a K-Net config, taken from its datasets and checked against them.

A model has ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` classes, the first ``MODEL.KNET.NUM_THING_CLASSES``
of them things; a dataset that disagrees would fail deep in the matcher or the losses.
:func:`configure_for_datasets` runs before that:

* a class count of ``-1`` (the default) is taken from the first training dataset's metadata
  (:data:`knet.data.kinds.DATASET_KINDS`): instance data ``len(thing_classes)`` for both;
  panoptic data all classes, things first; semantic data ``len(stuff_classes)``, and its
  ``ignore_label`` sets ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``;
* ``MODEL.KNET.CLASS_NAMES`` / ``CLASS_COLORS`` are the reference dataset's (in training always,
  otherwise when the config names none), so that the run's ``config.yaml`` names the classes;
* ``MODEL.KNET.TEST.*_ON`` not set explicitly are switched to what the training data lets the
  model predict and the test datasets can evaluate;
* one log line says what was chosen; every value is then checked against every training and test
  dataset (and the mapper and meta-architecture against the data kind), and a mismatch is a
  :class:`DatasetClassError` naming the key, both numbers and the dataset.

A ``CfgNode`` cannot tell a default from an explicit value, so ``train_net.py`` and the demo pass
the keys their config file and options set (``knet.config.load_knet_config``); without them (the
trainer's own check), the outputs and ``IGNORE_VALUE`` count as set.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog

from ..data.kinds import (
    AUTO,
    DATASET_KINDS,
    DatasetClassError,
    DatasetClasses,
    class_layout,
    dataset_classes,
    mapper_name,
    not_registered,
)
from ..evaluation import OUTPUTS, evaluable

__all__ = ["AUTO", "configure_for_datasets", "configured_for_datasets"]

logger = logging.getLogger(__name__)

NUM_CLASSES = "MODEL.SEM_SEG_HEAD.NUM_CLASSES"
NUM_THING_CLASSES = "MODEL.KNET.NUM_THING_CLASSES"
IGNORE_VALUE = "MODEL.SEM_SEG_HEAD.IGNORE_VALUE"
TEMPLATES = "configs/custom/ (datasets/README.md, 'Your own data')"

_CONFIGURED: set[str] = set()  # configs (as YAML) this process configured


def _switch(output: str) -> str:
    return f"MODEL.KNET.TEST.{OUTPUTS[output].switch}"


def _get(cfg: CfgNode, key: str) -> Any:
    return functools.reduce(operator.getitem, key.split("."), cfg)


def _set(cfg: CfgNode, key: str, value: Any) -> None:
    parent, leaf = key.rsplit(".", 1)
    _get(cfg, parent)[leaf] = value


def _is_auto(cfg: CfgNode, key: str, explicit: frozenset[str] | None) -> bool:
    if key in (NUM_CLASSES, NUM_THING_CLASSES):
        return _get(cfg, key) == AUTO
    return explicit is not None and key not in explicit


def _expected_counts(d: DatasetClasses, ref: DatasetClasses) -> dict[str, int]:
    """The class-count keys dataset ``d`` determines, for a model trained on ``ref``'s kind (a
    video kind counts its classes as its image kind)."""
    layout, ref_layout = class_layout(d.kind), class_layout(ref.kind)
    if layout == "semantic":
        return {NUM_CLASSES: d.num_classes}
    if layout == "panoptic":
        return {NUM_CLASSES: d.num_classes, NUM_THING_CLASSES: d.num_thing_classes}
    if ref_layout == "instance":
        return {NUM_CLASSES: d.num_classes, NUM_THING_CLASSES: d.num_classes}
    return {NUM_THING_CLASSES: d.num_classes}  # instance AP of a panoptic model


def configure_for_datasets(
    cfg: CfgNode, explicit: frozenset[str] | None = None, mode: str = "train"
) -> str | None:
    """Take the class counts and outputs of (unfrozen) ``cfg`` from its datasets and check them.

    Args:
        explicit: the keys the config file and the command line set; None: every output switch
            and ``IGNORE_VALUE`` count as set.
        mode: "train" (``DATASETS.TRAIN`` and ``DATASETS.TEST`` must be registered, the dataset
            mapper must fit), "eval" (``DATASETS.TEST`` must be) or "inference" (the demo:
            datasets not registered are skipped).
    Returns:
        the log line of what was taken from the datasets, or None if nothing was.
    Raises:
        DatasetNotRegisteredError, DatasetClassError: with the key, the numbers and the dataset.
    """
    if mode not in ("train", "eval", "inference"):
        raise ValueError(f"mode must be 'train', 'eval' or 'inference', not {mode!r}")
    if cfg.MODEL.META_ARCHITECTURE not in {k.meta_architecture for k in DATASET_KINDS.values()}:
        return None
    train, test = list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST)
    registered = set(DatasetCatalog.list())
    required = {"train": train + test, "eval": test, "inference": []}[mode]
    if missing := [name for name in required if name not in registered]:
        raise not_registered(missing[0])
    load = mode != "inference"
    names = [name for name in dict.fromkeys(train + test) if name in registered]
    infos = {n: info for n in names if (info := dataset_classes(n, load)) is not None}
    # the first training dataset with classes, else the first test dataset
    ref_name = next((n for n in train + test if n in infos), None)
    auto = {key: _is_auto(cfg, key, explicit) for key in (NUM_CLASSES, NUM_THING_CLASSES)}
    if ref_name is None:
        unresolved = [key for key, is_auto in auto.items() if is_auto]
        if mode == "inference" and (train or test) and not cfg.MODEL.KNET.CLASS_NAMES:
            logger.warning(
                f"None of the datasets {list(dict.fromkeys(train + test))} is registered with "
                "class names and the config names none: outputs are drawn with class numbers. "
                "Give the run's output folder as --config-file, or the dataset options of "
                "training (--dataset ...), for names."
            )
        if unresolved:
            raise DatasetClassError(
                f"{unresolved[0]} is -1 (take it from the dataset), but no dataset of "
                f"DATASETS.TRAIN {train} / DATASETS.TEST {test} is registered with class "
                "metadata; register it (--dataset) or set the number"
            )
        return None

    ref = infos[ref_name]
    arch, needed = cfg.MODEL.META_ARCHITECTURE, DATASET_KINDS[ref.kind].meta_architecture
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
        mapper, needed = cfg.INPUT.DATASET_MAPPER_NAME, mapper_name(ref.kind)
        if mapper in map(mapper_name, DATASET_KINDS) and mapper != needed:
            raise DatasetClassError(
                f"Dataset {ref.name!r} is {ref.kind} data but INPUT.DATASET_MAPPER_NAME is "
                f"{mapper!r}; {ref.kind} data needs {needed!r} (see the {ref.kind} "
                f"templates in {TEMPLATES})"
            )

    chosen: list[str] = []
    for key, value in _expected_counts(ref, ref).items():
        if auto[key]:
            _set(cfg, key, value)
            chosen.append(f"{key.rsplit('.', 1)[1]} {value}")
    if mode == "train" or not cfg.MODEL.KNET.CLASS_NAMES:  # the model's classes, for later use
        cfg.MODEL.KNET.CLASS_NAMES = list(ref.class_names)
        colors = [list(c) for c in ref.colors]
        cfg.MODEL.KNET.CLASS_COLORS = colors if len(colors) == ref.num_classes else []
    ignore = ref.ignore_label  # semantic data only
    auto_ignore = ignore is not None and _is_auto(cfg, IGNORE_VALUE, explicit)
    if auto_ignore and _get(cfg, IGNORE_VALUE) != ignore:
        _set(cfg, IGNORE_VALUE, ignore)
        chosen.append(f"IGNORE_VALUE {ignore}")

    for d in infos.values():
        _check_dataset(cfg, d, ref, auto, explicit)

    outputs = _configure_outputs(cfg, ref, [infos[n] for n in test if n in infos], explicit, mode)
    _CONFIGURED.add(cfg.dump())
    if not chosen and not outputs:
        return None
    enabled = [OUTPUTS[o].field for o in OUTPUTS if _get(cfg, _switch(o))]
    parts = [", ".join(chosen) + " from the dataset"] if chosen else []
    if outputs:
        parts.append(f"outputs {', '.join(enabled) or 'none'} (" + ", ".join(outputs) + ")")
    line = f"Dataset {ref.name!r} ({ref.describe()}): " + "; ".join(parts)
    logger.info(line)
    return line


def _check_dataset(
    cfg: CfgNode,
    d: DatasetClasses,
    ref: DatasetClasses,
    auto: Mapping[str, bool],
    explicit: frozenset[str] | None,
) -> None:
    """Check the class counts (and a semantic model's ignore value) against dataset ``d``."""
    semantic_model = ref.kind == "semantic"  # the meta-architecture was checked to fit ``ref``
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
            f"Datasets {ref.name!r} and {d.name!r} have the same number of classes but other "
            f"names or another order: {list(ref.class_names)[:8]} / {list(d.class_names)[:8]}"
        )
    value = _get(cfg, IGNORE_VALUE)
    if semantic_model and d.ignore_label is not None and value != d.ignore_label:
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
    producible = DATASET_KINDS[ref.kind].outputs
    chosen = []
    for output in OUTPUTS:
        key = _switch(output)
        if _is_auto(cfg, key, explicit):
            if tests:
                on = output in producible and all(evaluable(output, d.name, d.kind) for d in tests)
            else:
                on = output == producible[0]
            _set(cfg, key, on)
            chosen.append(f"{key.rsplit('.', 1)[1]} {on}")
        elif _get(cfg, key) and output not in producible:
            raise DatasetClassError(
                f"{key} is True, but a model trained on {ref.kind} data ({ref.name!r}) cannot "
                f"predict {OUTPUTS[output].field}"
                + (" (it has no stuff classes)" if output == "panoptic" else "")
                + f"; set {key} False"
            )
    if chosen:
        chosen[-1] += f", from the {ref.kind} data" + (" and the test datasets" if tests else "")
    if mode != "inference":
        for d in tests:
            if not any(_get(cfg, _switch(o)) and evaluable(o, d.name, d.kind) for o in OUTPUTS):
                raise DatasetClassError(
                    f"No output of {list(map(_switch, OUTPUTS))} that is on can be evaluated on "
                    f"dataset {d.name!r} ({d.kind} data)"
                    + (
                        ": instance AP needs an instances json (metadata 'json_file'), mIoU "
                        "semantic labels (metadata 'sem_seg_root')"
                        if d.kind == "panoptic"
                        else f": turn on {_switch(d.kind)}"
                    )
                )
    return chosen


def configured_for_datasets(cfg: CfgNode) -> CfgNode:
    """``cfg`` checked against its datasets for training, class counts of ``-1`` filled in (a
    copy if anything changes; frozen if ``cfg`` was)."""
    if cfg.dump() in _CONFIGURED:  # train_net.py / the demo configured it already
        return cfg
    out = cfg.clone()
    out.defrost()
    configure_for_datasets(out, explicit=None, mode="train")
    if cfg.is_frozen():
        out.freeze()
    return cfg if out == cfg else out
