"""The K-Net kernel head: initial kernels followed by S kernel update stages (``KernelIterHead``,
ZwwWayne/K-Net ``knet/det/kernel_iter_head.py``)."""

import torch
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn

from ..layers import upsample
from .initial_kernel_head import ConvKernelHead
from .kernel_update_head import KernelUpdateHead, build_update_stages

KERNEL_HEAD_REGISTRY = Registry("KNET_KERNEL_HEAD")
KERNEL_HEAD_REGISTRY.__doc__ = """
Kernel heads of K-Net: map the pixel decoder outputs to per-stage class and mask predictions.
Selected by ``MODEL.KNET.KERNEL_HEAD_NAME`` and built as ``cls(cfg)``.
"""


def build_kernel_head(cfg) -> nn.Module:
    return KERNEL_HEAD_REGISTRY.get(cfg.MODEL.KNET.KERNEL_HEAD_NAME)(cfg)


@KERNEL_HEAD_REGISTRY.register()
class KNetIterativeKernelHead(nn.Module):
    """Initial head (``ConvKernelHead``) + ``num_stages`` unshared ``KernelUpdateHead`` stages.

    Masks travel between stages at the pixel-decoder stride (8); the outputs used by losses,
    matching and inference are upsampled by ``mask_upsample_stride`` (to stride 4). In eval mode
    only the last stage is upsampled and returned.
    """

    @configurable
    def __init__(
        self,
        *,
        initial_head: ConvKernelHead,
        stages: list[KernelUpdateHead],
        mask_upsample_stride: int = 2,
    ):
        super().__init__()
        self.initial_head = initial_head
        self.stages = nn.ModuleList(stages)
        self.mask_upsample_stride = mask_upsample_stride

    @classmethod
    def from_config(cls, cfg):
        k = cfg.MODEL.KNET
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if not 0 < k.NUM_THING_CLASSES <= num_classes:
            raise ValueError(
                f"MODEL.KNET.NUM_THING_CLASSES={k.NUM_THING_CLASSES} must be in "
                f"[1, MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes}]"
            )
        initial_head = ConvKernelHead(
            channels=cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
            num_proposals=k.NUM_PROPOSALS,
            num_classes=num_classes,
            num_thing_classes=k.NUM_THING_CLASSES,
            norm=cfg.MODEL.SEM_SEG_HEAD.NORM,
            kernel_init_std=k.KERNEL_INIT_STD,
            hard_mask_threshold=k.HARD_MASK_THRESHOLD,
        )
        stages = build_update_stages(
            cfg, num_classes=num_classes, hard_mask_threshold=k.HARD_MASK_THRESHOLD
        )
        return {
            "initial_head": initial_head,
            "stages": stages,
            "mask_upsample_stride": k.MASK_UPSAMPLE_STRIDE,
        }

    def forward(
        self,
        loc_feature: torch.Tensor,
        sem_feature: torch.Tensor,
        previous: torch.Tensor | None = None,
    ) -> dict:
        """
        Args:
            loc_feature, sem_feature: (B, C, h, w) pixel decoder outputs (stride 8).
            previous: (B, N, C) the previous frame's last-stage kernels: the last stage's input
                (Video K-Net's kernel fusion, when the stage has one).

        Returns:
            dict with
              "init": {"mask_logits": (B, P, 2h, 2w), "seg_logits": (B, K, 2h, 2w)}
                  (training only: the initial head's own losses),
              "stages": list of {"cls_logits": (B, N, K), "mask_logits": (B, N, 2h, 2w)}, one
                  per stage in training, only the last one in eval. N = P (+ stuff kernels),
              "kernels": (B, N, C) the last stage's kernels (what Video K-Net links and embeds),
              "kernel_masks": (B, N, h, w) the last stage's mask logits before upsampling,
              "last_input_masks": (B, N, h, w) those the last stage pooled its group features
                  with, and "features": (B, C, h, w) the shared feature the stages read (what
                  Video K-Net's clip head and "update" tracking link read),
              "seg_logits": (B, K, h, w) the initial head's semantic logits.
        """
        up = self.mask_upsample_stride
        init = self.initial_head(loc_feature, sem_feature)
        features = init["features"]
        kernels, masks = self.initial_head.with_stuff(init)
        stages = []
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            last_input_masks = masks
            kernels, masks, cls_logits = stage(
                features, kernels, masks, previous=previous if last else None
            )
            if self.training or i == len(self.stages) - 1:
                stages.append({"cls_logits": cls_logits, "mask_logits": upsample(masks, up)})
        out = {
            "stages": stages if self.training else stages[-1:],
            "kernels": kernels,
            "kernel_masks": masks,
            "last_input_masks": last_input_masks,
            "features": features,
            "seg_logits": init["seg_logits"],
        }
        if self.training:
            out["init"] = {
                "mask_logits": upsample(init["thing_masks"], up),
                "seg_logits": upsample(init["seg_logits"], up),
            }
        return out
