"""K-Net: Towards Unified Image Segmentation (NeurIPS 2021), as a Detectron2 project.

Importing the package registers its datasets (``knet.data``) and its model parts in Detectron2's
registries (``knet.modeling``), and makes Detectron2's ``DefaultPredictor`` and ``DefaultTrainer``
build a :class:`knet.checkpoint.KNetCheckpointer`, which reads weight files without running code
from them, and ``DefaultPredictor`` check a K-Net model's input before its resize (both in
:mod:`knet.detectron2_defaults`). The converters of released checkpoints (``knet.conversion``)
and the training code (``knet.engine``) are not imported.
"""

# Importing these registers the datasets and the model parts.
from . import data, modeling  # noqa: F401
from .config import add_knet_config
from .detectron2_defaults import adapt_detectron2_defaults

adapt_detectron2_defaults()

__all__ = ["add_knet_config"]
