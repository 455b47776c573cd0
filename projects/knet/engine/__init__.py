"""Training: the trainer and what it runs.

* :mod:`.trainer`: ``KNetTrainer``, Detectron2's ``DefaultTrainer`` for K-Net;
* :mod:`.solver`: the optimizer (AdamW / SGD, backbone lr multiplier, weight decay overrides);
* :mod:`.amp`: the mixed-precision step runners (float16 on CUDA, bfloat16 on CUDA and CPU);
* :mod:`.launch`: multi-process launch and DDP, on GPUs (NCCL) and on CPUs (gloo);
* :mod:`.preemption`: SIGTERM / SIGINT write a checkpoint, then the run exits;
* :mod:`.seeded_loader`: training batches that are a function of (seed, iteration);
* :mod:`.tta`: test-time augmentation (multi-scale, flip) for semantic K-Net;
* :mod:`.dataset_config`: class counts and outputs of the config, from the datasets;
* :mod:`.arguments`: the ``--dataset`` arguments of ``train_net.py`` and the demo.

``get_knet_cfg`` (:mod:`knet.config`) is exported here too, for the scripts that train.
"""

from ..config import get_knet_cfg
from .launch import launch
from .trainer import KNetTrainer

__all__ = ["KNetTrainer", "get_knet_cfg", "launch"]
