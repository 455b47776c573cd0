"""The K-Net meta-architecture."""

from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList
from torch import nn

from ..criterion import KNetCriterion
from ..kernel_head import build_kernel_head
from ..matcher import HungarianMatcher
from ..pixel_decoder import build_auxiliary_head, build_pixel_decoder
from ..postprocessing import (
    SelectedMasks,
    build_instances,
    instance_inference,
    panoptic_inference,
    select_instances,
    semantic_inference,
)
from ..semantic_criterion import KNetSemanticCriterion


@META_ARCH_REGISTRY.register()
class KNet(nn.Module):
    """K-Net: backbone -> pixel decoder -> iterative kernel head.

    Inputs follow Detectron2's contract: a list of dicts with "image" (C, H, W) in
    ``INPUT.FORMAT`` (uint8 or float, unnormalised), optional "height"/"width" (output size),
    and for training:
      * instance / panoptic K-Net (``kernel_head.is_semantic`` False, set losses with Hungarian
        matching): "instances" (gt_classes, gt_masks) plus, for panoptic, "sem_seg" (H, W)
        contiguous class ids with 255 = ignore, from which the stuff targets are made;
      * semantic K-Net (one kernel per class, cross-entropy losses, an optional auxiliary head
        on a backbone feature): "sem_seg" (H, W) class ids, ``ignore_value`` for void.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        kernel_head: nn.Module,
        criterion: Union[KNetCriterion, KNetSemanticCriterion],
        num_classes: int,
        num_thing_classes: int,
        num_proposals: int,
        size_divisibility: int,
        pixel_mean: List[float],
        pixel_std: List[float],
        panoptic_on: bool,
        instance_on: bool,
        semantic_on: bool,
        mask_threshold: float = 0.5,
        instance_score_thresh: float = 0.3,
        overlap_threshold: float = 0.6,
        score_thresh: float = 0.0,
        test_topk_per_image: int = 100,
        merge_chunk_size: int = 16,
        ignore_value: int = 255,
        auxiliary_head: Optional[nn.Module] = None,
    ):
        """
        Args:
            backbone, pixel_decoder, kernel_head: the three parts; the pixel decoder's
                ``forward_features`` output is passed to the kernel head as positional args.
            criterion: ``KNetCriterion`` (instance/panoptic) or ``KNetSemanticCriterion``.
            auxiliary_head: semantic K-Net only, trained on a backbone feature (None: no head).
            The other arguments are the ``MODEL.KNET`` keys of the same names.
        """
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.kernel_head = kernel_head
        self.criterion = criterion
        self.auxiliary_head = auxiliary_head
        self.is_semantic = bool(getattr(kernel_head, "is_semantic", False))
        if self.is_semantic and (panoptic_on or instance_on or not semantic_on):
            raise ValueError(
                "Semantic K-Net only predicts sem_seg: set MODEL.KNET.TEST.SEMANTIC_ON True and "
                "MODEL.KNET.TEST.PANOPTIC_ON / INSTANCE_ON False"
            )
        if auxiliary_head is not None and not self.is_semantic:
            raise ValueError("an auxiliary head is only supported by semantic K-Net")
        self.num_classes = num_classes
        self.num_thing_classes = num_thing_classes
        self.num_proposals = num_proposals
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if panoptic_on and num_classes == num_thing_classes and not self.is_semantic:
            raise ValueError(
                "panoptic output needs stuff classes (NUM_CLASSES > NUM_THING_CLASSES)"
            )
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.semantic_on = semantic_on
        self.mask_threshold = mask_threshold
        self.instance_score_thresh = instance_score_thresh
        self.overlap_threshold = overlap_threshold
        self.score_thresh = score_thresh
        self.test_topk_per_image = test_topk_per_image
        self.merge_chunk_size = merge_chunk_size
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg):
        k = cfg.MODEL.KNET
        backbone = build_backbone(cfg)
        pixel_decoder = build_pixel_decoder(cfg, backbone.output_shape())
        kernel_head = build_kernel_head(cfg)
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        if len(k.STAGE_LOSS_WEIGHTS) != k.NUM_STAGES:
            raise ValueError(
                f"MODEL.KNET.STAGE_LOSS_WEIGHTS has {len(k.STAGE_LOSS_WEIGHTS)} entries, "
                f"MODEL.KNET.NUM_STAGES is {k.NUM_STAGES}"
            )
        auxiliary_head = None
        if getattr(kernel_head, "is_semantic", False):
            criterion = KNetSemanticCriterion(
                init_weight=k.SEG_WEIGHT,
                stage_loss_weights=k.STAGE_LOSS_WEIGHTS,
                aux_weight=k.AUX_HEAD.LOSS_WEIGHT,
                ignore_value=ignore_value,
                avg_non_ignore=k.SEM_SEG_LOSS_AVG_NON_IGNORE,
            )
            auxiliary_head = build_auxiliary_head(cfg, backbone.output_shape())
        else:
            if not 0 < k.NUM_THING_CLASSES <= num_classes:
                raise ValueError(
                    f"MODEL.KNET.NUM_THING_CLASSES={k.NUM_THING_CLASSES} must be in "
                    f"[1, MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes}]"
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
            )
            criterion = KNetCriterion(
                matcher=matcher,
                num_classes=num_classes,
                num_thing_classes=k.NUM_THING_CLASSES,
                num_proposals=k.NUM_PROPOSALS,
                class_weight=k.CLASS_WEIGHT,
                mask_weight=k.MASK_WEIGHT,
                dice_weight=k.DICE_WEIGHT,
                rank_weight=k.RANK_WEIGHT,
                seg_weight=k.SEG_WEIGHT,
                focal_alpha=k.FOCAL_ALPHA,
                focal_gamma=k.FOCAL_GAMMA,
                stage_loss_weights=k.STAGE_LOSS_WEIGHTS,
                ignore_value=ignore_value,
            )
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "kernel_head": kernel_head,
            "criterion": criterion,
            "auxiliary_head": auxiliary_head,
            "num_classes": num_classes,
            "num_thing_classes": k.NUM_THING_CLASSES,
            "num_proposals": k.NUM_PROPOSALS,
            "size_divisibility": k.SIZE_DIVISIBILITY,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "panoptic_on": k.TEST.PANOPTIC_ON,
            "instance_on": k.TEST.INSTANCE_ON,
            "semantic_on": k.TEST.SEMANTIC_ON,
            "mask_threshold": k.TEST.MASK_THRESHOLD,
            "instance_score_thresh": k.TEST.INSTANCE_SCORE_THRESH,
            "overlap_threshold": k.TEST.OVERLAP_THRESHOLD,
            "score_thresh": k.TEST.SCORE_THRESH,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "merge_chunk_size": k.TEST.MERGE_CHUNK_SIZE,
            "ignore_value": ignore_value,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        """Training: dict of weighted losses. Inference: one dict per image with
        "panoptic_seg", "instances" and/or "sem_seg" (see ``MODEL.KNET.TEST``)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        outputs = self.kernel_head(*self.pixel_decoder.forward_features(features))
        padded_size = images.tensor.shape[-2:]
        if self.is_semantic:
            if self.training:
                labels = self.prepare_semantic_targets(batched_inputs, padded_size)
                aux_logits = None
                if self.auxiliary_head is not None:
                    aux_logits = self.auxiliary_head(features)
                return self.criterion(outputs, labels, aux_logits)
            return self.semantic_logits_inference(
                outputs["stages"][-1]["seg_logits"], batched_inputs, images
            )
        if self.training:
            mask_size = outputs["init"]["mask_logits"].shape[-2:]
            targets = self.prepare_targets(batched_inputs, padded_size, mask_size)
            return self.criterion(outputs, targets)
        return self.inference(outputs["stages"][-1], batched_inputs, images)

    def prepare_semantic_targets(self, batched_inputs, padded_size) -> torch.Tensor:
        """(B, H, W) int64 labels of the padded batch; padding is ``ignore_value``."""
        labels = torch.full(
            (len(batched_inputs), *padded_size),
            self.ignore_value,
            dtype=torch.int64,
            device=self.device,
        )
        for i, x in enumerate(batched_inputs):
            if "sem_seg" not in x:
                raise KeyError(
                    f"Semantic K-Net needs 'sem_seg' in every training input (image "
                    f"{x.get('file_name', i)}); use INPUT.DATASET_MAPPER_NAME 'knet_semantic'"
                )
            sem_seg = x["sem_seg"].to(self.device)
            valid = sem_seg[sem_seg != self.ignore_value]
            if valid.numel() and (valid.min() < 0 or valid.max() >= self.num_classes):
                raise ValueError(
                    f"Label values of {x.get('file_name', f'input {i}')} must be in "
                    f"[0, {self.num_classes}) or {self.ignore_value} (ignore); found "
                    f"{sorted(valid.unique().tolist())[:10]} (MODEL.SEM_SEG_HEAD.NUM_CLASSES="
                    f"{self.num_classes})"
                )
            labels[i, : sem_seg.shape[0], : sem_seg.shape[1]] = sem_seg
        return labels

    def semantic_logits_inference(
        self, seg_logits: torch.Tensor, batched_inputs, images: ImageList
    ) -> List[Dict[str, torch.Tensor]]:
        """(B, K, h, w) logits -> per image {"sem_seg": (K, H, W) softmax probabilities} at the
        output size: bilinear to the padded input, crop, bilinear to the output size."""
        padded_size = tuple(images.tensor.shape[-2:])
        results = []
        for i, x in enumerate(batched_inputs):
            image_size = images.image_sizes[i]
            logits = F.interpolate(
                seg_logits[i : i + 1].float(),
                size=padded_size,
                mode="bilinear",
                align_corners=False,
            )[0]
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            logits = sem_seg_postprocess(logits, image_size, height, width)
            results.append({"sem_seg": logits.softmax(dim=0)})
        return results

    def prepare_targets(
        self, batched_inputs, padded_size, mask_size
    ) -> List[Dict[str, torch.Tensor]]:
        """Per image: soft thing and stuff masks at ``mask_size`` (the padded image / 4).

        Binary masks are zero-padded to the padded batch size, then bilinearly downsampled;
        the resulting soft values are the targets (as in the official code)."""
        targets = []
        for x in batched_inputs:
            instances = x["instances"].to(self.device)
            gt_masks = instances.gt_masks
            if isinstance(gt_masks, BitMasks):
                gt_masks = gt_masks.tensor
            labels = instances.gt_classes.to(torch.int64)
            stuff_labels = torch.zeros(0, dtype=torch.int64, device=self.device)
            stuff_masks = gt_masks.new_zeros((0,) + tuple(gt_masks.shape[-2:]))
            if self.num_classes > self.num_thing_classes and "sem_seg" in x:
                sem_seg = x["sem_seg"].to(self.device)
                present = sem_seg.unique()
                stuff_labels = present[
                    (present >= self.num_thing_classes)
                    & (present < self.num_classes)
                    & (present != self.ignore_value)
                ]
                stuff_masks = sem_seg[None] == stuff_labels[:, None, None]
            targets.append(
                {
                    "labels": labels,
                    "masks": self._downsample_masks(gt_masks, padded_size, mask_size),
                    "stuff_labels": stuff_labels,
                    "stuff_masks": self._downsample_masks(stuff_masks, padded_size, mask_size),
                }
            )
        return targets

    @staticmethod
    def _downsample_masks(masks: torch.Tensor, padded_size, mask_size) -> torch.Tensor:
        """(M, H, W) binary -> (M, h, w) float: zero-pad to ``padded_size``, bilinear resize."""
        masks = masks.float()
        h, w = masks.shape[-2:]
        masks = F.pad(masks, (0, padded_size[1] - w, 0, padded_size[0] - h))
        if masks.shape[0] == 0:
            return masks.new_zeros((0,) + tuple(mask_size))
        return F.interpolate(
            masks[None], size=tuple(mask_size), mode="bilinear", align_corners=False
        )[0]

    def inference(self, last_stage: Dict[str, torch.Tensor], batched_inputs, images: ImageList):
        padded_size = tuple(images.tensor.shape[-2:])
        results = []
        for i, x in enumerate(batched_inputs):
            image_size = images.image_sizes[i]
            output_size = (x.get("height", image_size[0]), x.get("width", image_size[1]))
            cls_logits = last_stage["cls_logits"][i]
            mask_logits = last_stage["mask_logits"][i]
            sizes = {
                "padded_size": padded_size,
                "image_size": image_size,
                "output_size": output_size,
            }
            common = {
                "num_thing_classes": self.num_thing_classes,
                "num_proposals": self.num_proposals,
            }
            result = {}
            if self.panoptic_on:
                shared_masks = None
                if self.instance_on:
                    # The instance masks come from the same full-resolution maps as the merge.
                    selected = select_instances(
                        cls_logits,
                        topk=self.test_topk_per_image,
                        score_thresh=self.score_thresh,
                        **common,
                    )
                    shared_masks = SelectedMasks(selected[2], self.mask_threshold, output_size)
                result["panoptic_seg"] = panoptic_inference(
                    cls_logits,
                    mask_logits,
                    instance_score_thresh=self.instance_score_thresh,
                    overlap_threshold=self.overlap_threshold,
                    mask_threshold=self.mask_threshold,
                    chunk_size=self.merge_chunk_size,
                    on_chunk=shared_masks,
                    **common,
                    **sizes,
                )
                if shared_masks is not None:
                    result["instances"] = build_instances(
                        output_size, selected[0], selected[1], shared_masks.masks
                    )
            elif self.instance_on:
                result["instances"] = instance_inference(
                    cls_logits,
                    mask_logits,
                    topk=self.test_topk_per_image,
                    score_thresh=self.score_thresh,
                    mask_threshold=self.mask_threshold,
                    **common,
                    **sizes,
                )
            if self.semantic_on:
                result["sem_seg"] = semantic_inference(cls_logits, mask_logits, **common, **sizes)
            results.append(result)
        return results
