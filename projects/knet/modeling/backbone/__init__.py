from .deform_conv import DeformBottleneckBlock, DeformConv
from .fpn import build_knet_fpn, build_knet_resnet_fpn_backbone, build_knet_swin_fpn_backbone
from .resnet import build_knet_resnet_backbone
from .swin import SwinTransformer, build_knet_swin_backbone
