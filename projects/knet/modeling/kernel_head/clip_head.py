"""Video K-Net's clip-level head for video instance segmentation (lxtGH/Video-K-Net
``knet_vis/tracker/kernel_frame_iter_head.py``, ``KernelFrameIterHeadVideo`` with the "mean"
query merge): one kernel per object for a whole clip, so that an object's id is its kernel."""

import torch
from torch import nn

from ..layers import upsample
from .kernel_update_head import KernelUpdateHead


class ClipKernelHead(nn.Module):
    """S update stages over the T frames of a clip, starting from the image head's last stage.

    With per-frame kernels K (B, T, N, C), mask logits M (B, T, N, h, w) and features F
    (B, T, C, h, w) of the image K-Net:
        K_0 = mean_t K[:, t]                                  (one kernel set per clip)
        stages s < S_clip: K_{s+1}, M, logits = stage_s(F, K_s, M)   (clip mode: group features
            averaged over the frames, class logits per clip, masks on every frame)
        stages s >= S_clip: every frame refines its own copy of the kernels (no class branch).
    The official configs use S = 3, S_clip = 2: the class logits are stage 1's, the masks the last
    stage's.
    """

    def __init__(
        self, stages: list[KernelUpdateHead], num_clip_stages: int, mask_upsample_stride: int = 2
    ) -> None:
        """
        Args:
            stages: the update stages; those from ``num_clip_stages`` on have no class branch.
            num_clip_stages: how many stages update one kernel set for the whole clip.
            mask_upsample_stride: the outputs' masks are upsampled by this (to stride 4).
        """
        super().__init__()
        if not 0 < num_clip_stages <= len(stages):
            raise ValueError(f"num_clip_stages {num_clip_stages} not in [1, {len(stages)}]")
        if any((s.num_classes > 0) != (i < num_clip_stages) for i, s in enumerate(stages)):
            raise ValueError("exactly the first num_clip_stages stages classify")
        self.stages = nn.ModuleList(stages)
        self.num_clip_stages = num_clip_stages
        self.mask_upsample_stride = mask_upsample_stride

    def forward(
        self, features: torch.Tensor, kernels: torch.Tensor, mask_logits: torch.Tensor
    ) -> list[dict[str, torch.Tensor | None]]:
        """
        Args:
            features: (B, T, C, h, w), kernels: (B, T, N, C), mask_logits: (B, T, N, h, w).

        Returns:
            per stage (training; in eval only the last, with the last class logits):
            {"cls_logits": (B, N, K) or None, "mask_logits": (B, T, N, up*h, up*w)}.
        """
        b, t = features.shape[:2]
        kernels = kernels.mean(1)
        outputs, cls_logits = [], None
        for i, stage in enumerate(self.stages):
            if i == self.num_clip_stages:  # from here on, one copy of the kernels per frame
                kernels = kernels[:, None].expand(b, t, *kernels.shape[1:]).flatten(0, 1)
                features, mask_logits = features.flatten(0, 1), mask_logits.flatten(0, 1)
            kernels, mask_logits, stage_cls = stage(features, kernels, mask_logits)
            cls_logits = stage_cls if stage_cls is not None else cls_logits
            if self.training or i == len(self.stages) - 1:
                masks = upsample(
                    mask_logits.reshape(b * t, *mask_logits.shape[-3:]), self.mask_upsample_stride
                )
                masks = masks.unflatten(0, (b, t))
                outputs.append({"cls_logits": stage_cls, "mask_logits": masks})
        if not self.training:
            outputs[-1]["cls_logits"] = cls_logits
        return outputs
