"""Evaluators for K-Net outputs, chosen by the dataset's ``evaluator_type``."""

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)


def build_evaluator(cfg, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
    """Panoptic (PQ), instance (mask AP) and semantic (mIoU) evaluators.

    "coco_panoptic_seg" datasets get one evaluator per enabled ``MODEL.KNET.TEST.*_ON`` output;
    "coco" datasets get mask AP, "sem_seg" datasets mIoU. Boxes are not evaluated: K-Net
    predicts masks, and its boxes are only the masks' extents.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    os.makedirs(output_folder, exist_ok=True)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    test = cfg.MODEL.KNET.TEST

    def coco_segm():
        # use_fast_impl=False: the fast evaluator needs Detectron2's compiled extension.
        return COCOEvaluator(
            dataset_name, tasks=("segm",), output_dir=output_folder, use_fast_impl=False
        )

    evaluators = []
    if evaluator_type == "coco_panoptic_seg":
        if test.PANOPTIC_ON:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if test.INSTANCE_ON:
            evaluators.append(coco_segm())
        if test.SEMANTIC_ON:
            evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_folder))
    elif evaluator_type == "coco" and test.INSTANCE_ON:
        evaluators.append(coco_segm())
    elif evaluator_type == "sem_seg" and test.SEMANTIC_ON:
        evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_folder))
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}) with "
            f"MODEL.KNET.TEST PANOPTIC_ON={test.PANOPTIC_ON}, INSTANCE_ON={test.INSTANCE_ON}, "
            f"SEMANTIC_ON={test.SEMANTIC_ON}"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
