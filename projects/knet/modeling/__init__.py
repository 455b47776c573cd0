"""Model parts of K-Net, registered in Detectron2 registries on import."""

from .backbone import build_knet_resnet_fpn_backbone, build_knet_swin_fpn_backbone
from .criterion import HungarianMatcher, KNetCriterion, KNetSemanticCriterion
from .kernel_head import KERNEL_HEAD_REGISTRY, build_kernel_head
from .meta_arch import KNet, SemanticKNet
from .pixel_decoder import PIXEL_DECODER_REGISTRY, build_pixel_decoder
