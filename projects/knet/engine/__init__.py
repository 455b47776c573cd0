"""Training and prediction: ``KNetTrainer`` (Detectron2's ``DefaultTrainer`` for K-Net), what it
runs (solver, mixed precision, launch, preemption, seeded loader, test-time augmentation), the
``--dataset`` arguments and ``KNetPredictor``; ``get_knet_cfg`` too, for the scripts that train.
"""

from ..config import get_knet_cfg
from .launch import launch
from .predictor import KNetPredictor
from .trainer import KNetTrainer

__all__ = ["KNetPredictor", "KNetTrainer", "get_knet_cfg", "launch"]
