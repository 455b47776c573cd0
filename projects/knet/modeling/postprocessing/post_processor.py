"""Inference-time post-processing of K-Net as tensor operations.

The same functions serve eager inference and the exported graphs (TorchScript, ONNX): they take
tensors and a few numbers, loop over chunks of kernels or classes at most (never over segments),
and return tensors. ``KNetPostProcessor`` combines them into the model's outputs and
:func:`detectron2_outputs` turns those into Detectron2's output contract.

Per image the kernel head predicts class logits (N, K) and mask logits (N, h, w) at stride 4 of
the padded input. Every full-resolution map is made by :func:`resize_to_output`, the one place
where the official resizing is written: bilinear to the padded input size, crop to the image,
bilinear to the output (original image) size. :func:`mask_statistics` computes what the outputs
need from those maps, on the CPU through a tile-pruned equivalent
(:mod:`.tiled_mask_statistics`). The official code: ZwwWayne/K-Net
``knet/det/kernel_iter_head.py`` (``get_panoptic``, ``merge_stuff_thing``, ``simple_test``) and
``knet/det/kernel_update_head.py`` (``rescale_masks``, ``get_seg_masks``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from ...config import test_option
from ..layers import resize


class OutputGeometry(NamedTuple):
    """Where an image lies in the padded network input and which output size is wanted.

    padded_size: (H_pad, W_pad) of the padded batch; image_size: (H, W) of the image in its
    top-left corner; output_size: (H_out, W_out), or None for the image size.
    """

    padded_size: tuple[int, int]
    image_size: tuple[int, int]
    output_size: tuple[int, int] | None = None

    @property
    def out_size(self) -> tuple[int, int]:
        return self.image_size if self.output_size is None else self.output_size

    def axis(self, dim: int) -> OutputGeometry:
        """The geometry of one axis (0: rows, 1: columns), as an (n, 1) image."""
        out = None if self.output_size is None else (self.output_size[dim], 1)
        return OutputGeometry((self.padded_size[dim], 1), (self.image_size[dim], 1), out)


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def resize_to_output(
    maps: Tensor, geometry: OutputGeometry, chunk_size: int = 0, crop: bool = True
) -> Tensor:
    """Resize maps predicted on the padded input to the output, as the official code does.

    (C, h, w) -> bilinear (align_corners=False) to ``padded_size`` -> crop to ``image_size``
    -> bilinear to ``output_size`` (skipped when None) -> (C, H_out, W_out).

    Args:
        maps: (C, h, w) floating-point maps at any stride of the padded input.
        chunk_size: > 0: with a second resize, resize that many channels at a time into one
            output tensor, so that only one chunk's padded-size maps exist at once (ignored
            when exporting).
        crop: False: stop at the padded size, (C, H_pad, W_pad) (no second resize allowed).
    """
    # Chunks bound the padded-size maps that a second resize consumes; without one, the
    # crop of a single resize is the output itself (no copy).
    chunked = chunk_size > 0 and maps.shape[0] > chunk_size and geometry.output_size is not None
    if chunked and not _exporting():
        out = maps.new_empty((maps.shape[0], *geometry.out_size))
        for start in range(0, maps.shape[0], chunk_size):
            out[start : start + chunk_size] = resize_to_output(
                maps[start : start + chunk_size], geometry
            )
        return out
    x = resize(maps[None], geometry.padded_size)
    if not crop:
        if geometry.output_size is not None:
            raise ValueError("an uncropped resize cannot also resize to another output size")
        return x[0]
    x = x[:, :, : geometry.image_size[0], : geometry.image_size[1]]
    if geometry.output_size is not None:
        x = resize(x, geometry.output_size)
    return x[0]


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
    return (
        scores,
        flat % num_thing_classes,
        torch.div(flat, num_thing_classes, rounding_mode="floor"),
    )


# ----------------------------------------------------------------------------- mask statistics
class MaskStatistics(NamedTuple):
    """What the outputs need from the full-resolution mask probabilities P_n = resize(sigmoid).

    owner: (H_out, W_out) int64, the first kernel maximising ``score_n * P_n`` at each pixel;
    won_area: (N,) int64 pixels owned; own_area: (N,) int64 pixels with ``P_n >= threshold``,
    counted for kernels that own pixels (0 for the others). Empty tensors when no scores are
    given. selected_masks: (M, H_out, W_out) bool ``P_n > threshold`` of the selected kernels.
    """

    owner: Tensor
    won_area: Tensor
    own_area: Tensor
    selected_masks: Tensor


def mask_statistics(
    mask_logits: Tensor,
    geometry: OutputGeometry,
    scores: Tensor | None,
    selected: Tensor | None,
    mask_threshold: float = 0.5,
    chunk_size: int = 16,
) -> MaskStatistics:
    """Owner map, areas and selected binary masks from (N, h, w) stride-4 mask logits.

    Args:
        scores: (N,) kernel scores for the owner map and the areas (None: not computed).
        selected: (M,) kernel indices whose thresholded masks are wanted (None: none).
        chunk_size: kernels resized at once (bounds memory to chunk x H_out x W_out floats).

    The maps are evaluated only where bounds from the low-resolution maps leave the result open:
    on the CPU by :mod:`.tiled_mask_statistics` (any geometry), in exported graphs by
    :mod:`.export_mask_statistics` (the output is the padded input, cropped). Both give the
    statistics of the full maps up to floating-point rounding; otherwise (GPU, or where the
    bounds would not pay off) :func:`full_mask_statistics` computes the full maps in chunks.
    """
    if _exporting() and geometry.output_size is None:
        # (imported here: those modules build on this one)
        from .export_mask_statistics import exported_mask_statistics

        factor = geometry.padded_size[0] // mask_logits.shape[1]
        return exported_mask_statistics(
            mask_logits, geometry, scores, selected, mask_threshold, factor
        )
    if mask_logits.device.type == "cpu" and not _exporting():
        from .tiled_mask_statistics import tiled_mask_statistics

        stats = tiled_mask_statistics(mask_logits, geometry, scores, selected, mask_threshold)
        if stats is not None:
            return stats
    return full_mask_statistics(mask_logits, geometry, scores, selected, mask_threshold, chunk_size)


def full_mask_statistics(
    mask_logits: Tensor,
    geometry: OutputGeometry,
    scores: Tensor | None,
    selected: Tensor | None,
    mask_threshold: float = 0.5,
    chunk_size: int = 16,
) -> MaskStatistics:
    """:func:`mask_statistics` from the full-resolution maps, ``chunk_size`` kernels at a time
    (the owner map is reduced on the fly)."""
    n = mask_logits.shape[0]
    # Without a second resize the maps stay at the padded size, and the padding is cropped from
    # the reductions (owner map, areas, masks) instead of from every chunk of maps.
    crop_late = geometry.output_size is None
    height, width = geometry.padded_size if crop_late else geometry.out_size
    inside = None
    if crop_late:
        rows = torch.arange(height, device=mask_logits.device) < geometry.image_size[0]
        cols = torch.arange(width, device=mask_logits.device) < geometry.image_size[1]
        inside = rows[:, None] & cols[None, :]

    def full_probs(logits: Tensor) -> Tensor:
        return resize_to_output(logits.float().sigmoid(), geometry, crop=not crop_late)

    owner = won_area = own_area = mask_logits.new_zeros((0,), dtype=torch.int64)
    if scores is not None:
        best = mask_logits.new_full((height, width), -1.0, dtype=torch.float32)
        owner = mask_logits.new_zeros((height, width), dtype=torch.int64)
        areas = []
        for start in range(0, n, chunk_size):
            probs = full_probs(mask_logits[start : start + chunk_size])
            above = probs >= mask_threshold
            areas.append((above if inside is None else above & inside).flatten(1).sum(1))
            scored = probs * scores[start : start + chunk_size, None, None]
            chunk_best, chunk_owner = scored.max(0)
            better = chunk_best > best  # strict: ties keep the earlier kernel, as argmax does
            best = torch.where(better, chunk_best, best)
            owner = torch.where(better, chunk_owner + start, owner)
        if crop_late:
            owner = owner[: geometry.image_size[0], : geometry.image_size[1]]
        won_area = _count(owner.flatten(), n)
        own_area = torch.cat(areas) * (won_area > 0)
    masks = mask_logits.new_zeros((0, height, width), dtype=torch.bool)
    if selected is not None:
        chunks = [
            full_probs(mask_logits[selected[s : s + chunk_size]]) > mask_threshold
            for s in range(0, selected.shape[0], chunk_size)
        ]
        masks = torch.cat([masks] + chunks)
    if crop_late:
        masks = masks[:, : geometry.image_size[0], : geometry.image_size[1]]
    return MaskStatistics(owner, won_area, own_area, masks)


def _count(values: Tensor, n: int) -> Tensor:
    """``torch.bincount(values, minlength=n)`` for values in [0, n); a scatter-add when
    exporting (ONNX has no bincount)."""
    if not _exporting():
        return torch.bincount(values, minlength=n)
    return values.new_zeros((n,)).scatter_add(0, values, torch.ones_like(values))


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
        table: {"category_id", "score", "isthing", "area"}, one (S,) row per segment id.
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
    pixels = masks.to(torch.uint8) if _exporting() else masks.view(torch.uint8)
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
    num_classes = probs.shape[1]
    thing_rows = F.pad(
        probs[:num_proposals, :num_thing_classes], (0, num_classes - num_thing_classes)
    )
    stuff = probs[num_proposals:, num_thing_classes:]
    stuff_rows = F.pad(
        stuff * torch.eye(stuff.shape[0], device=stuff.device), (num_thing_classes, 0)
    )
    weights = torch.cat([thing_rows, stuff_rows])
    low_res = torch.einsum("nk,nhw->khw", weights, mask_logits.float().sigmoid())
    return resize_to_output(low_res, geometry, chunk_size)


def semantic_probabilities(
    seg_logits: Tensor, geometry: OutputGeometry, chunk_size: int = 16
) -> Tensor:
    """(K, h, w) class logits of semantic K-Net -> (K, H_out, W_out) softmax probabilities,
    computed in place over the resized logits (no second full-size tensor)."""
    out = resize_to_output(seg_logits.float(), geometry, chunk_size)
    if _exporting():
        return out.softmax(dim=0)
    out -= out.amax(dim=0, keepdim=True)
    out.exp_()
    out /= out.sum(dim=0, keepdim=True)
    return out


class KNetPostProcessor(nn.Module):
    """Outputs of instance/panoptic K-Net for one image, as tensors (no parameters).

    Returns a dict with, for each enabled output:
      panoptic: "panoptic_seg" (H, W) int32 and the segment table "segment_category_id",
          "segment_score", "segment_isthing", "segment_area" (S,);
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
    ):
        """
        Args:
            num_thing_classes: T. With K classes, the last K - T of the N kernels are the stuff
                kernels, so the first P = N - (K - T) are the thing kernels.
            mask_threshold: binarisation of the mask probabilities (instances, own areas).
            thing_score_thresh, overlap_threshold: the panoptic merge's thresholds.
            instances_score_thresh, topk: the instance output's selection.
            chunk_size: kernels / classes resized to full resolution at once.
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
        scores = labels = selected = None
        num_proposals = cls_logits.shape[0] - (cls_logits.shape[1] - self.num_thing_classes)
        if self.panoptic_on:
            scores, labels = kernel_scores_and_labels(
                cls_logits, self.num_thing_classes, num_proposals
            )
        if self.instance_on:
            inst_scores, inst_labels, selected = select_instances(
                cls_logits,
                self.num_thing_classes,
                num_proposals,
                self.topk,
                self.instances_score_thresh,
            )
        if self.panoptic_on or self.instance_on:
            stats = mask_statistics(
                mask_logits, geometry, scores, selected, self.mask_threshold, self.chunk_size
            )
        if self.panoptic_on:
            is_thing = labels < self.num_thing_classes
            out["panoptic_seg"], table = panoptic_segments(
                scores, labels, is_thing, stats, self.thing_score_thresh, self.overlap_threshold
            )
            out.update({f"segment_{key}": value for key, value in table.items()})
        if self.instance_on:
            out["pred_masks"] = stats.selected_masks
            out["scores"] = inst_scores
            out["pred_classes"] = inst_labels
            out["pred_boxes"] = masks_to_boxes(stats.selected_masks)
        if self.semantic_on:
            out["sem_seg"] = semantic_scores(
                cls_logits,
                mask_logits,
                geometry,
                self.num_thing_classes,
                num_proposals,
                self.chunk_size,
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
