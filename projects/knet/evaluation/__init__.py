"""Scoring K-Net's outputs on a dataset, and checking its ground truth before that.

Each output (:data:`OUTPUTS`) names its config switch, its Detectron2 evaluator and its
ground-truth check (:mod:`.ground_truth`). A dataset scores the output of its kind
(``knet.data.kinds``), panoptic data also instances / semantic labels where the metadata has
``json_file`` / ``sem_seg_root``. Boxes are not evaluated: they are only the masks' extents.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from ..data.kinds import DATASET_KINDS, kind_of
from . import ground_truth
from .ground_truth import GroundTruthWarning, TrainingSetError, check_training_dataset

__all__ = [
    "OUTPUTS",
    "GroundTruthWarning",
    "TrainingSetError",
    "build_evaluator",
    "check_evaluation_dataset",
    "check_evaluation_dataset_once",
    "check_training_dataset",
    "check_training_datasets_once",
    "evaluable",
    "evaluation_tasks",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """One prediction of a K-Net model, as far as datasets are concerned."""

    switch: str  # MODEL.KNET.TEST.<switch> turns it on
    field: str  # key of the model's output dict
    # metadata a *panoptic* dataset needs to score it (other kinds score their own output)
    needs: str | None
    evaluator: Callable[[str, str], DatasetEvaluator]  # (dataset name, output folder)
    check: Callable[..., str]  # ground-truth check (.ground_truth)


def _coco_segm(name: str, folder: str) -> DatasetEvaluator:
    """Mask AP of images; the YouTube-VIS results file of videos."""
    if kind_of(name) == "video_instance":
        from .video import YouTubeVISResultsWriter

        return YouTubeVISResultsWriter(name, folder)
    # use_fast_impl=False: the fast evaluator needs Detectron2's compiled extension.
    return COCOEvaluator(name, tasks=("segm",), output_dir=folder, use_fast_impl=False)


def _panoptic(name: str, folder: str) -> DatasetEvaluator:
    """PQ of images; STQ and VPQ of videos (frames in order, one process)."""
    if kind_of(name) == "video_panoptic":
        from .video import VideoPanopticEvaluator

        return VideoPanopticEvaluator(name, output_dir=folder)
    return COCOPanopticEvaluator(name, folder)


def _check_panoptic(dataset_name: str, metadata, records, mode: str) -> str:
    if kind_of(dataset_name) == "video_panoptic":
        return ground_truth.check_label_files(dataset_name, records(), "label_file_name")
    return ground_truth.check_panoptic(dataset_name, metadata, records, mode)


def _check_instances(dataset_name: str, metadata, records, mode: str) -> str:
    if kind_of(dataset_name) == "video_instance":  # no ground truth is read: the records load
        records()
        return "the YouTube-VIS json"
    return ground_truth.check_instances(dataset_name, metadata, records, mode)


OUTPUTS: dict[str, Output] = {
    "panoptic": Output("PANOPTIC_ON", "panoptic_seg", None, _panoptic, _check_panoptic),
    "instance": Output("INSTANCE_ON", "instances", "json_file", _coco_segm, _check_instances),
    "semantic": Output(
        "SEMANTIC_ON",
        "sem_seg",
        "sem_seg_root",
        lambda name, folder: SemSegEvaluator(name, output_dir=folder),
        ground_truth.check_semantic,
    ),
}


def evaluable(output: str, name: str, kind: str) -> bool:
    """Whether ``output`` can be scored on dataset ``name`` of ``kind`` (a missing file that the
    metadata names is the evaluator's to report)."""
    if output not in DATASET_KINDS[kind].outputs:
        return False
    needs = OUTPUTS[output].needs
    return output == kind or needs is None or MetadataCatalog.get(name).get(needs, None) is not None


def default_output(kind: str) -> str:
    """The output a dataset of ``kind`` scores (its own, or the first its models predict)."""
    return kind if kind in OUTPUTS else DATASET_KINDS[kind].outputs[0]


def evaluation_tasks(cfg: CfgNode, dataset_name: str) -> tuple[str, ...]:
    """The outputs that evaluating ``dataset_name`` under ``cfg`` scores: on a panoptic dataset
    those switched on by ``MODEL.KNET.TEST.*_ON``, on another the output of its kind."""
    kind = kind_of(dataset_name)
    if kind is None:
        return ()
    if kind != "panoptic":
        return (default_output(kind),)
    test = cfg.MODEL.KNET.TEST
    return tuple(o for o in OUTPUTS if test[OUTPUTS[o].switch])


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_folder: str | None = None
) -> DatasetEvaluator:
    """The evaluators of the outputs :func:`evaluation_tasks` selects (PQ, mask AP, mIoU)."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    os.makedirs(output_folder, exist_ok=True)
    test = cfg.MODEL.KNET.TEST
    outputs = [o for o in evaluation_tasks(cfg, dataset_name) if test[OUTPUTS[o].switch]]
    evaluators = [OUTPUTS[o].evaluator(dataset_name, output_folder) for o in outputs]
    if not evaluators:
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}) with "
            f"MODEL.KNET.TEST PANOPTIC_ON={test.PANOPTIC_ON}, INSTANCE_ON={test.INSTANCE_ON}, "
            f"SEMANTIC_ON={test.SEMANTIC_ON}"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def check_evaluation_dataset(
    dataset_name: str, mode: str = "error", tasks: Sequence[str] | None = None
) -> None:
    """Check the ground truth that evaluating ``dataset_name`` will read (:mod:`.ground_truth`).

    Args:
        mode: ``DATASETS.CHECK_GT``: "error", "warn" or "off".
        tasks: keys of :data:`OUTPUTS` whose ground truth to check; default: the dataset's kind.
    Raises:
        ValueError: a defect; the message names the dataset, the file and what is wrong.
    """
    off = "Ground truth of %r is not checked before evaluation (DATASETS.CHECK_GT='off')"
    if ground_truth.skip_checks(mode, off, dataset_name):
        return
    kind = kind_of(dataset_name)
    tasks = tuple((default_output(kind),) if kind and tasks is None else tasks or ())
    unknown = sorted(set(tasks) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"Unknown ground-truth check tasks {unknown}; valid: {list(OUTPUTS)}")
    if not tasks:
        logger.info("No ground-truth checks for %r (kind %r)", dataset_name, kind)
        return
    start = time.perf_counter()
    metadata = MetadataCatalog.get(dataset_name)

    @functools.cache
    def records() -> list[dict]:
        loaded = DatasetCatalog.get(dataset_name)
        ground_truth.check_images_exist(dataset_name, loaded)
        return loaded

    # the jsons first: a dataset loader may fail on a malformed json less clearly
    order = ("instance", "panoptic", "semantic")
    checked = [OUTPUTS[t].check(dataset_name, metadata, records, mode) for t in order if t in tasks]
    elapsed = time.perf_counter() - start
    logger.info(
        "Checked the ground truth of %r (%s) in %.1fs", dataset_name, ", ".join(checked), elapsed
    )


_CHECKED: set[tuple] = set()  # (dataset, mode, tasks) / ("train", dataset, mode) checked


def check_evaluation_dataset_once(cfg: CfgNode, dataset_name: str) -> None:
    """:func:`check_evaluation_dataset` with ``cfg.DATASETS.CHECK_GT`` and the tasks of
    :func:`evaluation_tasks`, at most once per process for the same dataset, mode and tasks (a
    periodic evaluation during training reads the ground truth only the first time)."""
    key = (dataset_name, cfg.DATASETS.get("CHECK_GT", "error"), evaluation_tasks(cfg, dataset_name))
    if key not in _CHECKED:
        check_evaluation_dataset(*key)  # validates the mode
        _CHECKED.add(key)


def check_training_datasets_once(cfg: CfgNode) -> None:
    """:func:`check_training_dataset` of each ``cfg.DATASETS.TRAIN`` with ``DATASETS.CHECK_GT``,
    at most once per process (a trainer rebuilt in the same process does not check again)."""
    mode = cfg.DATASETS.get("CHECK_GT", "error")
    for name in cfg.DATASETS.TRAIN:
        if ("train", name, mode) not in _CHECKED:
            check_training_dataset(name, mode)
            _CHECKED.add(("train", name, mode))
