"""K-Net dataset mappers (Detectron2 style, ``@configurable``): one training mapper per dataset
kind (``knet.data.kinds`` picks it by ``INPUT.DATASET_MAPPER_NAME``) and the inference mapper
(Detectron2's ``DatasetMapper(cfg, is_train=False)`` with the checked image read of training)."""

from .common import build_augmentations, read_image_checked
from .inference_dataset_mapper import KNetTestDatasetMapper
from .instance_dataset_mapper import KNetInstanceDatasetMapper
from .panoptic_dataset_mapper import KNetPanopticDatasetMapper
from .semantic_dataset_mapper import KNetSemanticDatasetMapper
