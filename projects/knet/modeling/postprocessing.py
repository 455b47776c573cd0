"""Inference-time post-processing of K-Net: instance, panoptic and semantic outputs."""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Instances

from .panoptic_merge import SelectedMasks, kernel_owner_and_areas, mask_probs_at_image_size

__all__ = [
    "SelectedMasks",
    "build_instances",
    "instance_inference",
    "kernel_scores_and_labels",
    "mask_probs_at_image_size",
    "panoptic_inference",
    "select_instances",
    "semantic_inference",
]


def select_instances(
    cls_logits: torch.Tensor,
    *,
    num_thing_classes: int,
    num_proposals: int,
    topk: int,
    score_thresh: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (kernel, thing class) pairs over the thing kernels; score = class probability.

    Returns:
        scores (M,) sorted descending, labels (M,), kernels (M,): the kernel of each pair (a
        kernel may appear with several classes).
    """
    scores = cls_logits[:num_proposals, :num_thing_classes].float().sigmoid().flatten()
    scores, flat_idx = scores.topk(min(topk, scores.numel()))
    keep = scores >= score_thresh
    scores, flat_idx = scores[keep], flat_idx[keep]
    labels = flat_idx % num_thing_classes
    kernels = torch.div(flat_idx, num_thing_classes, rounding_mode="floor")
    return scores, labels, kernels


def build_instances(
    output_size: Tuple[int, int], scores: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
) -> Instances:
    """Instances with pred_masks (bool), pred_boxes (the masks' extents), scores, pred_classes."""
    result = Instances(output_size)
    result.pred_masks = masks
    result.pred_boxes = BitMasks(masks).get_bounding_boxes()
    result.scores = scores
    result.pred_classes = labels
    return result


def instance_inference(
    cls_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    num_thing_classes: int,
    num_proposals: int,
    topk: int,
    score_thresh: float,
    mask_threshold: float,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
) -> Instances:
    """The official instance output: top-k (kernel, thing class) pairs, binary masks at
    ``prob > mask_threshold``, no mask rescoring.

    Args:
        cls_logits: (N, K); mask_logits: (N, h, w) of one image (N >= num_proposals).

    Returns:
        Instances of ``output_size``, sorted by score.
    """
    scores, labels, kernels = select_instances(
        cls_logits,
        num_thing_classes=num_thing_classes,
        num_proposals=num_proposals,
        topk=topk,
        score_thresh=score_thresh,
    )
    # A kernel may be kept with several classes: resize each distinct mask once.
    unique_kernels, inverse = kernels.unique(return_inverse=True)
    probs = mask_probs_at_image_size(
        mask_logits[unique_kernels], padded_size, image_size, output_size
    )
    return build_instances(output_size, scores, labels, probs[inverse] > mask_threshold)


def kernel_scores_and_labels(
    cls_logits: torch.Tensor, num_thing_classes: int, num_proposals: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, K) logits -> per-kernel (score, label): thing kernels take their best thing class,
    stuff kernel i is scored on its own class num_thing_classes + i."""
    probs = cls_logits.float().sigmoid()
    thing_scores, thing_labels = probs[:num_proposals, :num_thing_classes].max(dim=1)
    stuff_scores = probs[num_proposals:, num_thing_classes:].diagonal()
    stuff_labels = torch.arange(stuff_scores.numel(), device=probs.device) + num_thing_classes
    return torch.cat([thing_scores, stuff_scores]), torch.cat([thing_labels, stuff_labels])


def panoptic_inference(
    cls_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    num_thing_classes: int,
    num_proposals: int,
    instance_score_thresh: float,
    overlap_threshold: float,
    mask_threshold: float,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    chunk_size: int = 16,
    on_chunk: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> Tuple[torch.Tensor, List[Dict]]:
    """The official thing/stuff merge, computed exactly at the output resolution.

    Every pixel goes to the kernel maximising ``score_k * prob_k`` (the first one on ties).
    Kernels are visited by descending score; a thing below ``instance_score_thresh`` is dropped
    (stuff never is), and a kernel is kept only when its won area is at least
    ``overlap_threshold`` of its own ``prob >= mask_threshold`` area. Pixels of dropped kernels
    are void (0).

    On the CPU the probability maps are only evaluated where needed: per output tile, bounds
    from the low-res maps rule out the kernels that cannot win there and decide the threshold
    tests of most tiles, and the remaining tiles are resized with the same floating-point
    operations as ``F.interpolate``, so the result is bit-identical to the full computation.
    Otherwise (other devices, an arbitrary ``on_chunk``, sizes where ``F.interpolate`` uses
    another kernel) the full maps are produced ``chunk_size`` kernels at a time and reduced on
    the fly. ``on_chunk(start, probs)`` is then called with each chunk's (c, H_out, W_out)
    probabilities of kernels ``start..start+c-1``; a ``SelectedMasks`` gets its masks either way.

    Returns:
        panoptic_seg: (H_out, W_out) int32 segment ids (0 = void),
        segments_info: list of {"id", "category_id", "isthing", "score", "area"}.
    """
    scores, labels = kernel_scores_and_labels(cls_logits, num_thing_classes, num_proposals)
    n = scores.numel()
    # only these kernels can be kept (the visit below skips the others before their area)
    keepable = (labels >= num_thing_classes) | ~(scores < instance_score_thresh)
    owner, won_area, own_area = kernel_owner_and_areas(
        scores,
        mask_logits,
        keepable,
        mask_threshold,
        padded_size,
        image_size,
        output_size,
        chunk_size,
        on_chunk,
    )

    segment_of_kernel = torch.zeros(n, dtype=torch.int32, device=owner.device)
    segments_info = []
    for k in torch.sort(scores, descending=True, stable=True).indices.tolist():
        label = int(labels[k])
        isthing = label < num_thing_classes
        if isthing and scores[k] < instance_score_thresh:
            continue
        won, own = int(won_area[k]), int(own_area[k])
        if won == 0 or own == 0 or won / own < overlap_threshold:
            continue
        segment_id = len(segments_info) + 1
        segment_of_kernel[k] = segment_id
        segments_info.append(
            {
                "id": segment_id,
                "category_id": label,
                "isthing": isthing,
                "score": float(scores[k]),
                "area": won,
            }
        )
    return segment_of_kernel[owner], segments_info


def semantic_inference(
    cls_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    num_thing_classes: int,
    num_proposals: int,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
) -> torch.Tensor:
    """(K, H_out, W_out) class scores: sum over kernels of class score x mask probability,
    with each kernel counted only for the classes it is trained on."""
    probs = cls_logits.float().sigmoid()
    weights = torch.zeros_like(probs)
    weights[:num_proposals, :num_thing_classes] = probs[:num_proposals, :num_thing_classes]
    stuff = torch.arange(cls_logits.shape[0] - num_proposals, device=probs.device)
    weights[num_proposals + stuff, num_thing_classes + stuff] = probs[
        num_proposals + stuff, num_thing_classes + stuff
    ]
    # Weighting commutes with the (linear) resizes: combine at the prediction resolution.
    sem = torch.einsum("nk,nhw->khw", weights, mask_logits.float().sigmoid())
    sem = F.interpolate(sem[None], size=padded_size, mode="bilinear", align_corners=False)
    sem = sem[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(sem, size=output_size, mode="bilinear", align_corners=False)[0]
