"""Hungarian matching of K-Net (``MaskHungarianAssigner`` with focal, dice and mask costs,
ZwwWayne/K-Net ``knet/det/mask_hungarian_assigner.py``)."""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .numerics import raise_non_finite


def focal_cost(
    cls_logits: torch.Tensor, gt_labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """(N, K) logits, (G,) labels -> (N, G) focal cost at each GT's class."""
    eps = 1e-12
    p = cls_logits.sigmoid()
    neg = (1 - alpha) * p.pow(gamma) * (-(1 - p + eps).log())
    pos = alpha * (1 - p).pow(gamma) * (-(p + eps).log())
    return (pos - neg)[:, gt_labels]


def dice_cost(mask_probs: torch.Tensor, gt_masks: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """(N, HW) probabilities, (G, HW) soft targets -> (N, G) negative squared-form dice."""
    numerator = 2 * mask_probs @ gt_masks.t()
    denominator = (
        (mask_probs * mask_probs).sum(1)[:, None] + eps + (gt_masks * gt_masks).sum(1)[None] + eps
    )
    return -numerator / denominator


def mask_cost(mask_probs: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """(N, HW), (G, HW) -> (N, G) negative mean pixel agreement sum(p t + (1-p)(1-t)) / HW."""
    hw = mask_probs.shape[1]
    agree = mask_probs @ gt_masks.t() + (1 - mask_probs) @ (1 - gt_masks).t()
    return -agree / hw


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predicted masks to ground-truth masks for one image.

    cost = cost_class * focal + cost_dice * dice + cost_mask * mask, all in fp32, solved with
    ``scipy.optimize.linear_sum_assignment``. The class cost is skipped when no class logits
    are given (the initial head and the first update stage in the official code).

    ``dice_min_prob`` / ``mask_min_prob`` clamp the mask probabilities from below in the dice /
    mask cost (Video K-Net's matcher: 0.001 / 0.01; image K-Net's: none).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 1.0,
        cost_dice: float = 4.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        dice_min_prob: float = 0.0,
        mask_min_prob: float = 0.0,
    ):
        super().__init__()
        self.dice_min_prob = dice_min_prob
        self.mask_min_prob = mask_min_prob
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(
        self,
        mask_logits: torch.Tensor,
        gt_masks: torch.Tensor,
        cls_logits: torch.Tensor | None = None,
        gt_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, H, W) logits, (G, H, W) soft targets [, (N, K) logits, (G,) labels] -> (N, G)."""
        probs = mask_logits.float().flatten(1).sigmoid()
        targets = gt_masks.float().flatten(1)
        cost = self.cost_dice * dice_cost(probs.clamp(min=self.dice_min_prob), targets)
        cost = cost + self.cost_mask * mask_cost(probs.clamp(min=self.mask_min_prob), targets)
        if cls_logits is not None and self.cost_class != 0:
            cost = cost + self.cost_class * focal_cost(
                cls_logits.float(), gt_labels, self.focal_alpha, self.focal_gamma
            )
        return cost

    @torch.no_grad()
    def forward(
        self,
        mask_logits: torch.Tensor,
        gt_masks: torch.Tensor,
        cls_logits: torch.Tensor | None = None,
        gt_labels: torch.Tensor | None = None,
        name: str = "cost matrix",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pred_indices, gt_indices), int64 on the predictions' device.

        ``name`` identifies the predictions in the error raised for a non-finite cost.
        """
        device = mask_logits.device
        if gt_masks.shape[0] == 0 or mask_logits.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty
        with torch.autocast(device_type=device.type, enabled=False):
            cost = self.cost_matrix(mask_logits, gt_masks, cls_logits, gt_labels)
        cost = cost.cpu().numpy()
        if not np.isfinite(cost).all():  # checked on the host copy scipy needs anyway
            raise_non_finite(name, "matching cost")
        rows, cols = linear_sum_assignment(cost)
        return (
            torch.as_tensor(rows, dtype=torch.int64, device=device),
            torch.as_tensor(cols, dtype=torch.int64, device=device),
        )

    def __repr__(self) -> str:
        return (
            f"HungarianMatcher(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice})"
        )
