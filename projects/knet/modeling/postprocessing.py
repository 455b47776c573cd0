"""Inference-time post-processing of K-Net: instance, panoptic and semantic outputs."""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Instances


def mask_probs_at_image_size(
    mask_logits: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
) -> torch.Tensor:
    """Sigmoid probabilities resized as the official code does.

    (N, h, w) logits -> sigmoid -> bilinear to the padded input size -> crop to the image size
    -> bilinear to the output (original image) size. Returns (N, H_out, W_out) float32.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0, *output_size), dtype=torch.float32)
    probs = mask_logits.float().sigmoid()[None]
    probs = F.interpolate(probs, size=padded_size, mode="bilinear", align_corners=False)
    probs = probs[:, :, : image_size[0], : image_size[1]]
    if tuple(output_size) != tuple(image_size):
        # (a bilinear resize to the same size is the identity: skip it)
        probs = F.interpolate(probs, size=output_size, mode="bilinear", align_corners=False)
    return probs[0]


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


class SelectedMasks:
    """Collects the binary masks of chosen kernels from the merge's probability chunks.

    ``masks`` is (M, H, W) bool, one per entry of ``kernels`` (repeats allowed), thresholded at
    ``prob > mask_threshold`` like ``instance_inference``.
    """

    def __init__(self, kernels: torch.Tensor, mask_threshold: float, output_size):
        self.kernels = kernels
        self.mask_threshold = mask_threshold
        self.masks = torch.zeros(
            (kernels.numel(), *output_size), dtype=torch.bool, device=kernels.device
        )

    def __call__(self, start: int, probs: torch.Tensor) -> None:
        rows = ((self.kernels >= start) & (self.kernels < start + probs.shape[0])).nonzero()[:, 0]
        if rows.numel():
            self.masks[rows] = probs[self.kernels[rows] - start] > self.mask_threshold


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

    Every pixel goes to the kernel maximising ``score_k * prob_k``. Kernels are visited by
    descending score; a thing below ``instance_score_thresh`` is dropped (stuff never is), and a
    kernel is kept only when its won area is at least ``overlap_threshold`` of its own
    ``prob >= mask_threshold`` area. Pixels of dropped kernels are void (0).

    The full-resolution probability maps are produced ``chunk_size`` kernels at a time and
    reduced on the fly (running max / argmax and per-kernel areas), so memory stays at a few
    maps regardless of the number of kernels. ``on_chunk(start, probs)`` is called with each
    chunk's (c, H_out, W_out) probabilities of kernels ``start..start+c-1`` before they are
    consumed, so other outputs can share the resizing work.

    Returns:
        panoptic_seg: (H_out, W_out) int32 segment ids (0 = void),
        segments_info: list of {"id", "category_id", "isthing", "score", "area"}.
    """
    scores, labels = kernel_scores_and_labels(cls_logits, num_thing_classes, num_proposals)
    n = scores.numel()
    best = torch.full(output_size, -1.0, dtype=torch.float32, device=mask_logits.device)
    owner = torch.zeros(output_size, dtype=torch.int64, device=mask_logits.device)
    own_area = torch.zeros(n, dtype=torch.int64, device=mask_logits.device)
    for start in range(0, n, chunk_size):
        probs = mask_probs_at_image_size(
            mask_logits[start : start + chunk_size], padded_size, image_size, output_size
        )
        if on_chunk is not None:
            on_chunk(start, probs)
        own_area[start : start + probs.shape[0]] = torch.count_nonzero(
            probs >= mask_threshold, dim=(1, 2)
        )
        probs.mul_(scores[start : start + probs.shape[0], None, None])
        chunk_best, chunk_owner = probs.max(dim=0)
        # strict ">" keeps the earlier kernel on ties, as a global argmax does
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        owner = torch.where(better, chunk_owner + start, owner)
    won_area = torch.bincount(owner.flatten(), minlength=n)

    segment_of_kernel = torch.zeros(n, dtype=torch.int32, device=mask_logits.device)
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
