"""The semantic K-Net kernel head (``IterativeDecodeHead``, ZwwWayne/K-Net
``knet/seg/iter_decode_head.py``)."""

import torch
from detectron2.config import configurable
from torch import nn

from .iterative_head import KERNEL_HEAD_REGISTRY
from .kernel_update_head import KernelUpdateHead, build_update_stages


@KERNEL_HEAD_REGISTRY.register()
class KNetSemanticKernelHead(nn.Module):
    """One kernel per class, refined by ``num_stages`` unshared update stages.

    With F the decode head's feature (B, C, h, w)::

        S^0 = conv_seg(dropout(F))                      (B, K, h, w) initial logits, with bias
        K^0 = conv_seg.weight                           (B, K, C) the same for every image
        K^s, S^s = stage_s(F, K^{s-1}, S^{s-1})         group features from softmax(S, dim=1)

    No class branch: kernel k always stands for class k. The logits stay at the decoder's
    resolution; losses and inference resize them.
    """

    @configurable
    def __init__(
        self,
        *,
        channels: int,
        num_classes: int,
        stages: list[KernelUpdateHead],
        dropout: float = 0.1,
    ):
        """
        Args:
            channels: width C of the decoder feature and of the kernels.
            num_classes: K, one kernel per class.
            stages: the update stages (``num_classes=0``, ``hard_mask_threshold=None``).
            dropout: Dropout2d before conv_seg (as in MMSeg's decode heads).
        """
        super().__init__()
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.stages = nn.ModuleList(stages)
        for stage in self.stages:
            if stage.num_classes != 0 or stage.hard_mask_threshold is not None:
                raise ValueError(
                    "semantic update stages need num_classes=0 and hard_mask_threshold=None"
                )

    @classmethod
    def from_config(cls, cfg):
        return {
            "channels": cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "stages": build_update_stages(cfg, num_classes=0, hard_mask_threshold=None),
            "dropout": cfg.MODEL.KNET.DECODE_HEAD.DROPOUT,
        }

    def forward(self, features: torch.Tensor) -> dict:
        """
        Args:
            features: (B, C, h, w) the decode head's pre-classifier feature.

        Returns:
            dict with
              "init": {"seg_logits": (B, K, h, w)} (training only),
              "stages": list of {"seg_logits": (B, K, h, w)}, one per stage in training, only
                  the last one in eval.
        """
        logits = self.conv_seg(self.dropout(features))
        init_logits = logits
        kernels = self.conv_seg.weight.flatten(1)[None].expand(features.shape[0], -1, -1)
        stages = []
        for stage in self.stages:
            kernels, logits, _ = stage(features, kernels, logits)
            stages.append({"seg_logits": logits})
        if not self.training:
            return {"stages": stages[-1:]}
        return {"init": {"seg_logits": init_logits}, "stages": stages}
