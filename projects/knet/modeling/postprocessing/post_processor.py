"""Inference-time post-processing of K-Net as tensor operations.

The same functions serve eager inference and the exported graphs (TorchScript, ONNX): they take
tensors and a few numbers, loop over chunks of kernels or classes at most (never over segments),
and return tensors. ``KNetPostProcessor`` combines them into the model's outputs and
:func:`detectron2_outputs` turns those into Detectron2's output contract.

Per image the kernel head predicts class logits (N, K) and mask logits (N, h, w) at stride 4 of
the padded input. Every full-resolution map is made by :func:`~.base.resize_to_output`, the one
place where the official resizing is written: bilinear to the padded input size, crop to the
image, bilinear to the output (original image) size. :func:`~.statistics.mask_statistics`
computes what the outputs need from those maps. The official code: ZwwWayne/K-Net
``knet/det/kernel_iter_head.py`` (``get_panoptic``, ``merge_stuff_thing``, ``simple_test``) and
``knet/det/kernel_update_head.py`` (``rescale_masks``, ``get_seg_masks``).
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from ...config import test_option
from .base import MaskStatistics, OutputGeometry, exporting, resize_to_output
from .statistics import mask_statistics


# ----------------------------------------------------------------------------- kernels
def kernel_scores_and_labels(
    cls_logits: Tensor, num_thing_classes: int, num_proposals: int
) -> tuple[Tensor, Tensor]:
    """Per-kernel score and class, as the official merge reads them.

    (N, K) logits -> scores (N,) float32, labels (N,) int64: thing kernel n < P takes its best
    thing class, ``max_{c < T} sigmoid(logit[n, c])``; stuff kernel P + i is scored on its own
    class T + i (the diagonal of the stuff block).
    """
    probs = cls_logits.float().sigmoid()
    thing_scores, thing_labels = probs[:num_proposals, :num_thing_classes].max(dim=1)
    stuff_scores = probs[num_proposals:, num_thing_classes:].diagonal()
    stuff_labels = torch.arange(stuff_scores.shape[0], device=probs.device) + num_thing_classes
    return torch.cat([thing_scores, stuff_scores]), torch.cat([thing_labels, stuff_labels])


def select_instances(
    cls_logits: Tensor, num_thing_classes: int, num_proposals: int, topk: int, score_thresh: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The official instance selection: top-k (thing kernel, thing class) pairs by
    ``sigmoid(logit)``, then those scoring >= ``score_thresh``; no mask rescoring.

    Returns:
        scores (M,) descending, labels (M,) int64, kernels (M,) int64 (a kernel may appear
        with several classes).
    """
    scores = cls_logits[:num_proposals, :num_thing_classes].float().sigmoid().flatten()
    scores, flat = scores.topk(min(topk, num_proposals * num_thing_classes))
    keep = scores >= score_thresh
    scores, flat = scores[keep], flat[keep]
    return scores, flat % num_thing_classes, flat.div(num_thing_classes, rounding_mode="floor")


def joint_candidates(
    cls_logits: Tensor, num_thing_classes: int, num_proposals: int, topk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Video K-Net's panoptic candidates (its ``merge_joint``): the top-k (thing kernel, thing
    class) pairs (:func:`select_instances`, descending; a kernel may come with several classes),
    then the stuff kernels by descending score.

    Returns:
        kernels (M,) int64 (the kernel of each candidate), scores (M,), labels (M,) int64.
    """
    thing_scores, thing_labels, thing_kernels = select_instances(
        cls_logits, num_thing_classes, num_proposals, topk, 0.0
    )
    scores, labels = kernel_scores_and_labels(cls_logits, num_thing_classes, num_proposals)
    order = _descending_order(scores[num_proposals:])
    return (
        torch.cat([thing_kernels, num_proposals + order]),
        torch.cat([thing_scores, scores[num_proposals:][order]]),
        torch.cat([thing_labels, labels[num_proposals:][order]]),
    )


# ----------------------------------------------------------------------------- outputs
def panoptic_segments(
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    stats: MaskStatistics,
    thing_score_thresh: float,
    overlap_threshold: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The official thing/stuff merge, decided for every kernel at once.

    Every pixel belongs to its owner. Kernel n is a segment when it is stuff or scores >=
    ``thing_score_thresh``, owns pixels, and owns at least ``overlap_threshold`` of its own
    area (``won_n / own_n >= overlap_threshold``); the pixels of other kernels are void (0).
    Segment ids are 1, 2, ... by descending score (ties: lower kernel first).

    Returns:
        panoptic_seg: (H_out, W_out) int32 ids;
        table: {"category_id", "score", "isthing", "area", "kernel"}, one (S,) row per segment
            id ("kernel": the kernel each segment comes from).
    """
    won, own = stats.won_area, stats.own_area
    owns_enough = won.double() / own.clamp(min=1).double() >= overlap_threshold
    keep = (~is_thing | (scores >= thing_score_thresh)) & (won > 0) & (own > 0) & owns_enough
    order = _descending_order(scores)
    kept_in_order = keep[order]
    ids_in_order = torch.cumsum(kept_in_order.int(), 0) * kept_in_order.int()
    segment_of_kernel = torch.zeros_like(ids_in_order).scatter(0, order, ids_in_order)
    kernels = order[kept_in_order]
    table = {
        "category_id": labels[kernels],
        "score": scores[kernels],
        "isthing": is_thing[kernels],
        "area": won[kernels],
        "kernel": kernels,
    }
    return segment_of_kernel[stats.owner].int(), table


def _descending_order(scores: Tensor) -> Tensor:
    """Indices sorting ``scores`` (N,) descending, ties by index: a stable sort, written as
    ranks from pairwise comparisons (N is a few hundred) so that every exporter keeps it."""
    index = torch.arange(scores.shape[0], device=scores.device)
    precedes = (scores[None, :] > scores[:, None]) | (
        (scores[None, :] == scores[:, None]) & (index[None, :] < index[:, None])
    )  # precedes[k, j]: kernel j comes before kernel k
    rank = precedes.sum(1)
    return torch.empty_like(index).scatter(0, rank, index)


def segments_info_from_table(table: dict[str, Tensor]) -> list[dict]:
    """Detectron2's ``segments_info`` from a segment table (ids 1..S in row order)."""
    columns = {key: value.tolist() for key, value in table.items()}
    return [
        {"id": i + 1, **{key: column[i] for key, column in columns.items()}}
        for i in range(len(columns["area"]))
    ]


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(M, H, W) bool -> (M, 4) float32 XYXY extents, ``x1 = max x + 1`` as Detectron2's
    ``BitMasks.get_bounding_boxes``; all zeros for an empty mask."""
    # (a max over uint8 is many times faster than any() over bool on the CPU)
    pixels = masks.to(torch.uint8) if exporting() else masks.view(torch.uint8)
    boxes = []
    for dim in (1, 2):  # columns (x) first, then rows (y)
        hit = pixels.amax(dim=dim)  # (M, W) or (M, H), 1 where the mask has a pixel
        first = hit.argmax(1)
        last = hit.shape[1] - 1 - hit.flip(1).argmax(1)
        boxes.append((first, last + 1))
    (x0, x1), (y0, y1) = boxes
    nonempty = hit.amax(1) > 0
    return (torch.stack([x0, y0, x1, y1], 1) * nonempty[:, None]).float()


def semantic_scores(
    cls_logits: Tensor,
    mask_logits: Tensor,
    geometry: OutputGeometry,
    num_thing_classes: int,
    num_proposals: int,
    chunk_size: int = 16,
) -> Tensor:
    """(K, H_out, W_out) class scores of instance/panoptic K-Net (not a distribution):
    ``S_c = sum_n w_nc P_n`` with ``w_nc = sigmoid(logit_nc)`` for thing kernels and thing
    classes and for stuff kernel n on its own class (0 elsewhere). The weighting commutes with
    the (linear) resizing, so it is done at the prediction resolution."""
    probs = cls_logits.float().sigmoid()
    kernel = torch.arange(probs.shape[0], device=probs.device)[:, None]
    cls = torch.arange(probs.shape[1], device=probs.device)[None, :]
    # thing kernels on thing classes, stuff kernel P + i on its class T + i
    things = (kernel < num_proposals) & (cls < num_thing_classes)
    trained = things | (cls - num_thing_classes == kernel - num_proposals)
    low_res = torch.einsum("nk,nhw->khw", probs * trained, mask_logits.float().sigmoid())
    return resize_to_output(low_res, geometry, chunk_size)


def semantic_probabilities(
    seg_logits: Tensor, geometry: OutputGeometry, chunk_size: int = 16
) -> Tensor:
    """(K, h, w) class logits of semantic K-Net -> (K, H_out, W_out) softmax probabilities,
    computed in place over the resized logits (no second full-size tensor)."""
    out = resize_to_output(seg_logits.float(), geometry, chunk_size)
    if exporting():
        return out.softmax(dim=0)
    out -= out.amax(dim=0, keepdim=True)
    out.exp_()
    out /= out.sum(dim=0, keepdim=True)
    return out


class KNetPostProcessor(nn.Module):
    """Outputs of instance/panoptic K-Net for one image, as tensors (no parameters).

    Returns a dict with, for each enabled output:
      panoptic: "panoptic_seg" (H, W) int32 and the segment table "segment_category_id",
          "segment_score", "segment_isthing", "segment_area" (S,) (and "segment_kernel", the
          kernel of each segment, with ``segment_kernels``);
      instance: "pred_masks" (M, H, W) bool, "scores" (M,), "pred_classes" (M,) int64,
          "pred_boxes" (M, 4) XYXY, the top ``topk`` (kernel, thing class) pairs scoring >=
          ``instances_score_thresh``;
      semantic: "sem_seg" (K, H, W) float32 class scores (see :func:`semantic_scores`).
    """

    @configurable
    def __init__(
        self,
        *,
        num_thing_classes: int,
        panoptic_on: bool,
        instance_on: bool,
        semantic_on: bool,
        mask_threshold: float = 0.5,
        thing_score_thresh: float = 0.3,
        overlap_threshold: float = 0.6,
        instances_score_thresh: float = 0.0,
        topk: int = 100,
        chunk_size: int = 16,
        segment_kernels: bool = False,
        joint_merge: bool = False,
    ):
        """
        Args:
            num_thing_classes: T. With K classes, the last K - T of the N kernels are the stuff
                kernels, so the first P = N - (K - T) are the thing kernels.
            mask_threshold: binarisation of the mask probabilities (instances, own areas).
            thing_score_thresh, overlap_threshold: the panoptic merge's thresholds.
            instances_score_thresh, topk: the instance output's selection.
            chunk_size: kernels / classes resized to full resolution at once.
            segment_kernels: also return each panoptic segment's kernel (Video K-Net embeds
                and tracks it).
            joint_merge: merge :func:`joint_candidates` (Video K-Net's ``merge_joint``)
                instead of one candidate per kernel (K-Net's merge).
        """
        super().__init__()
        self.num_thing_classes = num_thing_classes
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.semantic_on = semantic_on
        self.mask_threshold = mask_threshold
        self.thing_score_thresh = thing_score_thresh
        self.overlap_threshold = overlap_threshold
        self.instances_score_thresh = instances_score_thresh
        self.topk = topk
        self.chunk_size = chunk_size
        self.segment_kernels = segment_kernels
        self.joint_merge = joint_merge

    @classmethod
    def from_config(cls, cfg) -> dict:
        test = cfg.MODEL.KNET.TEST
        return {
            "num_thing_classes": cfg.MODEL.KNET.NUM_THING_CLASSES,
            "panoptic_on": test.PANOPTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "semantic_on": test.SEMANTIC_ON,
            "mask_threshold": test.MASK_THRESHOLD,
            "thing_score_thresh": test_option(cfg, "PANOPTIC_THING_SCORE_THRESH"),
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "instances_score_thresh": test_option(cfg, "INSTANCES_SCORE_THRESH"),
            "topk": cfg.TEST.DETECTIONS_PER_IMAGE,
            "chunk_size": test.MERGE_CHUNK_SIZE,
            "joint_merge": test.PANOPTIC_JOINT_MERGE,
        }

    def forward(
        self, cls_logits: Tensor, mask_logits: Tensor, geometry: OutputGeometry
    ) -> dict[str, Tensor]:
        """
        Args:
            cls_logits: (N, K) and mask_logits: (N, h, w) of one image (last stage, stride 4).
            geometry: where the image lies in the padded input and the output size.
        """
        out: dict[str, Tensor] = {}
        scores = labels = selected = candidates = None
        things = self.num_thing_classes
        num_proposals = cls_logits.shape[0] - (cls_logits.shape[1] - things)
        if self.panoptic_on and self.joint_merge:
            candidates, scores, labels = joint_candidates(
                cls_logits, things, num_proposals, self.topk
            )
        elif self.panoptic_on:
            scores, labels = kernel_scores_and_labels(cls_logits, things, num_proposals)
        if self.instance_on:
            inst_scores, inst_labels, selected = select_instances(
                cls_logits, things, num_proposals, self.topk, self.instances_score_thresh
            )
            if candidates is not None:  # the instances are the first thing candidates
                selected = torch.arange(inst_scores.shape[0], device=cls_logits.device)
        if self.panoptic_on or self.instance_on:
            masks = mask_logits if candidates is None else mask_logits[candidates]
            stats = mask_statistics(
                masks, geometry, scores, selected, self.mask_threshold, self.chunk_size
            )
        if self.panoptic_on:
            is_thing = labels < things
            out["panoptic_seg"], table = panoptic_segments(
                scores, labels, is_thing, stats, self.thing_score_thresh, self.overlap_threshold
            )
            if candidates is not None:
                table["kernel"] = candidates[table["kernel"]]
            if not self.segment_kernels:
                del table["kernel"]
            out.update({f"segment_{key}": value for key, value in table.items()})
        if self.instance_on:
            masks = stats.selected_masks
            out.update(pred_masks=masks, scores=inst_scores, pred_classes=inst_labels)
            out["pred_boxes"] = masks_to_boxes(masks)
        if self.semantic_on:
            out["sem_seg"] = semantic_scores(
                cls_logits, mask_logits, geometry, things, num_proposals, self.chunk_size
            )
        return out


def detectron2_outputs(outputs: dict[str, Tensor]) -> dict:
    """Tensor outputs (of :class:`KNetPostProcessor` or an exported model) -> Detectron2's
    contract: "panoptic_seg" (id map, segments_info), "instances" (``Instances``), "sem_seg"."""
    result: dict = {}
    if "panoptic_seg" in outputs:
        table = {
            key[len("segment_") :]: value
            for key, value in outputs.items()
            if key.startswith("segment_")
        }
        table["isthing"] = table["isthing"].bool()
        result["panoptic_seg"] = (outputs["panoptic_seg"], segments_info_from_table(table))
    if "pred_masks" in outputs:
        masks = outputs["pred_masks"].bool()
        instances = Instances(tuple(masks.shape[-2:]))
        instances.pred_masks = masks
        instances.pred_boxes = Boxes(outputs["pred_boxes"])
        instances.scores = outputs["scores"]
        instances.pred_classes = outputs["pred_classes"]
        result["instances"] = instances
    if "sem_seg" in outputs:
        result["sem_seg"] = outputs["sem_seg"]
    return result
