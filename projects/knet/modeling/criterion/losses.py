"""Loss functions of K-Net, in the exact forms of the official code: ZwwWayne/K-Net
``knet/det/dice_loss.py`` and ``knet/cross_entropy_loss.py``, MMDet 2.x
``mmdet/models/losses/focal_loss.py``."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from ..layers import resize


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    eps: float = 1e-3,
    avg_factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over masks of ``1 - 2 sum(p t) / ((sum p^2 + eps) + (sum t^2 + eps))``.

    The V-Net form with squared denominators (not 2|X∩Y| / (|X| + |Y|)).

    Args:
        logits: (M, ...) mask logits; targets: (M, ...) soft targets in [0, 1].
        avg_factor: divide the sum over masks by this instead of M (a global count).
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1).to(p.dtype)
    dice = 2 * (p * t).sum(1) / ((p * p).sum(1) + eps + (t * t).sum(1) + eps)
    if avg_factor is not None:
        return (1 - dice).sum() / avg_factor
    return (1 - dice).mean()


def mask_bce_loss(
    logits: torch.Tensor, targets: torch.Tensor, avg_factor: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy with soft targets, mean over all elements (0 for no masks), or
    the sum divided by ``avg_factor`` (a global count of elements)."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    if avg_factor is not None:
        loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum")
        return loss / avg_factor
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def weighted_focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    avg_factor: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss summed over elements, weighted, divided by ``avg_factor``.

    Args:
        logits: (M, K) class logits (no background column).
        labels: (M,) int64 in [0, K]; K means background (an all-zero one-hot target).
        weights: (M, K) per-element weights.
    """
    num_classes = logits.shape[-1]
    onehot = F.one_hot(labels, num_classes + 1)[..., :num_classes].to(logits.dtype)
    loss = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="none")
    return (loss * weights).sum() / avg_factor


def rank_loss(mask_logits: torch.Tensor, rank_targets: torch.Tensor, ignore_index: int = 255):
    """Cross-entropy over the kernel axis, mean over ALL pixels (ignored pixels count as 0).

    Args:
        mask_logits: (B, N, H, W); rank_targets: (B, H, W) kernel index per pixel or ignore.
    """
    loss = F.cross_entropy(mask_logits, rank_targets, ignore_index=ignore_index, reduction="none")
    return loss.mean()


def semantic_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    avg_non_ignore: bool = False,
    normalizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy of (B, K, h, w) logits against (B, H, W) labels, as MMSeg 0.x.

    The logits are bilinearly resized (align_corners=False) to the label size first. Ignored
    pixels contribute 0; the sum is divided by all B*H*W pixels (``avg_non_ignore=False``, the
    official reduction) or by the non-ignored ones (0 when every pixel is ignored); with
    ``normalizer``, by ``normalizer(number of non-ignored pixels)`` instead (a global count).
    """
    logits = resize(logits, labels.shape[-2:])
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if not avg_non_ignore:
        return loss.mean()
    if normalizer is not None:
        return loss.sum() / normalizer((labels != ignore_index).sum())
    return loss.sum() / (labels != ignore_index).sum().clamp(min=1)
