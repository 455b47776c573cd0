"""MMSeg decode heads used as K-Net's kernel-generating heads for semantic segmentation.

Semantic K-Net (ADE20K) takes the pre-classifier feature of a standard decode head (FCN, PSPNet,
DeepLabV3's ASPP or UPerNet) as the map its kernels act on; the head's classifier (``conv_seg``)
and the dropout in front of it belong to the kernel head. The modules below reproduce MMSeg 0.x
``_forward_feature`` (bilinear resizes with ``align_corners=False`` to exact target sizes, so any
input size works) and keep MMSeg's module names, so that converted checkpoints load directly:
MMSeg's ``X.conv.weight`` / ``X.bn.*`` become ``X.weight`` / ``X.norm.*`` here.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from ..layers import conv_norm_relu, resize
from .build import PIXEL_DECODER_REGISTRY

__all__ = ["PyramidPoolingModule", "KNetUPerHead", "KNetFCNHead", "KNetPSPHead", "KNetASPPHead"]


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` to ``size`` x ``size``; in an ONNX export, written with an
    integral image, as ONNX pools only with windows fixed at export time.

    Output cell (i, j) is the mean over rows [floor(i h / s), ceil((i + 1) h / s)) and the
    columns likewise, as PyTorch's adaptive pooling defines it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        size = self.output_size
        integral = F.pad(x.double().cumsum(2).cumsum(3), (1, 0, 1, 0))  # (B, C, h + 1, w + 1)
        cells = torch.arange(size, device=x.device)
        (top, bottom), (left, right) = (
            ((cells * n) // size, ((cells + 1) * n + size - 1) // size) for n in x.shape[-2:]
        )

        def corner(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return integral.index_select(2, rows).index_select(3, cols)

        sums = corner(bottom, right) - corner(top, right) - corner(bottom, left) + corner(top, left)
        areas = (bottom - top)[:, None] * (right - left)[None, :]
        return (sums / areas).to(x.dtype)


def _select_features(
    input_shape: dict[str, ShapeSpec], in_features: Sequence[str], owner: str
) -> dict[str, ShapeSpec]:
    """Subset of ``input_shape`` named by ``in_features`` (in that order); errors name the gap."""
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(
            f"{owner}: input feature(s) {missing} not in the backbone outputs "
            f"(available: {sorted(input_shape)})"
        )
    return {f: input_shape[f] for f in in_features}


class DecodeHead(nn.Module):
    """Base of the decode heads: ``decode`` maps the input maps (``in_features`` order) to the
    (B, conv_dim, h0, w0) feature at the finest input's size.

    Every head takes ``input_shape`` (the input features), ``conv_dim`` (channels of every conv
    and of the output) and ``norm`` (Detectron2 norm name: "BN", "SyncBN", ...; "" for none)
    from ``MODEL.SEM_SEG_HEAD``, and its other arguments from the ``MODEL.KNET.DECODE_HEAD``
    keys named in ``config_keys``.
    """

    config_keys: dict[str, str] = {}

    def __init__(self, conv_dim: int, norm: str):
        super().__init__()
        self.out_channels = conv_dim
        self._norm = norm

    def conv(self, c_in: int, kernel_size: int, dilation: int = 1) -> nn.Module:
        """``conv_norm_relu`` to ``conv_dim`` channels with the head's norm."""
        return conv_norm_relu(c_in, self.out_channels, kernel_size, self._norm, dilation=dilation)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": _select_features(input_shape, head.IN_FEATURES, cls.__name__),
            "conv_dim": head.CONVS_DIM,
            "norm": head.NORM,
            **{arg: cfg.MODEL.KNET.DECODE_HEAD[key] for arg, key in cls.config_keys.items()},
        }

    def decode(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        """
        Args:
            features: backbone maps containing the inputs, e.g. {"res2": (B, C2, H/4, W/4),
                ..., "res5": (B, C5, H/32, W/32)}.

        Returns:
            1-tuple (feats,), feats (B, conv_dim, h0, w0) at the finest input's size.
        """
        return (self.decode(*[features[f] for f in self.in_features]),)

    forward = forward_features


class SingleInputDecodeHead(DecodeHead):
    """Base of the decode heads that read one backbone map (FCN, PSPNet, ASPP).

    Subclasses build their layers from ``self.in_channels`` and implement ``decode``:
    (B, in_channels, h, w) -> (B, conv_dim, h, w).
    """

    def __init__(self, input_shape: dict[str, ShapeSpec], conv_dim: int, norm: str):
        super().__init__(conv_dim, norm)
        if len(input_shape) != 1:
            raise ValueError(
                f"{type(self).__name__} expects exactly one input feature, got "
                f"{list(input_shape)} (set MODEL.SEM_SEG_HEAD.IN_FEATURES to one feature, e.g. "
                "['res5'])"
            )
        ((name, shape),) = input_shape.items()
        self.in_features = [name]
        self.in_channels = shape.channels
        self.output_stride = shape.stride


class PyramidPoolingModule(nn.ModuleList):
    """PSPNet's pyramid pooling (MMSeg ``PPM``).

    Branch ``i`` is ``Sequential(AdaptiveAvgPool2d(scales[i]), 1x1 conv_norm_relu)``; state-dict
    keys ``{i}.1.weight`` and ``{i}.1.norm.*``.
    """

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, norm: str):
        super().__init__(
            nn.Sequential(AdaptiveAvgPool2d(scale), conv_norm_relu(in_channels, channels, 1, norm))
            for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            x: (B, in_channels, h, w).

        Returns:
            one (B, channels, h, w) map per pool scale, pooled then resized back to (h, w).
        """
        return [resize(branch(x), x.shape[-2:]) for branch in self]


@PIXEL_DECODER_REGISTRY.register()
class KNetUPerHead(DecodeHead):
    """UPerNet's decode head (MMSeg ``UPerHead``) without its classifier.

    A PPM on the coarsest input feeds ``bottleneck``, which becomes the top of an FPN over the
    other inputs (``lateral_convs``, top-down sum, ``fpn_convs``); all levels are resized to the
    finest one, concatenated and fused by ``fpn_bottleneck``.
    """

    config_keys = {"pool_scales": "POOL_SCALES"}

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        conv_dim: int,
        norm: str,
        pool_scales: Sequence[int],
    ):
        """
        Args:
            input_shape: the input features (at least two); used finest (smallest stride) first.
            pool_scales: output sizes of the PPM's adaptive poolings.
        """
        super().__init__(conv_dim, norm)
        if len(input_shape) < 2:
            raise ValueError(
                f"KNetUPerHead expects at least two input features, got {list(input_shape)}"
            )
        # stable sort: equal strides (dilated backbones) keep the given order
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in ordered]
        in_channels = [v.channels for _, v in ordered]
        self.output_stride = ordered[0][1].stride

        self.psp_modules = PyramidPoolingModule(pool_scales, in_channels[-1], conv_dim, norm)
        self.bottleneck = self.conv(in_channels[-1] + len(pool_scales) * conv_dim, 3)
        self.lateral_convs = nn.ModuleList(self.conv(c, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(self.conv(conv_dim, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = self.conv(len(in_channels) * conv_dim, 3)

    def decode(self, *inputs: torch.Tensor) -> torch.Tensor:
        x_top = inputs[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self.bottleneck(torch.cat([x_top] + self.psp_modules(x_top), dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        fpn_outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])]
        fpn_outs.append(laterals[-1])
        size = fpn_outs[0].shape[-2:]
        fpn_outs = [fpn_outs[0]] + [resize(out, size) for out in fpn_outs[1:]]
        return self.fpn_bottleneck(torch.cat(fpn_outs, dim=1))


@PIXEL_DECODER_REGISTRY.register()
class KNetFCNHead(SingleInputDecodeHead):
    """FCN's decode head (MMSeg ``FCNHead``, kernel 3, dilation 1) without its classifier.

    ``num_convs`` 3x3 convs, then (``concat_input``) ``conv_cat`` over [input, convs(input)].
    """

    config_keys = {"num_convs": "NUM_CONVS", "concat_input": "CONCAT_INPUT"}

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        conv_dim: int,
        norm: str,
        num_convs: int,
        concat_input: bool,
    ):
        """
        Args:
            num_convs: number of 3x3 convs (0: identity, needs in channels == conv_dim).
            concat_input: fuse [input, convs(input)] with one more 3x3 conv.
        """
        super().__init__(input_shape, conv_dim, norm)
        in_channels = self.in_channels
        if num_convs < 0 or (num_convs == 0 and in_channels != conv_dim):
            raise ValueError(
                f"{type(self).__name__}: num_convs must be >= 1, or 0 with input channels == "
                f"conv_dim; got num_convs={num_convs}, {in_channels} -> {conv_dim}"
            )
        conv_inputs = ([in_channels] + [conv_dim] * num_convs)[:num_convs]
        # an empty Sequential is the identity (MMSeg's num_convs=0)
        self.convs = nn.Sequential(*(self.conv(c, 3) for c in conv_inputs))
        self.conv_cat = self.conv(in_channels + conv_dim, 3) if concat_input else None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.convs(x)
        if self.conv_cat is not None:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return feats


@PIXEL_DECODER_REGISTRY.register()
class KNetPSPHead(SingleInputDecodeHead):
    """PSPNet's decode head (MMSeg ``PSPHead``) without its classifier.

    ``bottleneck`` (3x3) over [input, PPM(input)], ``pool_scales`` the output sizes of the PPM's
    adaptive poolings.
    """

    config_keys = {"pool_scales": "POOL_SCALES"}

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        conv_dim: int,
        norm: str,
        pool_scales: Sequence[int],
    ):
        super().__init__(input_shape, conv_dim, norm)
        in_channels = self.in_channels
        self.psp_modules = PyramidPoolingModule(pool_scales, in_channels, conv_dim, norm)
        self.bottleneck = self.conv(in_channels + len(pool_scales) * conv_dim, 3)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x] + self.psp_modules(x), dim=1))


@PIXEL_DECODER_REGISTRY.register()
class KNetASPPHead(SingleInputDecodeHead):
    """DeepLabV3's decode head (MMSeg ``ASPPHead``) without its classifier.

    ``bottleneck`` (3x3) over [image pooling resized to the input size, one atrous conv per
    entry of ``dilations`` (1x1 for dilation 1, else 3x3)].
    """

    config_keys = {"dilations": "DILATIONS"}

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        conv_dim: int,
        norm: str,
        dilations: Sequence[int],
    ):
        super().__init__(input_shape, conv_dim, norm)
        in_channels = self.in_channels
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), self.conv(in_channels, 1))
        self.aspp_modules = nn.ModuleList(
            self.conv(in_channels, 1 if d == 1 else 3, dilation=d) for d in dilations
        )
        self.bottleneck = self.conv((len(dilations) + 1) * conv_dim, 3)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        outs = [resize(self.image_pool(x), x.shape[-2:])]
        outs.extend(conv(x) for conv in self.aspp_modules)
        return self.bottleneck(torch.cat(outs, dim=1))
