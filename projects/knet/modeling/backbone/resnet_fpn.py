"""ResNet + FPN backbone with the FPN initialised like the official K-Net neck."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from torch import nn


@BACKBONE_REGISTRY.register()
def build_knet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet-FPN (P2-P6) with Xavier-uniform FPN convs and zero biases.

    Detectron2 initialises FPN convs with ``c2_xavier_fill`` (Kaiming-uniform, a=1); MMDet's
    FPN, used by the official K-Net, uses Xavier-uniform. P6 (a parameter-free max pool) is
    computed but unused by K-Net.
    """
    backbone = build_resnet_fpn_backbone(cfg, input_shape)
    for name, module in backbone.named_modules():
        if name.startswith(("fpn_lateral", "fpn_output")) and isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return backbone
