"""K-Net for semantic segmentation (ZwwWayne/K-Net ``knet/seg``, in MMSeg's ``EncoderDecoder``)."""

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import nn

from ..auxiliary_head import build_auxiliary_head
from ..criterion import KNetSemanticCriterion
from ..kernel_head import KNetSemanticKernelHead
from ..postprocessing import semantic_probabilities
from .base import KNetBase


@META_ARCH_REGISTRY.register()
class SemanticKNet(KNetBase):
    """Semantic K-Net: one kernel per class (the decode head's classifier weights), softmax
    group features, cross-entropy losses on every stage, no matching; an optional auxiliary
    FCN head on a backbone feature adds its own cross-entropy in training.

    Training inputs: "sem_seg" (H, W) class ids, ``ignore_value`` for void. Output: "sem_seg"
    (K, H, W) softmax probabilities at the output size.
    """

    @configurable
    def __init__(
        self,
        *,
        kernel_head: KNetSemanticKernelHead,
        criterion: KNetSemanticCriterion,
        auxiliary_head: nn.Module | None = None,
        **kwargs,
    ):
        """
        Args:
            kernel_head: the semantic kernel head (its ``num_classes`` is the model's).
            criterion: the cross-entropy losses.
            auxiliary_head: trained on a backbone feature (None: no auxiliary loss).
            kwargs: see ``KNetBase``.
        """
        super().__init__(kernel_head=kernel_head, criterion=criterion, **kwargs)
        self.auxiliary_head = auxiliary_head

    @classmethod
    def from_config(cls, cfg) -> dict:
        k = cfg.MODEL.KNET
        if k.TEST.PANOPTIC_ON or k.TEST.INSTANCE_ON or not k.TEST.SEMANTIC_ON:
            raise ValueError(
                "Semantic K-Net only predicts sem_seg: set MODEL.KNET.TEST.SEMANTIC_ON True "
                "and MODEL.KNET.TEST.PANOPTIC_ON / INSTANCE_ON False"
            )
        ret = super().from_config(cfg)
        if not isinstance(ret["kernel_head"], KNetSemanticKernelHead):
            raise ValueError(
                f"SemanticKNet needs MODEL.KNET.KERNEL_HEAD_NAME 'KNetSemanticKernelHead', got "
                f"{k.KERNEL_HEAD_NAME!r} (instance/panoptic K-Net: MODEL.META_ARCHITECTURE 'KNet')"
            )
        ret["criterion"] = KNetSemanticCriterion(
            init_weight=k.SEG_WEIGHT,
            stage_loss_weights=k.STAGE_LOSS_WEIGHTS,
            aux_weight=k.AUX_HEAD.LOSS_WEIGHT,
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            avg_non_ignore=k.SEM_SEG_LOSS_AVG_NON_IGNORE,
            global_batch_losses=k.GLOBAL_BATCH_LOSSES,
        )
        ret["auxiliary_head"] = build_auxiliary_head(cfg, ret["backbone"].output_shape())
        return ret

    @property
    def num_classes(self) -> int:
        return self.kernel_head.num_classes

    def losses(self, outputs: dict, features, batched_inputs, images: ImageList):
        labels = self.prepare_targets(batched_inputs, images.tensor.shape[-2:])
        aux_logits = None if self.auxiliary_head is None else self.auxiliary_head(features)
        return self.criterion(outputs, labels, aux_logits)

    def prepare_targets(self, batched_inputs, padded_size) -> torch.Tensor:
        """(B, H, W) int64 labels of the padded batch; padding is ``ignore_value``."""
        ignore_value = self.criterion.ignore_value
        labels = torch.full(
            (len(batched_inputs), *padded_size), ignore_value, dtype=torch.int64, device=self.device
        )
        for i, x in enumerate(batched_inputs):
            if "sem_seg" not in x:
                raise KeyError(
                    f"Semantic K-Net needs 'sem_seg' in every training input (image "
                    f"{x.get('file_name', i)}); use INPUT.DATASET_MAPPER_NAME 'knet_semantic'"
                )
            sem_seg = x["sem_seg"].to(self.device)
            valid = sem_seg[sem_seg != ignore_value]
            if valid.numel() and (valid.min() < 0 or valid.max() >= self.num_classes):
                raise ValueError(
                    f"Label values of {x.get('file_name', f'input {i}')} must be in "
                    f"[0, {self.num_classes}) or {ignore_value} (ignore); found "
                    f"{sorted(valid.unique().tolist())[:10]} (MODEL.SEM_SEG_HEAD.NUM_CLASSES="
                    f"{self.num_classes})"
                )
            labels[i, : sem_seg.shape[0], : sem_seg.shape[1]] = sem_seg
        return labels

    def postprocess(self, predictions: dict[str, torch.Tensor], index: int, geometry):
        """{"sem_seg": (K, H, W) softmax probabilities} of the last stage's "seg_logits"
        (K, h, w) of image ``index``."""
        return {"sem_seg": semantic_probabilities(predictions["seg_logits"][index], geometry)}
