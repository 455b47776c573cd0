"""Layers shared by the K-Net heads: conv -> norm -> ReLU, bilinear resizing and upsampling."""

from collections.abc import Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm

__all__ = ["conv_norm_relu", "resize", "upsample"]


def conv_norm_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm: str,
    *,
    stride: int = 1,
    dilation: int = 1,
    init_std: float | None = None,
) -> Conv2d:
    """Detectron2's ``Conv2d`` with a norm and ReLU, "same" padding; a bias only without a norm.

    Initialisation: ``init_std=None`` is MMCV's ``ConvModule`` (MMSeg's decode heads):
    Kaiming-normal (fan_out, ReLU) weights; a float is N(0, init_std) (the official localization
    FPN: 0.01). Biases are zero, the norm keeps weight 1 / bias 0. State-dict keys: ``weight``
    (and ``bias`` without a norm), ``norm.*``.
    """
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=dilation * (kernel_size // 2),
        dilation=dilation,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=F.relu,
    )
    if init_std is None:
        weight_init.c2_msra_fill(conv)
    else:
        torch.nn.init.normal_(conv.weight, std=init_std)
        if conv.bias is not None:
            torch.nn.init.zeros_(conv.bias)
    return conv


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of (B, C, h, w) to (B, C, *size).

    The identity (``x`` itself) when the size is already right, except while tracing: a trace
    must keep the resize, as sizes equal at export time may differ at run time.
    """
    if tuple(x.shape[-2:]) == tuple(size) and not torch.jit.is_tracing():
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear (``align_corners=False``) upsampling of (B, C, h, w) by an integer factor, to
    (B, C, factor * h, factor * w); the identity for ``factor`` 1."""
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=float(factor), mode="bilinear", align_corners=False)
