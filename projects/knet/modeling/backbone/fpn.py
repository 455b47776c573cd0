"""K-Net's FPN necks: Detectron2's FPN (P2-P6) over a ResNet or Swin body, initialised like
the official MMDet neck."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

from .resnet import build_knet_resnet_backbone
from .swin import build_knet_swin_backbone

__all__ = ["build_knet_fpn", "build_knet_resnet_fpn_backbone", "build_knet_swin_fpn_backbone"]


def build_knet_fpn(cfg, bottom_up: Backbone) -> FPN:
    """``MODEL.FPN`` over ``bottom_up`` with Xavier-uniform convs and zero biases.

    Detectron2 initialises FPN convs with ``c2_xavier_fill`` (Kaiming-uniform, a=1); MMDet's
    FPN, used by the official K-Net, uses Xavier-uniform. P6 (a parameter-free max pool) is
    computed but unused by K-Net.
    """
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    for name, module in fpn.named_modules():
        if name.startswith(("fpn_lateral", "fpn_output")) and isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return fpn


@BACKBONE_REGISTRY.register()
def build_knet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """ResNet (``build_knet_resnet_backbone``: optional deformable res3-res5) + FPN."""
    return build_knet_fpn(cfg, build_knet_resnet_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_knet_swin_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Swin Transformer (``MODEL.SWIN``) + FPN, as the official Swin-L panoptic K-Net."""
    return build_knet_fpn(cfg, build_knet_swin_backbone(cfg, input_shape))
