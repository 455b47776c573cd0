"""Losses of K-Net: the initial head's and every update stage's, with Hungarian matching
(ZwwWayne/K-Net ``knet/det/kernel_iter_head.py`` ``forward_train``, ``kernel_update_head.py``
``get_targets`` and ``loss``, ``kernel_head.py`` ``loss``)."""

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn

from .losses import dice_loss, mask_bce_loss, rank_loss, weighted_focal_loss
from .matcher import HungarianMatcher
from .numerics import at_least_fp32, check_finite, named_tensors


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over all workers (the official cls-loss normaliser)."""
    world_size = comm.get_world_size()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / world_size
    return value


def global_avg_factor(count: torch.Tensor) -> torch.Tensor:
    """``max(count summed over all workers, 1) / world size``, a float scalar without gradient.

    A process dividing its loss sum by this makes DDP's mean of the gradients over the workers
    the gradient of (sum over the global batch) / max(global count, 1): the loss of one process
    holding the whole global batch, whatever the number of workers.
    """
    total = count.detach().float().clone()
    world_size = comm.get_world_size()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total.clamp(min=1) / world_size


# The official loss weights: focal classification, mask BCE, dice, rank (stuff kernels) and the
# initial head's semantic loss.
LOSS_WEIGHTS = {"cls": 2.0, "mask": 1.0, "dice": 4.0, "rank": 0.1, "seg": 1.0}


class KNetCriterion(nn.Module):
    """Computes the K-Net training losses (already multiplied by their weights).

    Targets are one dict per image, all masks at the prediction resolution (stride 4 of the
    padded batch) and soft (bilinearly downsampled binary masks):
        "labels": (G,) int64 thing classes, "masks": (G, H, W) float thing masks,
        "stuff_labels": (S,) int64 stuff classes (>= num_thing_classes), "stuff_masks": (S, H, W).

    Matching: the initial head is matched on its own masks; stage s is matched on the detached
    predictions of stage s-1 (stage 0 on the initial masks, without a class cost). Only the
    ``num_proposals`` thing kernels and the thing classes take part; the stuff kernel
    ``num_proposals + i`` is always paired with stuff class ``num_thing_classes + i``.

    Numerics: the outputs are promoted to fp32 and the matching and losses run with autocast
    off. Outputs are checked before matching and the loss terms after, so a diverged run raises
    ``FloatingPointError`` naming the iteration and the first non-finite tensor.
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        num_classes: int,
        num_thing_classes: int,
        num_proposals: int,
        weight_dict: dict[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        stage_loss_weights: Sequence[float] = (1.0, 1.0, 1.0),
        ignore_value: int = 255,
        global_batch_losses: bool = False,
        stage_rank_loss: bool = True,
        semantic_loss: str = "focal",
    ):
        """
        Args:
            matcher: assigns thing kernels to thing targets.
            num_classes, num_thing_classes, num_proposals: K, T and P (the kernel head's).
            weight_dict: weights of the loss terms "cls", "mask", "dice", "rank" and "seg";
                missing ones take the official ``LOSS_WEIGHTS``.
            focal_alpha, focal_gamma: the focal classification loss.
            stage_loss_weights: one factor per update stage.
            ignore_value: the void label of the rank and semantic targets.
            global_batch_losses: in several processes, divide the mask, dice, semantic and
                classification losses by the global counts (:func:`global_avg_factor`) instead
                of the official per-process means (and, for classification, the clamped mean of
                the counts). The same losses in one process.
            stage_rank_loss: the rank loss of the update stages too, not only of the initial
                head (Video K-Net's configs train without it).
            semantic_loss: the initial head's semantic loss: "focal" (sigmoid focal loss per
                class, K-Net) or "cross_entropy" (softmax over the classes, the mean over all
                pixels with background pixels ignored, as Video K-Net's configs).
        """
        super().__init__()
        self.matcher = matcher
        self.num_classes = num_classes
        self.num_thing_classes = num_thing_classes
        self.num_proposals = num_proposals
        self.weight_dict = {**LOSS_WEIGHTS, **(weight_dict or {})}
        if set(self.weight_dict) != set(LOSS_WEIGHTS):
            raise ValueError(f"weight_dict keys must be in {sorted(LOSS_WEIGHTS)}")
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.stage_loss_weights = list(stage_loss_weights)
        self.ignore_value = ignore_value
        self.global_batch_losses = global_batch_losses
        if semantic_loss not in ("focal", "cross_entropy"):
            raise ValueError(f"semantic_loss must be 'focal' or 'cross_entropy': {semantic_loss!r}")
        self.stage_rank_loss = stage_rank_loss
        self.semantic_loss_type = semantic_loss

    @property
    def has_stuff_kernels(self) -> bool:
        return self.num_classes > self.num_thing_classes

    def global_avg_factor(self, count: torch.Tensor) -> torch.Tensor | None:
        """:func:`global_avg_factor` of ``count`` with ``global_batch_losses`` in several
        processes; None (the official per-process mean) otherwise, so that one process takes
        exactly the official code path."""
        if self.global_batch_losses and comm.get_world_size() > 1:
            return global_avg_factor(count)
        return None

    def match(
        self,
        mask_logits: torch.Tensor,
        cls_logits: torch.Tensor | None,
        targets: list[dict[str, torch.Tensor]],
        name: str = "predictions",
    ) -> list[torch.Tensor]:
        """Per image, (P,) int64: the GT index matched to each thing kernel, or -1.

        ``name`` (which predictions are matched) is reported if a matching cost is not finite.
        """
        p, t = self.num_proposals, self.num_thing_classes
        assignments = []
        for b, target in enumerate(targets):
            rows, cols = self.matcher(
                mask_logits[b, :p].detach(),
                target["masks"],
                None if cls_logits is None else cls_logits[b, :p, :t].detach(),
                target["labels"],
                name=f"{name}, image {b}",
            )
            assigned = torch.full((p,), -1, dtype=torch.int64, device=mask_logits.device)
            assigned[rows] = cols
            assignments.append(assigned)
        return assignments

    def kernel_targets(self, assignments: list[torch.Tensor], targets, num_kernels: int):
        """Labels (B, N) (num_classes = background), positive mask (B, N) and the positives'
        target masks (num_pos, H, W) in row-major (image, kernel) order."""
        p, k = self.num_proposals, self.num_classes
        device = assignments[0].device if assignments else None
        labels = torch.full((len(targets), num_kernels), k, dtype=torch.int64, device=device)
        positive = torch.zeros((len(targets), num_kernels), dtype=torch.bool, device=device)
        pos_masks = []
        for b, (assigned, target) in enumerate(zip(assignments, targets)):
            rows = (assigned >= 0).nonzero().squeeze(1)
            labels[b, rows] = target["labels"][assigned[rows]]
            positive[b, rows] = True
            kernel_masks = [(int(r), target["masks"][assigned[r]]) for r in rows]
            if num_kernels > p:
                stuff_rows = p + target["stuff_labels"] - self.num_thing_classes
                labels[b, stuff_rows] = target["stuff_labels"]
                positive[b, stuff_rows] = True
                kernel_masks += [(int(r), m) for r, m in zip(stuff_rows, target["stuff_masks"])]
            pos_masks += [m for _, m in sorted(kernel_masks, key=lambda x: x[0])]
        return labels, positive, pos_masks

    def rank_targets(self, positive: torch.Tensor, pos_masks: list[torch.Tensor], shape):
        """(B, H, W) index of the last positive kernel whose target covers each pixel."""
        target = torch.full(shape, self.ignore_value, dtype=torch.int64, device=positive.device)
        # ascending kernel index within each image
        for i, (b, n) in enumerate(positive.nonzero().tolist()):
            target[b][pos_masks[i] > 0] = n
        return target

    def mask_losses(self, mask_logits, positive, pos_masks, prefix: str) -> dict[str, torch.Tensor]:
        pred = mask_logits[positive]
        tgt = torch.stack(pos_masks) if pos_masks else torch.zeros_like(pred)
        num_masks = positive.sum()
        mask_avg = self.global_avg_factor(num_masks * mask_logits[0, 0].numel())
        dice_avg = self.global_avg_factor(num_masks)
        losses = {
            f"{prefix}loss_mask": self.weight_dict["mask"] * mask_bce_loss(pred, tgt, mask_avg),
            f"{prefix}loss_dice": self.weight_dict["dice"] * dice_loss(pred, tgt, 1e-3, dice_avg),
        }
        ranked = prefix == "rpn_" or self.stage_rank_loss
        if self.has_stuff_kernels and self.weight_dict["rank"] > 0 and ranked:
            b, _, h, w = mask_logits.shape
            rank_tgt = self.rank_targets(positive, pos_masks, (b, h, w))
            losses[f"{prefix}loss_rank"] = self.weight_dict["rank"] * rank_loss(
                mask_logits, rank_tgt, self.ignore_value
            )
        return losses

    def initial_losses(self, init: dict[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:
        mask_logits = init["mask_logits"]
        assignments = self.match(mask_logits, None, targets, "init")
        labels, positive, pos_masks = self.kernel_targets(assignments, targets, self.num_proposals)
        losses = self.mask_losses(mask_logits, positive, pos_masks, "rpn_")
        losses["rpn_loss_seg"] = self.weight_dict["seg"] * self.semantic_loss(
            init["seg_logits"], labels, positive, pos_masks, targets
        )
        return {k.replace("rpn_loss_", "loss_rpn_"): v for k, v in losses.items()}

    def semantic_loss(self, seg_logits, labels, positive, pos_masks, targets) -> torch.Tensor:
        """Focal loss of the initial semantic logits (B, K, H, W): stuff pixels get their class,
        then pixels of matched things theirs; normalised by the number of foreground pixels
        (this process's, or the global count with ``global_batch_losses``). With
        ``semantic_loss`` "cross_entropy": the softmax cross-entropy of the same targets, summed
        over the foreground pixels and divided by all B H W (mmdet's mean with ignored pixels)."""
        b, k, h, w = seg_logits.shape
        seg_target = torch.full((b, h, w), k, dtype=torch.int64, device=seg_logits.device)
        for i, target in enumerate(targets):
            for label, mask in zip(target["stuff_labels"], target["stuff_masks"]):
                seg_target[i][mask > 0] = label
        for i, (bi, n) in enumerate(positive.nonzero().tolist()):
            seg_target[bi][pos_masks[i] > 0] = labels[bi, n]
        if self.semantic_loss_type == "cross_entropy":
            total = F.cross_entropy(seg_logits, seg_target, ignore_index=k, reduction="sum")
            return total / seg_target.numel()
        num_fg = (seg_target < k).sum()
        avg_factor = self.global_avg_factor(num_fg)
        if avg_factor is None:  # official: this process's count, not all-reduced
            avg_factor = num_fg.clamp(min=1).float()
        logits = seg_logits.permute(0, 2, 3, 1).reshape(-1, k)
        return self.focal_loss(logits, seg_target.flatten(), torch.ones_like(logits), avg_factor)

    def focal_loss(self, logits, labels, weights, avg_factor) -> torch.Tensor:
        """``weighted_focal_loss`` with the criterion's alpha and gamma."""
        return weighted_focal_loss(
            logits, labels, weights, avg_factor, self.focal_alpha, self.focal_gamma
        )

    def label_weights(self, num_kernels: int, device) -> torch.Tensor:
        """(N, K): thing kernels never learn stuff logits; stuff kernel i only its own class."""
        p, t, k = self.num_proposals, self.num_thing_classes, self.num_classes
        if num_kernels == p and not self.has_stuff_kernels:
            return torch.ones((num_kernels, k), device=device)
        weights = torch.zeros((num_kernels, k), device=device)
        weights[:p, :t] = 1
        stuff = torch.arange(k - t, device=device)
        weights[p + stuff, t + stuff] = 1
        return weights

    def assigned_losses(self, stage, assignments, targets, prefix: str) -> dict[str, torch.Tensor]:
        """The losses of one stage's {"mask_logits", "cls_logits" (None: no class loss)} given
        its kernels' ``assignments`` (:meth:`match`)."""
        mask_logits, cls_logits = stage["mask_logits"], stage["cls_logits"]
        b, n = mask_logits.shape[:2]
        labels, positive, pos_masks = self.kernel_targets(assignments, targets, n)
        losses = {}
        if cls_logits is not None:
            num_pos = self.global_avg_factor(positive.sum())
            if num_pos is None:  # official: the mean over workers, clamped
                num_pos = all_reduce_mean(positive.sum().float()).clamp(min=1.0)
            k = cls_logits.shape[-1]
            weights = self.label_weights(n, cls_logits.device).repeat(b, 1)
            cls_loss = self.focal_loss(
                cls_logits.reshape(b * n, k), labels.flatten(), weights, num_pos
            )
            losses[f"{prefix}loss_cls"] = self.weight_dict["cls"] * cls_loss
        losses.update(self.mask_losses(mask_logits, positive, pos_masks, prefix))
        return losses

    def tube_losses(
        self, stages: list[dict], targets: list[dict], num_matched_stages: int
    ) -> dict[str, torch.Tensor]:
        """The losses ``tracker_s{s}_loss_*`` of Video K-Net's clip head: a clip's T frames are
        stacked into one tall image, predictions (B, T, N, h, w) -> (B, N, T h, w) and targets
        {"labels": (G,), "masks": (G, T h, w)} (one tube per object, zero where it is absent),
        and matched as images are. Unlike the image stages, stage s < ``num_matched_stages``
        is matched on its own (detached) predictions; later stages reuse the last assignment."""
        stages = at_least_fp32(stages)
        check_finite(("output", named_tensors({"clip_stages": stages})))
        losses, assignments = {}, None
        with torch.autocast(device_type=stages[0]["mask_logits"].device.type, enabled=False):
            for s, stage in enumerate(stages):
                tubes = stage["mask_logits"].permute(0, 2, 1, 3, 4).flatten(2, 3)
                tall = {"mask_logits": tubes, "cls_logits": stage["cls_logits"]}
                if s < num_matched_stages:
                    name = f"clip_stages[{s}]"
                    assignments = self.match(tubes, stage["cls_logits"], targets, name)
                stage_losses = self.assigned_losses(tall, assignments, targets, f"tracker_s{s}_")
                weight = self.stage_loss_weights[s]
                losses.update({k: v * weight for k, v in stage_losses.items()})
        check_finite(("loss term", losses.items()))
        return losses

    def forward(
        self, outputs: dict, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: the kernel head's training output ("init" and one entry per stage).
            targets: one dict per image, see the class docstring.

        Raises:
            FloatingPointError: an output or a loss term is not finite (names it and the
                iteration), e.g. ``stages[1].cls_logits`` or ``s1_loss_dice``.
        """
        # fp32 whatever autocast produced (the official code forces fp32 in its losses); in
        # computation order, so that the first non-finite output is the one reported
        outputs = at_least_fp32({"init": outputs["init"], "stages": outputs["stages"]})
        check_finite(("output", named_tensors(outputs)))
        device_type = outputs["init"]["mask_logits"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            losses = self.initial_losses(outputs["init"], targets)
            prev_masks, prev_cls, prev_name = outputs["init"]["mask_logits"], None, "init"
            for s, stage in enumerate(outputs["stages"]):
                assignments = self.match(prev_masks, prev_cls, targets, prev_name)
                stage_losses = self.assigned_losses(stage, assignments, targets, f"s{s}_")
                weight = self.stage_loss_weights[s]
                losses.update({k: v * weight for k, v in stage_losses.items()})
                prev_masks, prev_cls = stage["mask_logits"], stage["cls_logits"]
                prev_name = f"stages[{s}]"
        check_finite(("loss term", losses.items()))
        return losses

    def __repr__(self) -> str:
        return (
            f"KNetCriterion(matcher={self.matcher!r}, num_classes={self.num_classes}, "
            f"num_thing_classes={self.num_thing_classes}, num_proposals={self.num_proposals}, "
            f"weight_dict={self.weight_dict}, "
            f"stage_loss_weights={self.stage_loss_weights}, "
            f"global_batch_losses={self.global_batch_losses}, "
            f"stage_rank_loss={self.stage_rank_loss}, semantic_loss={self.semantic_loss_type!r})"
        )
