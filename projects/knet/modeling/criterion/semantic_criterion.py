"""Losses of semantic K-Net: cross-entropy on the initial and every stage's logits
(ZwwWayne/K-Net ``knet/seg/iter_decode_head.py`` on MMSeg's ``BaseDecodeHead.losses``)."""

from collections.abc import Sequence

import torch
from detectron2.utils import comm
from torch import nn

from .losses import semantic_cross_entropy
from .numerics import at_least_fp32, check_finite, named_tensors
from .set_criterion import global_avg_factor


class KNetSemanticCriterion(nn.Module):
    """Weighted softmax cross-entropy terms (MMSeg's ``loss_ce.s0`` ... ``loss_ce.s3`` and the
    auxiliary head's ``aux.loss_ce``), each on logits resized to the label size.

    Keys: ``loss_init_ce`` (decode head logits, ``init_weight``), ``s{i}_loss_ce`` (update stage
    i, ``stage_loss_weights[i]``) and ``loss_aux_ce`` (``aux_weight``, when aux logits are given).

    Numerics as ``KNetCriterion``: fp32 losses with autocast off, and ``FloatingPointError``
    naming the iteration and the first non-finite output or loss term.
    """

    def __init__(
        self,
        *,
        init_weight: float = 1.0,
        stage_loss_weights: Sequence[float] = (1.0, 1.0, 1.0),
        aux_weight: float = 0.4,
        ignore_value: int = 255,
        avg_non_ignore: bool = False,
        global_batch_losses: bool = False,
    ):
        """
        Args:
            init_weight, stage_loss_weights, aux_weight: the weights of the terms.
            ignore_value: the void label.
            avg_non_ignore: divide by the non-ignored pixels instead of all pixels.
            global_batch_losses: in several processes, with ``avg_non_ignore``, divide by the
                global count of non-ignored pixels (``global_avg_factor``) instead of each
                process's. The mean over all pixels needs no such change: every process holds
                as many pixels (an equal share of images padded to one size).
        """
        super().__init__()
        self.init_weight = init_weight
        self.stage_loss_weights = list(stage_loss_weights)
        self.aux_weight = aux_weight
        self.ignore_value = ignore_value
        self.avg_non_ignore = avg_non_ignore
        self.global_batch_losses = global_batch_losses

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        use_global = self.global_batch_losses and comm.get_world_size() > 1
        normalizer = global_avg_factor if use_global else None
        return semantic_cross_entropy(
            logits, labels, self.ignore_value, self.avg_non_ignore, normalizer
        )

    def forward(
        self, outputs: dict, labels: torch.Tensor, aux_logits: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: the semantic kernel head's training output: "init" {"seg_logits"} and one
                {"seg_logits": (B, K, h, w)} per stage.
            labels: (B, H, W) int64 class ids, ``ignore_value`` for void and padding.
            aux_logits: (B, K, h', w') logits of the auxiliary head, or None.

        Raises:
            FloatingPointError: an output (e.g. ``stages[2].seg_logits``) or a loss term is
                not finite; the message names it and the iteration.
        """
        stages = outputs["stages"]
        if len(stages) != len(self.stage_loss_weights):
            raise ValueError(
                f"{len(stages)} stage outputs but {len(self.stage_loss_weights)} stage loss weights"
            )
        # fp32 whatever autocast produced, in computation order (see KNetCriterion.forward)
        outputs = at_least_fp32(
            {"init": outputs["init"], "stages": stages, "aux_logits": aux_logits}
        )
        with torch.autocast(device_type=labels.device.type, enabled=False):
            losses = {
                "loss_init_ce": self.init_weight
                * self.cross_entropy(outputs["init"]["seg_logits"], labels)
            }
            for s, (stage, weight) in enumerate(zip(outputs["stages"], self.stage_loss_weights)):
                losses[f"s{s}_loss_ce"] = weight * self.cross_entropy(stage["seg_logits"], labels)
            if aux_logits is not None:
                losses["loss_aux_ce"] = self.aux_weight * self.cross_entropy(
                    outputs["aux_logits"], labels
                )
        # no matching here, so outputs and losses are checked together: one host sync
        check_finite(("output", named_tensors(outputs)), ("loss term", losses.items()))
        return losses

    def extra_repr(self) -> str:
        return (
            f"init_weight={self.init_weight}, stage_loss_weights={self.stage_loss_weights}, "
            f"aux_weight={self.aux_weight}, ignore_value={self.ignore_value}, "
            f"avg_non_ignore={self.avg_non_ignore}, global_batch_losses={self.global_batch_losses}"
        )
