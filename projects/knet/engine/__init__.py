"""Training: ``KNetTrainer`` (Detectron2's ``DefaultTrainer`` for K-Net), what it runs (solver,
mixed precision, launch, preemption, seeded loader, test-time augmentation) and the ``--dataset``
arguments; ``get_knet_cfg`` too, for the scripts that train.
"""

from ..config import get_knet_cfg
from .launch import launch
from .trainer import KNetTrainer

__all__ = ["KNetTrainer", "get_knet_cfg", "launch"]
