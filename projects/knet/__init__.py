"""K-Net: Towards Unified Image Segmentation (NeurIPS 2021), as a Detectron2 project.

Importing the package registers its datasets (``knet.data``) and its model parts in Detectron2's
registries (``knet.modeling``), and makes Detectron2's ``DetectionCheckpointer`` read weight files
without running code from them (``knet.checkpoint.checkpointer``) and name, for a weights file
that is missing or cannot be downloaded, where it comes from (``knet.checkpoint.weights``).
"""

# Importing these registers the datasets and the model parts.
from . import data, modeling  # noqa: F401
from .checkpoint.checkpointer import install_safe_loading
from .checkpoint.weights import install_weights_check
from .config import add_knet_config

install_safe_loading()
install_weights_check()

__all__ = ["add_knet_config"]
