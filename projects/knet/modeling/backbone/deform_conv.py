"""Deformable convolution (DCNv1, optionally modulated) on every device, via torchvision.

Detectron2's ``DeformConv`` calls its compiled extension on the GPU (and has no CPU backward);
``torchvision.ops.deform_conv2d`` runs forward and backward on CPU and GPU. The block below is
Detectron2's ``DeformBottleneckBlock`` (same parameter names: ``conv2_offset``, ``conv2.weight``,
``conv2.norm``) with its 3x3 conv replaced by :class:`DeformConv`, so R-101-DCN runs and trains
with a pure-Python Detectron2 install.
"""

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import get_norm
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock as _D2DeformBottleneckBlock
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

__all__ = ["DeformConv", "DeformBottleneckBlock"]


class DeformConv(nn.Module):
    """Deformable convolution with an optional norm (no bias, as in the ResNet blocks).

    For output position p and kernel tap t (row-major over kh x kw), the input is sampled at
    ``p * stride - padding + t * dilation + offset_t(p)`` by bilinear interpolation (zero
    outside the image) and contracted with the weight like a convolution. ``offset`` has
    ``2 * kh * kw * deformable_groups`` channels ordered ``[dy_0, dx_0, dy_1, dx_1, ...]`` per
    group (MMCV's and Detectron2's layout); ``mask`` (modulated DCNv2) multiplies each sample.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        if in_channels % groups:
            raise ValueError(f"DeformConv: {in_channels} channels not divisible by {groups}")
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *_pair(kernel_size))
        )
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.register_parameter("bias", None)
        self.norm = norm
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(
        self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            x: (B, C_in, H, W).
            offset: (B, 2 * deformable_groups * kh * kw, H_out, W_out).
            mask: (B, deformable_groups * kh * kw, H_out, W_out) in [0, 1], or None (DCNv1).

        Returns:
            (B, C_out, H_out, W_out), normalised if a norm was given.
        """
        out = deform_conv2d(
            x,
            offset.to(x.dtype),
            self.weight.to(x.dtype),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=None if mask is None else mask.to(x.dtype),
        )
        return self.norm(out) if self.norm is not None else out


class DeformBottleneckBlock(_D2DeformBottleneckBlock):
    """Detectron2's deformable bottleneck block with :class:`DeformConv` as its 3x3 conv.

    ``conv2_offset`` (a 3x3 conv with the 3x3 conv's stride and dilation) predicts the offsets
    and is zero-initialised, so a block loaded from plain ImageNet weights starts as a regular
    bottleneck. The stride sits on the 3x3 conv unless ``stride_in_1x1``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int, **kw):
        super().__init__(in_channels, out_channels, bottleneck_channels=bottleneck_channels, **kw)
        d2_conv = self.conv2
        self.conv2 = DeformConv(
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=3,
            stride=d2_conv.stride,
            padding=d2_conv.padding,
            dilation=d2_conv.dilation,
            groups=kw.get("num_groups", 1),
            norm=get_norm(kw.get("norm", "BN"), bottleneck_channels),
        )
        weight_init.c2_msra_fill(self.conv2)
