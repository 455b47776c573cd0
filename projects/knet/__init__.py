"""K-Net: Towards Unified Image Segmentation (NeurIPS 2021), as a Detectron2 project.

Importing the package registers its datasets (``knet.data``) and its model parts in Detectron2's
registries (``knet.modeling``).
"""

from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers meta-arch, pixel decoders, kernel heads)
from .config import add_knet_config

__all__ = ["add_knet_config"]
