"""K-Net's "localization FPN" (``SemanticFPNWrapper``, ZwwWayne/K-Net
``knet/det/semantic_fpn_wrapper.py``)."""

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from ..layers import conv_norm_relu
from .build import PIXEL_DECODER_REGISTRY
from .position_encoding import PositionEmbeddingSine


@PIXEL_DECODER_REGISTRY.register()
class KNetLocalizationFPN(nn.Module):
    """Fuses P2-P5 into two stride-8 maps: the localization and the semantic feature.

    Branch 0 takes P2 through a stride-2 3x3 conv; branch ``i`` (P3-P5) applies ``i`` 3x3 convs
    with a bilinear x2 upsampling after each but the last, so every branch ends at stride 8.
    P5 gets a sine positional encoding added first. The branches are summed, then two 1x1 convs
    give the outputs. Every conv is conv -> norm -> ReLU.
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        conv_dim: int,
        norm: str,
        positional_encoding: bool,
    ):
        """
        Args:
            input_shape: the four input features, finest (stride 4) first.
            conv_dim: channels of every conv and of both outputs.
            norm: Detectron2 norm name (the official model uses "GN").
            positional_encoding: add a sine encoding to the coarsest level.
        """
        super().__init__()
        input_shape = sorted(input_shape.items(), key=lambda x: x[1].stride)
        self.in_features = [k for k, _ in input_shape]
        strides = [v.stride for _, v in input_shape]
        if len(strides) != 4 or strides[1] != 2 * strides[0] or strides[0] != 4:
            raise ValueError(f"expected 4 features at strides 4, 8, 16, 32, got {strides}")
        in_channels = [v.channels for _, v in input_shape]

        def conv(c_in: int, kernel_size: int = 3, stride: int = 1) -> nn.Module:
            return conv_norm_relu(c_in, conv_dim, kernel_size, norm, stride=stride, init_std=0.01)

        self.convs_all_levels = nn.ModuleList()
        for level, c_in in enumerate(in_channels):
            branch = nn.Sequential()
            for j in range(max(level, 1)):  # P2: one stride-2 conv
                branch.add_module(f"conv{j}", conv(c_in, stride=1 if level else 2))
                c_in = conv_dim
                if j < level - 1:
                    branch.add_module(
                        f"upsample{j}",
                        nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
                    )
            self.convs_all_levels.append(branch)
        self.conv_pred = conv(conv_dim, kernel_size=1)
        self.aux_conv = conv(conv_dim, kernel_size=1)
        self.pe = PositionEmbeddingSine(in_channels[3] // 2) if positional_encoding else None
        self.output_stride = 8

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        in_features = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in in_features},
            "conv_dim": cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
            "norm": cfg.MODEL.SEM_SEG_HEAD.NORM,
            "positional_encoding": cfg.MODEL.KNET.POSITIONAL_ENCODING,
        }

    def forward_features(
        self, features: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            features: backbone maps, e.g. {"p2": (B, C2, H/4, W/4), ..., "p5": (B, C5, H/32, W/32)}.

        Returns:
            loc_feature, sem_feature: both (B, conv_dim, H/8, W/8).
        """
        maps: list[torch.Tensor] = [features[f] for f in self.in_features]
        if self.pe is not None:
            maps[3] = maps[3] + self.pe(maps[3])
        fused = self.convs_all_levels[0](maps[0])
        for level in range(1, 4):
            fused = fused + self.convs_all_levels[level](maps[level])
        return self.conv_pred(fused), self.aux_conv(fused)

    forward = forward_features
