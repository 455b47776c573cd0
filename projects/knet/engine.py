"""Training entry points shared by ``train_net.py`` and the tools."""

import logging
import os
from collections import OrderedDict

from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer

from .config import add_knet_config
from .data.dataset_mappers import build_train_mapper
from .evaluation import build_evaluator
from .solver import build_optimizer
from .test_time_augmentation import SemanticSegmentorWithTTA


class KNetTrainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with K-Net's dataset mappers, evaluators and optimizer."""

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate with ``TEST.AUG`` (multi-scale + flip); semantic K-Net only."""
        if not getattr(getattr(model, "module", model), "is_semantic", False):
            raise ValueError(
                "TEST.AUG is implemented for semantic K-Net (sem_seg outputs) only; "
                "set TEST.AUG.ENABLED False for instance/panoptic models"
            )
        logging.getLogger("knet").info("Running inference with test-time augmentation ...")
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
            )
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, SemanticSegmentorWithTTA(cfg, model), evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in results.items())


def get_knet_cfg(config_file: str = "", opts=()) -> CfgNode:
    """A Detectron2 config with the K-Net keys, merged from ``config_file`` and ``opts``."""
    cfg = get_cfg()
    add_knet_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg
