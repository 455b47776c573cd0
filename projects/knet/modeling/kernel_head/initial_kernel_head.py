"""Initial kernels and masks of K-Net (``ConvKernelHead``, ZwwWayne/K-Net
``knet/det/kernel_head.py``)."""

import torch
from torch import nn

from ..layers import conv_norm_relu
from .kernel_update_head import bias_init_with_prob


class ConvKernelHead(nn.Module):
    """Produces the shared feature F, the initial thing kernels/masks and semantic logits.

        F_loc = loc_convs(loc_feature),  F_seg = seg_convs(sem_feature)    (1x1 conv-norm-ReLU)
        M_thing = conv1x1(F_loc; W_init)            (B, P, h, w), P thing proposals, no bias
        S = conv_seg(F_seg)                         (B, K, h, w), K classes, sigmoid logits
        F = F_seg + F_loc
        K_thing = W_init + sum_u [sigmoid(M_thing(u)) > 0.5] F(u)   (an unnormalised sum)
    For panoptic segmentation the stuff kernels are conv_seg's rows for the stuff classes and
    their masks the matching rows of S (bias included); see ``with_stuff``.
    """

    def __init__(
        self,
        *,
        channels: int,
        num_proposals: int,
        num_classes: int,
        num_thing_classes: int,
        norm: str = "GN",
        kernel_init_std: float = 1.0,
        hard_mask_threshold: float = 0.5,
    ):
        super().__init__()
        self.num_proposals = num_proposals
        self.num_classes = num_classes
        self.num_thing_classes = num_thing_classes
        self.hard_mask_threshold = hard_mask_threshold
        self.loc_convs = nn.Sequential(conv_norm_relu(channels, channels, 1, norm, init_std=0.01))
        self.seg_convs = nn.Sequential(conv_norm_relu(channels, channels, 1, norm, init_std=0.01))
        self.init_kernels = nn.Conv2d(channels, num_proposals, 1, bias=False)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.init_kernels.weight, std=kernel_init_std)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.constant_(self.conv_seg.bias, bias_init_with_prob(0.01))

    @property
    def num_stuff_classes(self) -> int:
        return self.num_classes - self.num_thing_classes

    def forward(
        self, loc_feature: torch.Tensor, sem_feature: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            loc_feature, sem_feature: (B, C, h, w) outputs of the pixel decoder.

        Returns:
            dict with
              "features": (B, C, h, w) the feature F of every update stage,
              "thing_kernels": (B, P, C), "thing_masks": (B, P, h, w) logits,
              "seg_logits": (B, K, h, w) semantic logits.
        """
        loc = self.loc_convs(loc_feature)
        seg = self.seg_convs(sem_feature)
        thing_masks = self.init_kernels(loc)
        seg_logits = self.conv_seg(seg)
        features = seg + loc
        acc = torch.promote_types(features.dtype, torch.float32)
        with torch.autocast(device_type=features.device.type, enabled=False):
            binary = (thing_masks.to(acc).sigmoid() > self.hard_mask_threshold).to(acc)
            obj_feats = torch.einsum("bnhw,bchw->bnc", binary, features.to(acc))
        kernels = self.init_kernels.weight.flatten(1)[None] + obj_feats.to(
            self.init_kernels.weight.dtype
        )
        return {
            "features": features,
            "thing_kernels": kernels,
            "thing_masks": thing_masks,
            "seg_logits": seg_logits,
        }

    def with_stuff(self, out: dict[str, torch.Tensor]):
        """Append the stuff kernels and masks: (B, P + K_stuff, C), (B, P + K_stuff, h, w)."""
        kernels, masks = out["thing_kernels"], out["thing_masks"]
        if self.num_stuff_classes == 0:
            return kernels, masks
        stuff_kernels = self.conv_seg.weight[self.num_thing_classes :].flatten(1)
        stuff_kernels = stuff_kernels[None].expand(kernels.shape[0], -1, -1)
        stuff_masks = out["seg_logits"][:, self.num_thing_classes :]
        return torch.cat([kernels, stuff_kernels], dim=1), torch.cat([masks, stuff_masks], dim=1)
