"""The auxiliary FCN head of semantic K-Net, trained with its own cross-entropy on a backbone
feature (MMSeg's ``auxiliary_head``; dropped at inference)."""

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from .pixel_decoder.decode_heads import KNetFCNHead, _select_features

__all__ = ["AuxiliaryFCNHead", "build_auxiliary_head"]


class AuxiliaryFCNHead(KNetFCNHead):
    """MMSeg's auxiliary ``FCNHead`` (no ``concat_input``) with its classifier.

    The FCN feature of one backbone map, then ``dropout`` and the 1x1 ``conv_seg``
    (N(0, 0.01) weights, zero bias). State-dict keys: ``convs.{i}.weight``, ``convs.{i}.norm.*``,
    ``conv_seg.{weight,bias}``.
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        channels: int,
        norm: str,
        num_convs: int,
        num_classes: int,
        dropout: float,
    ):
        """``KNetFCNHead``'s arguments (one input feature, e.g. "res4"; ``channels`` is its
        ``conv_dim``), ``num_classes`` classifier outputs and the Dropout2d probability before
        the classifier."""
        super().__init__(
            input_shape, conv_dim=channels, norm=norm, num_convs=num_convs, concat_input=False
        )
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        aux = cfg.MODEL.KNET.AUX_HEAD
        return {
            "input_shape": _select_features(input_shape, [aux.IN_FEATURE], cls.__name__),
            "channels": aux.CHANNELS,
            "norm": cfg.MODEL.SEM_SEG_HEAD.NORM,
            "num_convs": aux.NUM_CONVS,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "dropout": cfg.MODEL.KNET.DECODE_HEAD.DROPOUT,
        }

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features: backbone maps containing the input, e.g. {"res4": (B, C, h, w)}.

        Returns:
            logits (B, num_classes, h, w) at the input's stride.
        """
        (feats,) = self.forward_features(features)
        return self.conv_seg(self.dropout(feats))


def build_auxiliary_head(cfg, input_shape: dict[str, ShapeSpec]) -> AuxiliaryFCNHead | None:
    """The auxiliary FCN head, or None when ``MODEL.KNET.AUX_HEAD.LOSS_WEIGHT`` is 0.

    Args:
        cfg: a K-Net config.
        input_shape: the backbone's ``output_shape()``.
    """
    if cfg.MODEL.KNET.AUX_HEAD.LOSS_WEIGHT == 0:
        return None
    return AuxiliaryFCNHead(cfg, input_shape)
