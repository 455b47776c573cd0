"""ResNet forwards re-implemented in plain PyTorch from state dicts (eval mode, BN).

MMDetection's ``ResNet`` (open-mmlab/mmdetection v2.x ``mmdet/models/backbones/resnet.py``,
``style="pytorch"``, optional MMCV DCNv1), the deep stem of MMSegmentation's ``ResNetV1c``
(open-mmlab/mmsegmentation v0.x ``mmseg/models/backbones/resnet.py``) and Detectron2's
``DeformBottleneckBlock`` (``detectron2/modeling/backbone/resnet.py``), no ``mmcv`` / ``mmdet``
import. Computed in the dtype of the input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .mmcv import mmcv_deform_conv2d


def _batch_norm(x: Tensor, get, name: str) -> Tensor:
    """Eval-mode BatchNorm2d from ``{name}.{weight,bias,running_mean,running_var}``."""
    return F.batch_norm(
        x,
        get(f"{name}.running_mean"),
        get(f"{name}.running_var"),
        get(f"{name}.weight"),
        get(f"{name}.bias"),
        training=False,
        eps=1e-5,
    )


def mmdet_resnet_forward(
    state_dict: dict[str, Tensor], x: Tensor, prefix: str = "backbone."
) -> list[Tensor]:
    """Functional MMDetection ``ResNet`` (``style="pytorch"``, eval mode, BN) forward.

    Bottleneck blocks when ``conv3`` keys exist, else basic blocks. The stride of a stage's
    first block sits on its 3x3 conv ("pytorch" style); a block whose 3x3 conv has
    ``conv2.conv_offset.{weight,bias}`` is an MMCV ``DeformConv2dPack`` (DCNv1, one offset
    group, ``fallback_on_stride=False``): offsets = 3x3 conv (same stride, padding 1) of
    the block's conv1 output, then :func:`mmcv_deform_conv2d`.

    Returns:
        the outputs of layer1-4, (B, C_i, H_i, W_i).
    """
    dtype, device = x.dtype, x.device

    def get(name: str) -> Tensor:
        return state_dict[prefix + name].to(dtype=dtype, device=device)

    def has(name: str) -> bool:
        return prefix + name in state_dict

    out = F.conv2d(x, get("conv1.weight"), stride=2, padding=3)
    out = F.relu(_batch_norm(out, get, "bn1"))
    out = F.max_pool2d(out, 3, stride=2, padding=1)
    features: list[Tensor] = []
    for layer in range(1, 5):
        block = 0
        while has(f"layer{layer}.{block}.conv1.weight"):
            p = f"layer{layer}.{block}."
            stride = 2 if block == 0 and layer > 1 else 1
            bottleneck = has(p + "conv3.weight")
            identity = out
            if bottleneck:
                y = F.relu(_batch_norm(F.conv2d(out, get(p + "conv1.weight")), get, p + "bn1"))
            else:
                y = F.conv2d(out, get(p + "conv1.weight"), stride=stride, padding=1)
                y = F.relu(_batch_norm(y, get, p + "bn1"))
            conv2_stride = stride if bottleneck else 1
            if has(p + "conv2.conv_offset.weight"):
                offset = F.conv2d(
                    y,
                    get(p + "conv2.conv_offset.weight"),
                    get(p + "conv2.conv_offset.bias"),
                    stride=conv2_stride,
                    padding=1,
                )
                y = mmcv_deform_conv2d(
                    y, offset, get(p + "conv2.weight"), stride=conv2_stride, padding=1
                )
            else:
                y = F.conv2d(y, get(p + "conv2.weight"), stride=conv2_stride, padding=1)
            y = _batch_norm(y, get, p + "bn2")
            if bottleneck:
                y = _batch_norm(F.conv2d(F.relu(y), get(p + "conv3.weight")), get, p + "bn3")
            if has(p + "downsample.0.weight"):
                identity = F.conv2d(out, get(p + "downsample.0.weight"), stride=stride)
                identity = _batch_norm(identity, get, p + "downsample.1")
            out = F.relu(y + identity)
            block += 1
        features.append(out)
    return features


def resnet_v1c_stem(sd: dict[str, Tensor], x: Tensor, prefix: str = "stem.") -> Tensor:
    """MMSeg ``ResNetV1c``'s deep stem under Detectron2's key names (``stem.conv{1,2,3}``):
    three 3x3 conv (no bias) -> BN -> ReLU, the first with stride 2, then a 3x3 max pool of
    stride 2 (padding 1): (B, 3, H, W) -> (B, 64, ceil(ceil(H / 2) / 2), ...)."""

    def get(name: str) -> Tensor:
        return sd[prefix + name]

    for i, stride in ((1, 2), (2, 1), (3, 1)):
        x = F.conv2d(x, get(f"conv{i}.weight"), stride=stride, padding=1)
        x = F.relu(_batch_norm(x, get, f"conv{i}.norm"))
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def detectron2_deform_bottleneck(
    sd: dict[str, Tensor], x: Tensor, stride: int, stride_in_1x1: bool, dilation: int
) -> tuple[Tensor, Tensor]:
    """Detectron2's ``DeformBottleneckBlock`` forward (DCNv1, projection shortcut), assembled from
    its state dict: the stride sits on the 1x1 conv1 if ``stride_in_1x1`` else on the 3x3 conv2
    (and on its offset conv). Returns (output, offsets)."""
    get = sd.__getitem__
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    out = F.relu(_batch_norm(F.conv2d(x, sd["conv1.weight"], stride=s1), get, "conv1.norm"))
    offset = F.conv2d(
        out,
        sd["conv2_offset.weight"],
        sd["conv2_offset.bias"],
        stride=s3,
        padding=dilation,
        dilation=dilation,
    )
    out = mmcv_deform_conv2d(out, offset, sd["conv2.weight"], s3, dilation, dilation)
    out = F.relu(_batch_norm(out, get, "conv2.norm"))
    out = _batch_norm(F.conv2d(out, sd["conv3.weight"]), get, "conv3.norm")
    shortcut = _batch_norm(F.conv2d(x, sd["shortcut.weight"], stride=stride), get, "shortcut.norm")
    return F.relu(out + shortcut), offset
