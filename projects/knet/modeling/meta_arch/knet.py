"""K-Net for instance and panoptic segmentation (``KNet``, ZwwWayne/K-Net ``knet/det/knet.py``)."""

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import BitMasks, ImageList

from ..criterion import HungarianMatcher, KNetCriterion
from ..kernel_head import KNetSemanticKernelHead
from ..layers import resize
from ..postprocessing import KNetPostProcessor
from .base import KNetBase


@META_ARCH_REGISTRY.register()
class KNet(KNetBase):
    """K-Net for instance / panoptic segmentation: thing kernels (and one kernel per stuff
    class), set losses with Hungarian matching, no boxes, no NMS.

    Training inputs: "instances" (gt_classes, gt_masks) plus, for panoptic, "sem_seg" (H, W)
    contiguous class ids with 255 = ignore, from which the stuff targets are made. Outputs:
    "panoptic_seg", "instances" and/or "sem_seg" (see ``MODEL.KNET.TEST``). The class counts
    are the criterion's (built from the kernel head's).
    """

    @configurable
    def __init__(self, *, criterion: KNetCriterion, postprocessor: KNetPostProcessor, **kwargs):
        """
        Args:
            criterion: the set losses with Hungarian matching.
            postprocessor: the panoptic / instance / semantic outputs.
            kwargs: see ``KNetBase``.
        """
        super().__init__(criterion=criterion, **kwargs)
        self.postprocessor = postprocessor
        if postprocessor.panoptic_on and not criterion.has_stuff_kernels:
            raise ValueError(
                "panoptic output needs stuff classes (NUM_CLASSES > NUM_THING_CLASSES)"
            )

    @classmethod
    def from_config(cls, cfg) -> dict:
        k = cfg.MODEL.KNET
        ret = super().from_config(cfg)
        head = ret["kernel_head"]
        if isinstance(head, KNetSemanticKernelHead):
            raise ValueError(
                "MODEL.KNET.KERNEL_HEAD_NAME 'KNetSemanticKernelHead' is semantic K-Net's head: "
                "set MODEL.META_ARCHITECTURE 'SemanticKNet'"
            )
        if k.AUX_HEAD.LOSS_WEIGHT:
            raise ValueError(
                "MODEL.KNET.AUX_HEAD.LOSS_WEIGHT must be 0 for instance/panoptic K-Net "
                "(the auxiliary head belongs to semantic K-Net)"
            )
        matcher = HungarianMatcher(
            cost_class=k.COST_CLASS,
            cost_mask=k.COST_MASK,
            cost_dice=k.COST_DICE,
            focal_alpha=k.FOCAL_ALPHA,
            focal_gamma=k.FOCAL_GAMMA,
            dice_min_prob=k.MATCHER_MIN_PROBS[0],
            mask_min_prob=k.MATCHER_MIN_PROBS[1],
        )
        initial = head.initial_head
        ret["criterion"] = KNetCriterion(
            matcher=matcher,
            num_classes=initial.num_classes,
            num_thing_classes=initial.num_thing_classes,
            num_proposals=initial.num_proposals,
            weight_dict={
                "cls": k.CLASS_WEIGHT,
                "mask": k.MASK_WEIGHT,
                "dice": k.DICE_WEIGHT,
                "rank": k.RANK_WEIGHT,
                "seg": k.SEG_WEIGHT,
            },
            focal_alpha=k.FOCAL_ALPHA,
            focal_gamma=k.FOCAL_GAMMA,
            stage_loss_weights=k.STAGE_LOSS_WEIGHTS,
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            global_batch_losses=k.GLOBAL_BATCH_LOSSES,
            stage_rank_loss=k.STAGE_RANK_LOSS,
            semantic_loss=k.SEG_LOSS_TYPE,
        )
        ret["postprocessor"] = KNetPostProcessor(cfg, num_thing_classes=initial.num_thing_classes)
        return ret

    def losses(self, outputs: dict, features, batched_inputs, images: ImageList):
        mask_size = outputs["init"]["mask_logits"].shape[-2:]
        targets = self.prepare_targets(batched_inputs, images.tensor.shape[-2:], mask_size)
        return self.criterion(outputs, targets)

    def prepare_targets(
        self, batched_inputs, padded_size, mask_size
    ) -> list[dict[str, torch.Tensor]]:
        """Per image: soft thing and stuff masks at ``mask_size`` (the padded image / 4).

        Binary masks are zero-padded to the padded batch size, then bilinearly downsampled;
        the resulting soft values are the targets (as in the official code)."""
        c = self.criterion
        targets = []
        for x in batched_inputs:
            instances = x["instances"].to(self.device)
            gt_masks = instances.gt_masks
            if isinstance(gt_masks, BitMasks):
                gt_masks = gt_masks.tensor
            labels = instances.gt_classes.to(torch.int64)
            stuff_labels = torch.zeros(0, dtype=torch.int64, device=self.device)
            stuff_masks = gt_masks.new_zeros((0,) + tuple(gt_masks.shape[-2:]))
            if c.has_stuff_kernels and "sem_seg" in x:
                sem_seg = x["sem_seg"].to(self.device)
                present = sem_seg.unique()
                stuff = (present >= c.num_thing_classes) & (present < c.num_classes)
                stuff_labels = present[stuff & (present != c.ignore_value)]
                stuff_masks = sem_seg[None] == stuff_labels[:, None, None]
            target = {
                "labels": labels,
                "masks": downsample_masks(gt_masks, padded_size, mask_size),
                "stuff_labels": stuff_labels,
                "stuff_masks": downsample_masks(stuff_masks, padded_size, mask_size),
            }
            if instances.has("gt_ids"):  # video: the object each mask shows, across frames
                target["ids"] = instances.gt_ids.to(torch.int64)
            targets.append(target)
        return targets

    def postprocess(self, predictions: dict[str, torch.Tensor], index: int, geometry):
        """``KNetPostProcessor``'s outputs of the last stage's "cls_logits" (N, K) and
        "mask_logits" (N, H/4, W/4) of image ``index``."""
        return self.postprocessor(
            predictions["cls_logits"][index], predictions["mask_logits"][index], geometry
        )


def downsample_masks(masks: torch.Tensor, padded_size, mask_size) -> torch.Tensor:
    """(M, H, W) binary -> (M, h, w) float: zero-pad to ``padded_size``, bilinear resize."""
    masks = masks.float()
    h, w = masks.shape[-2:]
    masks = F.pad(masks, (0, padded_size[1] - w, 0, padded_size[0] - h))
    if masks.shape[0] == 0:
        return masks.new_zeros((0,) + tuple(mask_size))
    return resize(masks[None], mask_size)[0]
