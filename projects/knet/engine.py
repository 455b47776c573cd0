"""Training entry points shared by ``train_net.py`` and the tools."""

from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer

from .config import add_knet_config
from .data.dataset_mappers import build_train_mapper
from .evaluation import build_evaluator
from .solver import build_optimizer


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


def get_knet_cfg(config_file: str = "", opts=()) -> CfgNode:
    """A Detectron2 config with the K-Net keys, merged from ``config_file`` and ``opts``."""
    cfg = get_cfg()
    add_knet_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg
