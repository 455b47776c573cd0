"""K-Net: Towards Unified Image Segmentation (NeurIPS 2021), as a Detectron2 project.

Importing the package registers its datasets (``knet.data``) and its model parts in Detectron2's
registries (``knet.modeling``), and makes Detectron2's ``DefaultPredictor`` and ``DefaultTrainer``
build a :class:`knet.checkpoint.KNetCheckpointer`, which reads weight files without running code
from them (:func:`knet.checkpoint.use_knet_checkpointer_in_detectron2_defaults`). The converters
of released checkpoints (``knet.conversion``) are not imported.
"""

# Importing these registers the datasets and the model parts.
from . import data, modeling  # noqa: F401
from .checkpoint import use_knet_checkpointer_in_detectron2_defaults
from .config import add_knet_config

use_knet_checkpointer_in_detectron2_defaults()

__all__ = ["add_knet_config"]
