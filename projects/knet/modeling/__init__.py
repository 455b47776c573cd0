"""Model parts of K-Net, registered in Detectron2 registries on import."""

from .backbone import build_knet_resnet_fpn_backbone, build_knet_swin_fpn_backbone
from .criterion import KNetCriterion
from .kernel_head import KERNEL_HEAD_REGISTRY, build_kernel_head
from .matcher import HungarianMatcher
from .meta_arch import KNet
from .pixel_decoder import PIXEL_DECODER_REGISTRY, build_pixel_decoder
