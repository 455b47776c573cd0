"""ResNet backbone of semantic K-Net: optional deep stem (ResNetV1c) and dilated stages.

MMSeg's ADE20K K-Net models use ``ResNetV1c``: the 7x7 stem conv is replaced by three 3x3 convs
(Detectron2's ``DeepLabStem``). The FCN/PSP/ASPP variants are "D8" models: res4 and res5 keep
stride 8 and use dilations 2 and 4 instead (MMSeg ``strides=(1, 2, 1, 1)``,
``dilations=(1, 1, 2, 4)``, ``contract_dilation=True``); UPerNet uses the plain strides.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn

from .deform_conv import DeformBottleneckBlock

__all__ = ["build_knet_resnet_backbone", "stage_dilations"]

NUM_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}
STEM_TYPES = ("basic", "deeplab")


def stage_dilations(num_blocks: int, dilation: int, contract_dilation: bool) -> list[int]:
    """Dilation of each block's 3x3 conv in one stage.

    With ``contract_dilation`` (MMSeg ``contract_dilation=True``) the first block of a dilated
    stage uses ``dilation // 2``, as it still sees the previous stage's sampling grid.

    Example: ``stage_dilations(6, 2, True) == [1, 2, 2, 2, 2, 2]``.
    """
    first = dilation // 2 if contract_dilation and dilation > 1 else dilation
    return [first] + [dilation] * (num_blocks - 1)


def _build_stem(cfg, in_channels: int) -> nn.Module:
    stem_type = cfg.MODEL.RESNETS.STEM_TYPE
    out_channels = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS
    norm = cfg.MODEL.RESNETS.NORM
    if stem_type == "basic":
        return BasicStem(in_channels=in_channels, out_channels=out_channels, norm=norm)
    if stem_type == "deeplab":
        # Imported here: importing the DeepLab project registers its backbone and heads.
        from detectron2.projects.deeplab.resnet import DeepLabStem

        return DeepLabStem(in_channels, out_channels=out_channels, norm=norm)
    raise ValueError(f"MODEL.RESNETS.STEM_TYPE must be one of {STEM_TYPES}, got {stem_type!r}")


@BACKBONE_REGISTRY.register()
def build_knet_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """Detectron2 ``ResNet`` with a choice of stem and per-stage dilation (no FPN).

    ``MODEL.RESNETS.STEM_TYPE`` "basic" is a 7x7 conv, "deeplab" 3x3 convs 3->C/2->C/2->C
    (C = ``STEM_OUT_CHANNELS``), each with norm and ReLU, then a 3x3/2 max pool;
    ``STRIDE_IN_1X1`` False is the MMSeg/torchvision "pytorch" style.

    A stage with dilation > 1 does not downsample (stride 1), so R50-D8 (``RES4_DILATION=2``,
    ``RES5_DILATION=4``) gives res4/res5 at stride 8; their blocks use dilations
    [1, 2, 2, 2, 2, 2] and [2, 4, 4] with ``CONTRACT_DILATION``. The 1x1 projection shortcut
    (with norm) is built wherever a block changes the channel count, i.e. in the first block of
    every bottleneck stage and of res3-res5 for R18/R34.

    Args:
        cfg: a config with Detectron2's ``MODEL.RESNETS`` keys and K-Net's additions.
        input_shape: the input image's shape (only ``channels`` is used).

    Returns:
        ResNet whose ``forward`` maps (B, 3, H, W) to ``{name: (B, C_name, ceil(H / s_name),
        ceil(W / s_name))}`` for the names in ``OUT_FEATURES``; ``output_shape()`` gives the
        strides s (4, 8, 16, 32 plain; 4, 8, 8, 8 for D8).
    """
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    if depth not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH must be one of {sorted(NUM_BLOCKS_PER_STAGE)}, got {depth}"
        )
    dilations = [1, 1, r.RES4_DILATION, r.RES5_DILATION]
    for name, d in (("RES4_DILATION", dilations[2]), ("RES5_DILATION", dilations[3])):
        if d < 1:
            raise ValueError(f"MODEL.RESNETS.{name} must be >= 1, got {d}")
    deform_on_per_stage = list(r.DEFORM_ON_PER_STAGE)
    basic = depth in (18, 34)
    if basic:
        if any(d > 1 for d in dilations):
            raise ValueError(
                f"ResNet-{depth} uses BasicBlock, which has no dilated variant: set "
                f"MODEL.RESNETS.RES4_DILATION and RES5_DILATION to 1 (got {dilations[2]}, "
                f"{dilations[3]}) or use DEPTH >= 50"
            )
        if r.RES2_OUT_CHANNELS != 64:
            raise ValueError("Must set MODEL.RESNETS.RES2_OUT_CHANNELS = 64 for R18/R34")
        if r.NUM_GROUPS != 1:
            raise ValueError("Must set MODEL.RESNETS.NUM_GROUPS = 1 for R18/R34")
        if any(deform_on_per_stage):
            raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE is unsupported for R18/R34")

    stem = _build_stem(cfg, input_shape.channels)
    in_channels = r.STEM_OUT_CHANNELS
    out_channels = r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, num_blocks in enumerate(NUM_BLOCKS_PER_STAGE[depth]):
        dilation = dilations[idx]
        # res2 follows the stem's max pool; a dilated stage replaces its downsampling.
        first_stride = 1 if idx == 0 or dilation > 1 else 2
        kwargs = {
            "num_blocks": num_blocks,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "norm": r.NORM,
            "stride_per_block": [first_stride] + [1] * (num_blocks - 1),
        }
        if basic:
            kwargs["block_class"] = BasicBlock
        else:
            kwargs["bottleneck_channels"] = bottleneck_channels
            kwargs["stride_in_1x1"] = r.STRIDE_IN_1X1
            kwargs["num_groups"] = r.NUM_GROUPS
            kwargs["dilation_per_block"] = stage_dilations(
                num_blocks, dilation, r.CONTRACT_DILATION
            )
            if deform_on_per_stage[idx]:
                kwargs["block_class"] = DeformBottleneckBlock
                kwargs["deform_modulated"] = r.DEFORM_MODULATED
                kwargs["deform_num_groups"] = r.DEFORM_NUM_GROUPS
            else:
                kwargs["block_class"] = BottleneckBlock
        stages.append(ResNet.make_stage(**kwargs))
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
