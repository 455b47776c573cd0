"""The K-Net meta-architecture."""

import math
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import BitMasks, ImageList
from torch import nn

from ..criterion import KNetCriterion
from ..kernel_head import build_kernel_head
from ..matcher import HungarianMatcher
from ..pixel_decoder import build_auxiliary_head, build_pixel_decoder
from ..postprocessing import (
    KNetPostProcessor,
    OutputGeometry,
    detectron2_outputs,
    semantic_probabilities,
)
from ..semantic_criterion import KNetSemanticCriterion


def checked_image(inputs: Dict, index: int, pixel_mean: torch.Tensor) -> torch.Tensor:
    """``inputs["image"]`` after checks, as (3, H, W); a (1, H, W) grayscale image is broadcast.

    The model takes unnormalised pixels of the range its ``PIXEL_MEAN`` is in (0-255 for every
    shipped config); the commonest mistakes (channels last, RGBA, an empty image, NaNs, a float
    image in [0, 1], an already normalised image) are reported instead of giving a silently
    empty or wrong result. Skipped while tracing (the checks read values).
    """
    image = inputs.get("image") if isinstance(inputs, dict) else None
    name = f"input {index}" + (f" ({inputs['file_name']})" if "file_name" in inputs else "")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name}: 'image' must be a (3, H, W) tensor, got {type(image).__name__}")
    if torch.jit.is_tracing():
        return image
    top = 255 if float(pixel_mean.max()) > 1 else 1
    expected = f"expected a (3, H, W) tensor of 0-{top} pixel values in the config's INPUT.FORMAT"
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        hint = ""
        if image.dim() == 3 and image.shape[-1] in (1, 3, 4):
            hint = " (an (H, W, C) array? use image.permute(2, 0, 1))"
        if image.dim() == 3 and image.shape[0] == 4:
            hint = " (RGBA? drop the alpha channel, e.g. cv2.cvtColor(img, cv2.COLOR_BGRA2BGR))"
        raise ValueError(f"{name}: got an image of shape {tuple(image.shape)}; {expected}{hint}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{name}: the image is empty ({tuple(image.shape)}); {expected}")
    if image.dtype == torch.bool or image.is_complex():
        raise ValueError(f"{name}: got a {image.dtype} image; {expected}")
    if image.is_floating_point():
        low, high = (float(v) for v in torch.aminmax(image))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name}: the image has NaN or infinite values; {expected}")
        if low < 0 or high > top * 1.001:
            raise ValueError(
                f"{name}: pixel values range over [{low:.3g}, {high:.3g}]; {expected} (an image "
                "normalised already, or of another bit depth?)"
            )
        if top == 255 and 0 < high <= 1:
            raise ValueError(
                f"{name}: pixel values range over [{low:.3g}, {high:.3g}]; {expected}: multiply "
                "an image in [0, 1] by 255"
            )
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def inference_amp_dtype(cfg) -> Optional[torch.dtype]:
    """``MODEL.KNET.TEST.AMP_DTYPE``: "" (float32), "float16", "bfloat16" or "auto" (float16 on
    CUDA, bfloat16 on the CPU)."""
    name = cfg.MODEL.KNET.TEST.AMP_DTYPE
    if name == "auto":
        name = "float16" if cfg.MODEL.DEVICE.startswith("cuda") else "bfloat16"
    if name not in ("", "float16", "bfloat16"):
        raise ValueError(
            f"MODEL.KNET.TEST.AMP_DTYPE must be '', 'auto', 'float16' or 'bfloat16', got {name!r}"
        )
    return getattr(torch, name) if name else None


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
        channels_last: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
        pixel_mean: List[float],
        pixel_std: List[float],
        postprocessor: Optional[KNetPostProcessor] = None,
        ignore_value: int = 255,
        auxiliary_head: Optional[nn.Module] = None,
    ):
        """
        Args:
            backbone, pixel_decoder, kernel_head: the three parts; the pixel decoder's
                ``forward_features`` output is passed to the kernel head as positional args.
            criterion: ``KNetCriterion`` (instance/panoptic) or ``KNetSemanticCriterion``.
            postprocessor: the outputs of instance/panoptic K-Net (None for semantic K-Net,
                which returns "sem_seg" probabilities).
            auxiliary_head: semantic K-Net only, trained on a backbone feature (None: no head).
            The other arguments are the ``MODEL.KNET`` keys of the same names.
        """
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.kernel_head = kernel_head
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.auxiliary_head = auxiliary_head
        self.is_semantic = bool(getattr(kernel_head, "is_semantic", False))
        if self.is_semantic != (postprocessor is None):
            raise ValueError(
                "instance/panoptic K-Net needs a postprocessor; semantic K-Net takes none"
            )
        if auxiliary_head is not None and not self.is_semantic:
            raise ValueError("an auxiliary head is only supported by semantic K-Net")
        self.num_classes = num_classes
        self.num_thing_classes = num_thing_classes
        self.num_proposals = num_proposals
        self.size_divisibility = size_divisibility
        self.channels_last = channels_last
        self.amp_dtype = amp_dtype
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if postprocessor is not None and postprocessor.panoptic_on:
            if num_classes == num_thing_classes:
                raise ValueError(
                    "panoptic output needs stuff classes (NUM_CLASSES > NUM_THING_CLASSES)"
                )
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
        is_semantic = getattr(kernel_head, "is_semantic", False)
        if is_semantic:
            if k.TEST.PANOPTIC_ON or k.TEST.INSTANCE_ON or not k.TEST.SEMANTIC_ON:
                raise ValueError(
                    "Semantic K-Net only predicts sem_seg: set MODEL.KNET.TEST.SEMANTIC_ON True "
                    "and MODEL.KNET.TEST.PANOPTIC_ON / INSTANCE_ON False"
                )
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
            "channels_last": k.CHANNELS_LAST,
            "amp_dtype": inference_amp_dtype(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "postprocessor": None if is_semantic else KNetPostProcessor(cfg),
            "ignore_value": ignore_value,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Checked, normalised images padded to a batch (bottom/right, to a multiple of
        ``size_divisibility``), channels-last when ``channels_last``."""
        images = [
            (checked_image(x, i, self.pixel_mean).to(self.device) - self.pixel_mean)
            / self.pixel_std
            for i, x in enumerate(batched_inputs)
        ]
        images = ImageList.from_tensors(images, self.size_divisibility)
        if self.channels_last:
            images.tensor = images.tensor.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, batched_inputs: List[Dict]):
        """Training: dict of weighted losses. Inference: one dict per image with
        "panoptic_seg", "instances" and/or "sem_seg" (see ``MODEL.KNET.TEST``)."""
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            return self.inference(self.predict(images.tensor), batched_inputs, images)
        features = self.backbone(images.tensor)
        outputs = self.kernel_head(*self.pixel_decoder(features))
        padded_size = images.tensor.shape[-2:]
        if self.is_semantic:
            labels = self.prepare_semantic_targets(batched_inputs, padded_size)
            aux_logits = None
            if self.auxiliary_head is not None:
                aux_logits = self.auxiliary_head(features)
            return self.criterion(outputs, labels, aux_logits)
        mask_size = outputs["init"]["mask_logits"].shape[-2:]
        targets = self.prepare_targets(batched_inputs, padded_size, mask_size)
        return self.criterion(outputs, targets)

    def predict(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The network in eval mode: (B, 3, H, W) normalised, padded images -> the last stage's
        float32 predictions, "cls_logits" (B, N, K) and "mask_logits" (B, N, H/4, W/4) of
        instance/panoptic K-Net, or "seg_logits" (B, K, h, w) of semantic K-Net.

        With ``amp_dtype`` the network runs under autocast in that dtype (post-processing is
        always float32)."""
        with torch.autocast(
            images.device.type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype)
        ):
            features = self.backbone(images)
            outputs = self.kernel_head(*self.pixel_decoder(features))
        return {k: v.float() for k, v in outputs["stages"][-1].items() if v is not None}

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

    @staticmethod
    def output_geometries(batched_inputs, images: ImageList) -> List[OutputGeometry]:
        """Per image: the padded input size, its size inside it, and the requested output size
        ("height"/"width" of the input dict, default the image size)."""
        padded_size = tuple(images.tensor.shape[-2:])
        geometries = []
        for x, image_size in zip(batched_inputs, images.image_sizes):
            output_size = (x.get("height", image_size[0]), x.get("width", image_size[1]))
            same = tuple(output_size) == tuple(image_size)
            geometries.append(
                OutputGeometry(padded_size, image_size, None if same else output_size)
            )
        return geometries

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

    def inference(self, predictions: Dict[str, torch.Tensor], batched_inputs, images: ImageList):
        """Per image, Detectron2's outputs at its output size from ``predict``'s predictions:
        ``KNetPostProcessor``'s, or semantic K-Net's "sem_seg" softmax probabilities."""
        results = []
        for i, geometry in enumerate(self.output_geometries(batched_inputs, images)):
            if self.is_semantic:
                results.append(
                    {"sem_seg": semantic_probabilities(predictions["seg_logits"][i], geometry)}
                )
                continue
            outputs = self.postprocessor(
                predictions["cls_logits"][i], predictions["mask_logits"][i], geometry
            )
            results.append(detectron2_outputs(outputs))
        return results
