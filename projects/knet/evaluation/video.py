"""Video panoptic metrics: STQ (with AQ and SQ) and VPQ, and a Detectron2 evaluator for them.

:class:`SegmentationAndTrackingQuality` is STQ as DeepLab2 defines it (Weber et al., "STEP:
Segmenting and Tracking Every Pixel", 2021): STQ = sqrt(AQ * SQ), AQ an IoU-weighted score of
how the predicted tubes cover every ground-truth thing tube, SQ the class mean IoU.
:class:`VideoPanopticQuality` is VPQ as the Video K-Net evaluators compute it (after ViP-DeepLab):
image PQ on windows of k consecutive frames, laid side by side, so that a segment is a tube with
one id over the k frames. :class:`VideoPanopticEvaluator` scores a model's per-frame
``panoptic_seg`` outputs with both.

Labels are given per frame as a semantic map (contiguous class ids, ``ignore_label`` for void)
and an instance map (track ids; 0 for stuff, for untracked predictions and for ground-truth
crowd). Both metrics keep integer pixel counts per id (or pair of ids) only, never whole videos.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

__all__ = [
    "SegmentationAndTrackingQuality",
    "VideoPanopticEvaluator",
    "VideoPanopticQuality",
]

logger = logging.getLogger(__name__)

_AQ_EPS = 1e-15  # DeepLab2's guard of AQ's denominator (no ground-truth tube: AQ = 0)
_ALL_CLASSES_EPS = 1e-10  # the Video K-Net scripts' guard of SQ / RQ of absent classes
_VPQ_INSTANCE_BITS = 16  # VPQ's id = semantic * 2**16 + instance, as the Video K-Net scripts
AVERAGE_OVER = ("present", "all")
GroundTruthReader = Callable[[dict], tuple[np.ndarray, np.ndarray]]


# ------------------------------------------------------------------------------------ helpers
def _check_frame(
    maps: Mapping[str, np.ndarray], num_classes: int, ignore_label: int, instance_bits: int
) -> tuple[int, ...]:
    """Check one frame's label maps: 2-D integer arrays of one shape, semantic ids in
    [0, num_classes) or ``ignore_label``, instance ids in [0, 2**instance_bits); returns the
    shape. Out-of-range ids would otherwise alias other ids in the packed int64 keys."""
    shape = None
    for name, array in maps.items():
        if not isinstance(array, np.ndarray) or array.ndim != 2:
            got = getattr(array, "shape", type(array).__name__)
            raise ValueError(f"{name} must be a 2-D numpy array, got {got}")
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            shapes = {n: a.shape for n, a in maps.items()}
            raise ValueError(f"label maps of one frame differ in shape: {shapes}")
        if array.size == 0:
            continue
        if name.startswith("semantic"):
            valid = ((array >= 0) & (array < num_classes)) | (array == ignore_label)
            if not valid.all():
                bad = np.unique(array[~valid])[:5].tolist()
                raise ValueError(
                    f"{name} has ids {bad} outside [0, {num_classes}) and not the ignore label "
                    f"{ignore_label}"
                )
        elif array.min() < 0 or array.max() >= 1 << instance_bits:
            raise ValueError(
                f"{name} has ids outside [0, 2**{instance_bits}): min {array.min()}, "
                f"max {array.max()}"
            )
    assert shape is not None
    return shape


def _sum_by_key(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, int64 sum of ``values`` per key)."""
    unique, inverse = np.unique(keys, return_inverse=True)
    sums = np.zeros(len(unique), dtype=np.int64)
    np.add.at(sums, inverse.reshape(-1), values)
    return unique, sums


@dataclass
class _PairAreas:
    """Pixel counts per int64 pair key (ground-truth id, predicted id), merged frame by frame;
    the keys stay sorted and unique."""

    keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    areas: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def add(self, keys: np.ndarray, areas: np.ndarray) -> None:
        self.keys, self.areas = _sum_by_key(
            np.concatenate([self.keys, keys]), np.concatenate([self.areas, areas])
        )


def _mean(values: np.ndarray) -> float:
    """Mean of ``values``; 0.0 for none (as DeepLab2's AQ and panopticapi's PQ of no class)."""
    return float(values.mean()) if values.size else 0.0


# ------------------------------------------------------------------------------------------ STQ
@dataclass
class _SequenceStq:
    confusion: np.ndarray  # (M, M) int64, rows ground truth, columns prediction
    pairs: _PairAreas = field(default_factory=_PairAreas)
    length: int = 0


class SegmentationAndTrackingQuality:
    """Segmentation and Tracking Quality (STQ), DeepLab2's definition, vectorised in numpy.

    Per frame of sequence q (pixels x, ground truth (s, i), prediction (s', i')):

    - SQ: a confusion matrix of s against s'. A void label is moved to the extra index
      ``num_classes`` when ``ignore_label >= num_classes`` (matrix (num_classes + 1)^2). At the
      end the ground-truth void row is zeroed (a prediction on void is no false positive) and
      IoU_c = TP_c / (TP_c + FP_c + FN_c) is averaged over the classes of non-zero union. The
      void *column* stays: predicting void on labelled pixels is a false negative, and void
      becomes one more "class" of IoU 0.
    - Tubes: a ground-truth tube g is the pixels of one (thing class, instance != 0) over the
      sequence; a predicted tube p the pixels of one (thing class s', i') (all untracked
      pixels i' = 0 of a class are one tube). Crowd pixels (thing ground truth with i = 0)
      belong to no tube on either side, so no prediction is punished there.
    - AQ_q = sum_g 1/|g| sum_{p: |g∩p|>0} |g∩p| * IoU(g, p), class-agnostic; AQ = sum_q AQ_q /
      max(number of ground-truth tubes of all sequences, 1e-15): normalised by the tubes, not
      averaged over sequences.
    - STQ = sqrt(AQ * SQ); per sequence STQ_q = sqrt(AQ_q / |G_q| * SQ_q).

    The reported SQ is called "IoU", as in DeepLab2. Means over nothing (no class with a union,
    no tube) are 0.

    Args:
        num_classes: classes 0 .. num_classes - 1.
        things: the contiguous ids of the thing classes (those with tubes).
        ignore_label: the void label of the semantic maps (not a class id, it may exceed them).
        label_bit_shift: b of DeepLab2's panoptic id (semantic << b) + instance; instance ids
            must be below 2**b.
        offset: DeepLab2's base of the intersection key gt_id * offset + pred_id; it must be
            >= num_classes << b (else ``ValueError``). The results do not depend on it: the
            intersections are keyed internally with the smallest base that cannot collide.
    """

    def __init__(
        self,
        num_classes: int,
        things: Iterable[int],
        ignore_label: int = 255,
        label_bit_shift: int = 16,
        offset: int = 2**24,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if ignore_label < 0:
            raise ValueError(f"ignore_label must be >= 0, got {ignore_label}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.label_bit_shift = int(label_bit_shift)
        self.things = sorted({int(c) for c in things})
        bad = [c for c in self.things if not 0 <= c < num_classes or c == ignore_label]
        if bad:
            raise ValueError(f"thing classes {bad} are not class ids in [0, {num_classes})")
        lower_bound = num_classes << label_bit_shift
        if offset < lower_bound:
            raise ValueError(
                f"offset {offset} is too small: it must be >= num_classes << label_bit_shift "
                f"= {num_classes} << {label_bit_shift} = {lower_bound}, or intersection keys "
                "of different (ground truth, prediction) pairs can collide"
            )
        self.offset = int(offset)
        # Tube ids are (class << b) + instance < num_classes << b =: R for thing classes; R
        # itself marks "no tube" in a pair key gt * (R + 1) + pred.
        self._no_tube = lower_bound
        self._pair_base = lower_bound + 1
        if self._pair_base**2 > np.iinfo(np.int64).max:
            raise ValueError(
                f"num_classes << label_bit_shift = {lower_bound} is too large for int64 keys"
            )
        # Confusion matrix size and the row of ground-truth void (zeroed in result()).
        self._void_index = num_classes if ignore_label >= num_classes else ignore_label
        self._matrix_size = num_classes + 1 if ignore_label >= num_classes else num_classes
        self._is_thing = np.zeros(max(num_classes, ignore_label + 1), dtype=bool)
        self._is_thing[self.things] = True
        self.reset()

    def reset(self) -> None:
        """Forget all frames."""
        self._sequences: dict[Hashable, _SequenceStq] = collections.OrderedDict()

    def update(
        self,
        semantic_gt: np.ndarray,
        instance_gt: np.ndarray,
        semantic_pred: np.ndarray,
        instance_pred: np.ndarray,
        sequence_id: Hashable = 0,
    ) -> None:
        """Add one frame of sequence ``sequence_id`` (2-D integer maps of one shape (H, W))."""
        _check_frame(
            {
                "semantic_gt": semantic_gt,
                "instance_gt": instance_gt,
                "semantic_pred": semantic_pred,
                "instance_pred": instance_pred,
            },
            self.num_classes,
            self.ignore_label,
            self.label_bit_shift,
        )
        sem_gt = semantic_gt.reshape(-1).astype(np.int64)
        ins_gt = instance_gt.reshape(-1).astype(np.int64)
        sem_pr = semantic_pred.reshape(-1).astype(np.int64)
        ins_pr = instance_pred.reshape(-1).astype(np.int64)
        m = self._matrix_size
        seq = self._sequences.get(sequence_id)
        if seq is None:
            seq = self._sequences[sequence_id] = _SequenceStq(np.zeros((m, m), dtype=np.int64))
        seq.length += 1

        row = np.where(sem_gt == self.ignore_label, self._void_index, sem_gt)
        col = np.where(sem_pr == self.ignore_label, self._void_index, sem_pr)
        seq.confusion += np.bincount(row * m + col, minlength=m * m).reshape(m, m)

        gt_thing = self._is_thing[sem_gt]
        crowd = gt_thing & (ins_gt == 0)
        in_gt_tube = gt_thing & ~crowd
        in_pred_tube = self._is_thing[sem_pr] & ~crowd
        # One sort per frame: every pixel of some tube, keyed by (its gt tube, its pred tube).
        sel = in_gt_tube | in_pred_tube
        b = self.label_bit_shift
        gt_id = np.where(in_gt_tube, (sem_gt << b) + ins_gt, self._no_tube)[sel]
        pred_id = np.where(in_pred_tube, (sem_pr << b) + ins_pr, self._no_tube)[sel]
        keys, areas = np.unique(gt_id * self._pair_base + pred_id, return_counts=True)
        seq.pairs.add(keys, areas.astype(np.int64))

    def _association(self, pairs: _PairAreas) -> tuple[float, int]:
        """(AQ_q before normalisation, number of ground-truth tubes) of one sequence."""
        gt = pairs.keys // self._pair_base
        pred = pairs.keys % self._pair_base
        gt_ids, gt_inverse = np.unique(gt, return_inverse=True)
        pred_ids, pred_inverse = np.unique(pred, return_inverse=True)
        gt_area = np.bincount(gt_inverse.reshape(-1), weights=pairs.areas)
        pred_area = np.bincount(pred_inverse.reshape(-1), weights=pairs.areas)
        both = (gt != self._no_tube) & (pred != self._no_tube)
        inter = pairs.areas[both].astype(np.float64)
        g = gt_area[gt_inverse.reshape(-1)[both]]
        p = pred_area[pred_inverse.reshape(-1)[both]]
        aq = float(np.sum(inter * (inter / (g + p - inter)) / g))
        return aq, int(np.count_nonzero(gt_ids != self._no_tube))

    def _mean_iou(self, confusion: np.ndarray) -> float:
        confusion = confusion.copy()
        confusion[self._void_index, :] = 0  # predictions on ground-truth void are not FP
        tp = np.diag(confusion).astype(np.float64)
        union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
        valid = union > 0
        return _mean(tp[valid] / union[valid])

    def result(self) -> dict[str, Any]:
        """STQ, AQ and IoU (= SQ) of all frames so far, and per sequence (in order of first
        appearance): ``STQ_per_seq``, ``AQ_per_seq``, ``IoU_per_seq``, ``ID_per_seq``,
        ``Length_per_seq`` (frames)."""
        aq_sums, tubes, ious = [], [], []
        total = np.zeros((self._matrix_size,) * 2, dtype=np.int64)
        for seq in self._sequences.values():
            aq, n = self._association(seq.pairs)
            aq_sums.append(aq)
            tubes.append(n)
            ious.append(self._mean_iou(seq.confusion))
            total += seq.confusion
        aq_total = float(np.sum(aq_sums)) / max(float(np.sum(tubes)), _AQ_EPS)
        iou_total = self._mean_iou(total)
        aq_per_seq = [a / max(n, _AQ_EPS) for a, n in zip(aq_sums, tubes)]
        return {
            "STQ": math.sqrt(aq_total * iou_total),
            "AQ": aq_total,
            "IoU": iou_total,
            "STQ_per_seq": [math.sqrt(a * i) for a, i in zip(aq_per_seq, ious)],
            "AQ_per_seq": aq_per_seq,
            "IoU_per_seq": ious,
            "ID_per_seq": list(self._sequences),
            "Length_per_seq": [s.length for s in self._sequences.values()],
        }


# ------------------------------------------------------------------------------------------ VPQ
@dataclass
class _ClassCounts:
    """Per-class sums over windows: IoU of matches, TP, FN, FP."""

    iou: np.ndarray
    tp: np.ndarray
    fn: np.ndarray
    fp: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> _ClassCounts:
        return cls(
            np.zeros(num_classes),
            *(np.zeros(num_classes, dtype=np.int64) for _ in range(3)),
        )


class VideoPanopticQuality:
    """Video Panoptic Quality over windows of k consecutive frames, as the Video K-Net scripts.

    For every sequence of n frames and every k, each window i .. i + k - 1 (i = 0 .. n - k,
    stride 1) is one image: its k frames side by side. A segment is then the pixels of one id
    = semantic * 2**16 + instance over the k frames, and image PQ (DeepLab2's
    ``panoptic_quality.py``) compares them:

    - a ground-truth segment g and a predicted p of the same class match (TP) if
      IoU = |g∩p| / (|g∪p| - |p∩void|) > 0.5 (the prediction's void pixels leave the union;
      matches are unique at > 0.5);
    - unmatched ground-truth segments are FN (void is no segment);
    - unmatched predicted segments are FP unless more than half of their pixels lie on
      ground-truth void; predictions of the void label are neither matched nor FP.

    Crowd (a thing's ground truth with instance 0) follows DeepLab2's ``panoptic_quality.py``
    and the Video K-Net scripts, not COCO: it is an ordinary segment, one per class and window,
    which a prediction of its class can match and which is FN otherwise. (COCO's panopticapi
    instead never counts crowd as FN and adds a prediction's crowd overlap of its class to its
    void overlap.) All ground-truth void pixels are one void region whatever their instance id.

    IoU sums, TP, FN and FP are summed per class over all windows of all sequences; per class
    SQ = sum IoU / TP, RQ = TP / (TP + FN/2 + FP/2), PQ = SQ * RQ. ``average_over``:

    - "present" (default, DeepLab2): the mean over the classes with TP + FN + FP > 0;
    - "all": the official Video K-Net scripts' choice, the mean over every class with
      SQ = sum IoU / (TP + 1e-10) and RQ = TP / (TP + FN/2 + FP/2 + 1e-10), so a class absent
      from ground truth and prediction counts as PQ 0.

    VPQ@k is that mean for windows of k frames, VPQ the mean over ``window_sizes`` (VIPSeg's
    protocol with the default (1, 2, 4, 6)); "_th" / "_st" restrict the mean to thing / stuff
    classes. A mean over no class is 0. Frames must be given in order per sequence; only the
    pair counts of the last max(window_sizes) - 1 frames of each sequence are kept.

    Args:
        num_classes: classes 0 .. num_classes - 1.
        things: the contiguous ids of the thing classes (for the "_th" / "_st" splits).
        ignore_label: the void label of the semantic maps.
        window_sizes: the k of the windows, each >= 1.
        average_over: "present" or "all", see above.
    """

    def __init__(
        self,
        num_classes: int,
        things: Iterable[int],
        ignore_label: int = 255,
        window_sizes: Sequence[int] = (1, 2, 4, 6),
        average_over: str = "present",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if ignore_label < 0:
            raise ValueError(f"ignore_label must be >= 0, got {ignore_label}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} is a class id (< {num_classes})")
        if average_over not in AVERAGE_OVER:
            raise ValueError(f"average_over must be one of {AVERAGE_OVER}, got {average_over!r}")
        sizes = [int(k) for k in window_sizes]
        if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
            raise ValueError(f"window_sizes must be distinct integers >= 1, got {window_sizes}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.window_sizes = tuple(sizes)
        self.average_over = average_over
        self.things = sorted({int(c) for c in things})
        bad = [c for c in self.things if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"thing classes {bad} are not class ids in [0, {num_classes})")
        self._is_thing = np.zeros(num_classes, dtype=bool)
        self._is_thing[self.things] = True
        # Internally void is class index num_classes, so ids stay below (num_classes + 1) << 16.
        self._void_class = num_classes
        self._pair_base = (num_classes + 1) << _VPQ_INSTANCE_BITS
        if self._pair_base**2 > np.iinfo(np.int64).max:
            raise ValueError(f"num_classes {num_classes} is too large for int64 keys")
        self.reset()

    def reset(self) -> None:
        """Forget all frames."""
        k_max = max(self.window_sizes)
        # per sequence: (pair keys, areas) of its last k_max frames, newest last
        self._recent: dict[Hashable, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=k_max)
        )
        self._counts = {k: _ClassCounts.zeros(self.num_classes) for k in self.window_sizes}
        self._windows = dict.fromkeys(self.window_sizes, 0)

    def update(
        self,
        semantic_gt: np.ndarray,
        instance_gt: np.ndarray,
        semantic_pred: np.ndarray,
        instance_pred: np.ndarray,
        sequence_id: Hashable = 0,
    ) -> None:
        """Add the next frame of sequence ``sequence_id`` (2-D integer maps of one shape) and
        score every window that ends with it."""
        _check_frame(
            {
                "semantic_gt": semantic_gt,
                "instance_gt": instance_gt,
                "semantic_pred": semantic_pred,
                "instance_pred": instance_pred,
            },
            self.num_classes,
            self.ignore_label,
            _VPQ_INSTANCE_BITS,
        )
        gt = self._panoptic_ids(semantic_gt, instance_gt)
        pred = self._panoptic_ids(semantic_pred, instance_pred)
        # A window's pair areas are the sums of its frames' pair areas: segments keep their id
        # across the frames, so this equals counting on the side-by-side image.
        keys, areas = np.unique(gt * self._pair_base + pred, return_counts=True)
        recent = self._recent[sequence_id]
        recent.append((keys, areas.astype(np.int64)))
        for k in self.window_sizes:
            if len(recent) < k:
                continue
            frames = list(recent)[-k:]
            window_keys, window_areas = _sum_by_key(
                np.concatenate([f[0] for f in frames]), np.concatenate([f[1] for f in frames])
            )
            self._accumulate(self._counts[k], window_keys, window_areas)
            self._windows[k] += 1

    def _panoptic_ids(self, semantic: np.ndarray, instance: np.ndarray) -> np.ndarray:
        """int64 id = class << 16 + instance per pixel, void (any instance) as void_class << 16."""
        semantic = semantic.reshape(-1).astype(np.int64)
        instance = instance.reshape(-1).astype(np.int64)
        void = semantic == self.ignore_label
        semantic = np.where(void, self._void_class, semantic)
        return (semantic << _VPQ_INSTANCE_BITS) + np.where(void, 0, instance)

    def _accumulate(self, counts: _ClassCounts, keys: np.ndarray, areas: np.ndarray) -> None:
        """Image PQ of one window given its (gt id, pred id) pair areas."""
        n = self.num_classes
        gt = keys // self._pair_base
        pred = keys % self._pair_base
        gt_ids, gt_inverse = np.unique(gt, return_inverse=True)
        pred_ids, pred_inverse = np.unique(pred, return_inverse=True)
        gt_inverse, pred_inverse = gt_inverse.reshape(-1), pred_inverse.reshape(-1)
        gt_area = np.bincount(gt_inverse, weights=areas).astype(np.int64)
        pred_area = np.bincount(pred_inverse, weights=areas).astype(np.int64)
        gt_class = gt >> _VPQ_INSTANCE_BITS
        pred_class = pred >> _VPQ_INSTANCE_BITS
        on_void = gt_class == self._void_class
        pred_void = np.bincount(pred_inverse, weights=np.where(on_void, areas, 0))
        pred_void = pred_void.astype(np.int64)

        # candidate pairs: same class, not void (a ground-truth void pair has class n)
        same = (gt_class == pred_class) & (pred_class != self._void_class)
        union = gt_area[gt_inverse] + pred_area[pred_inverse] - areas - pred_void[pred_inverse]
        match = same & (2 * areas > union)  # IoU > 0.5, in integers
        counts.tp += np.bincount(gt_class[match], minlength=n)[:n]
        counts.iou += np.bincount(
            gt_class[match], weights=areas[match] / union[match], minlength=n
        )[:n]

        gt_matched = np.zeros(len(gt_ids), dtype=bool)
        gt_matched[gt_inverse[match]] = True
        pred_matched = np.zeros(len(pred_ids), dtype=bool)
        pred_matched[pred_inverse[match]] = True
        gt_ids_class = gt_ids >> _VPQ_INSTANCE_BITS
        pred_ids_class = pred_ids >> _VPQ_INSTANCE_BITS
        missed = ~gt_matched & (gt_ids_class != self._void_class)
        counts.fn += np.bincount(gt_ids_class[missed], minlength=n)[:n]
        false = (
            ~pred_matched
            & (pred_ids_class != self._void_class)
            & (2 * pred_void <= pred_area)  # mostly on void: not a false positive
        )
        counts.fp += np.bincount(pred_ids_class[false], minlength=n)[:n]

    def per_class(self, k: int) -> dict[str, np.ndarray]:
        """Per-class PQ, SQ, RQ (fractions, under ``average_over``'s convention for classes
        without TP) and the summed IoU, TP, FN, FP of windows of ``k`` frames."""
        c = self._counts[k]
        if self.average_over == "all":
            sq = c.iou / (c.tp + _ALL_CLASSES_EPS)
            rq = c.tp / (c.tp + 0.5 * c.fn + 0.5 * c.fp + _ALL_CLASSES_EPS)
        else:  # 0 where undefined (DeepLab2's divide_no_nan)
            sq = np.divide(c.iou, c.tp, out=np.zeros(self.num_classes), where=c.tp > 0)
            denominator = c.tp + 0.5 * c.fn + 0.5 * c.fp
            rq = np.divide(c.tp, denominator, out=np.zeros(self.num_classes), where=denominator > 0)
        return {
            "PQ": sq * rq,
            "SQ": sq,
            "RQ": rq,
            "IoU": c.iou.copy(),
            "TP": c.tp.copy(),
            "FN": c.fn.copy(),
            "FP": c.fp.copy(),
        }

    def result(self) -> dict[str, Any]:
        """VPQ, VPQ_th, VPQ_st (means over k) and, per k, ``VPQ@k``, ``VPQ_th@k``,
        ``VPQ_st@k``, ``VSQ@k``, ``VRQ@k`` and ``windows@k`` (windows scored); fractions."""
        out: dict[str, Any] = {}
        splits = {"": np.ones(self.num_classes, bool), "_th": self._is_thing}
        splits["_st"] = ~self._is_thing
        for k in self.window_sizes:
            c = self._counts[k]
            classes = self.per_class(k)
            present = (c.tp + c.fn + c.fp) > 0
            if self.average_over == "all":
                present = np.ones(self.num_classes, bool)
            for suffix, split in splits.items():
                out[f"VPQ{suffix}@{k}"] = _mean(classes["PQ"][split & present])
            out[f"VSQ@{k}"] = _mean(classes["SQ"][present])
            out[f"VRQ@{k}"] = _mean(classes["RQ"][present])
            out[f"windows@{k}"] = self._windows[k]
        for suffix in splits:
            out[f"VPQ{suffix}"] = float(
                np.mean([out[f"VPQ{suffix}@{k}"] for k in self.window_sizes])
            )
        return out


# ------------------------------------------------------------------------------------ evaluator
class VideoPanopticEvaluator(DatasetEvaluator):
    """STQ (AQ, SQ) and VPQ of a video panoptic model's per-frame ``panoptic_seg`` outputs.

    Classes come from the dataset's metadata: the contiguous ids of
    ``thing_dataset_id_to_contiguous_id`` (the things) and ``stuff_dataset_id_to_contiguous_id``
    must together be 0 .. C - 1; void is ``ignore_label`` (default 255). Each input record has
    ``video_id`` and ``frame_index``; the frames of a video must come in increasing
    ``frame_index`` order (videos may interleave). The prediction of a frame becomes:

    - semantic = the ``category_id`` of the pixel's segment; pixels of id 0 (no segment) get
      ``unassigned_label``, 0 by default as the official Video K-Net scripts write there (it
      scores those pixels as class 0; ``ignore_label`` would leave them out);
    - instance = the ``track_id`` of a thing segment (>= 1 tracked, 0 untracked), 0 for stuff.

    The ground truth comes from ``read_ground_truth(record) -> (semantic, instance)`` at the
    prediction's resolution (default: ``knet.data.datasets.video.read_panoptic_frame``).

    STQ uses DeepLab2's b = 16, offset 2**24. Video tracking runs in one process over whole
    videos, and Detectron2's inference sampler would split videos between processes, so the
    evaluator refuses to run with more than one process (``RuntimeError``).

    ``evaluate()`` returns ``{"video_panoptic_seg": {"STQ", "AQ", "SQ", "VPQ", "VPQ@k" ...,
    "VPQ_th", "VPQ_st", "VPQ_th@k", "VPQ_st@k"}}`` in percent, logs them and writes them with
    the per-sequence STQ to ``output_dir/video_panoptic_results.json`` when given.
    """

    def __init__(
        self,
        dataset_name: str,
        read_ground_truth: GroundTruthReader | None = None,
        vpq_window_sizes: Sequence[int] = (1, 2, 4, 6),
        unassigned_label: int = 0,
        output_dir: str | None = None,
        vpq_average_over: str = "present",
    ) -> None:
        metadata = MetadataCatalog.get(dataset_name)
        things = sorted(set(metadata.thing_dataset_id_to_contiguous_id.values()))
        stuff = sorted(set(metadata.get("stuff_dataset_id_to_contiguous_id", {}).values()))
        classes = sorted(set(things) | set(stuff))
        if not classes or classes != list(range(len(classes))):
            raise ValueError(
                f"dataset {dataset_name!r}: the contiguous ids of thing_dataset_id_to_contiguous_id"
                f" and stuff_dataset_id_to_contiguous_id must be 0 .. C - 1, got {classes}"
            )
        self._dataset_name = dataset_name
        self._num_classes = len(classes)
        self._things = things
        self._ignore_label = int(metadata.get("ignore_label", 255))
        if not (
            0 <= unassigned_label < self._num_classes or unassigned_label == self._ignore_label
        ):
            raise ValueError(
                f"unassigned_label {unassigned_label} is neither a class id in "
                f"[0, {self._num_classes}) nor the ignore label {self._ignore_label}"
            )
        self._unassigned_label = int(unassigned_label)
        if read_ground_truth is None:
            from ..data.datasets.video import read_panoptic_frame

            read_ground_truth = read_panoptic_frame
        self._read_ground_truth = read_ground_truth
        self._window_sizes = tuple(vpq_window_sizes)
        self._average_over = vpq_average_over
        self._output_dir = output_dir
        self.reset()

    def reset(self) -> None:
        self._check_single_process()
        self._stq = SegmentationAndTrackingQuality(
            self._num_classes, self._things, self._ignore_label, label_bit_shift=16, offset=2**24
        )
        self._vpq = VideoPanopticQuality(
            self._num_classes,
            self._things,
            self._ignore_label,
            self._window_sizes,
            self._average_over,
        )
        self._last_frame: dict[Hashable, int] = {}

    def _check_single_process(self) -> None:
        if comm.get_world_size() > 1:
            raise RuntimeError(
                f"VideoPanopticEvaluator on {self._dataset_name!r}: video evaluation needs every "
                f"frame of a video, in order, in one process, but the world size is "
                f"{comm.get_world_size()}; evaluate with one process"
            )

    def _prediction_maps(self, panoptic_seg: Any) -> tuple[np.ndarray, np.ndarray]:
        """(semantic, instance) int64 maps of one frame's ``panoptic_seg`` output."""
        ids, segments_info = panoptic_seg
        if segments_info is None:
            raise ValueError("panoptic_seg without segments_info is not supported")
        ids = ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)
        ids = ids.astype(np.int64)
        if ids.ndim != 2 or (ids.size and ids.min() < 0):
            raise ValueError(f"panoptic ids must be a (H, W) map of ids >= 0, got {ids.shape}")
        size = max([int(ids.max()) if ids.size else 0] + [int(s["id"]) for s in segments_info])
        semantic = np.full(size + 1, -1, dtype=np.int64)  # -1: an id without segments_info
        instance = np.zeros(size + 1, dtype=np.int64)
        semantic[0] = self._unassigned_label
        for s in segments_info:
            semantic[s["id"]] = s["category_id"]
            if s["isthing"]:
                if "track_id" not in s:
                    raise ValueError(f"thing segment {s['id']} has no 'track_id': {s}")
                instance[s["id"]] = s["track_id"]
        pixel_semantic = semantic[ids]
        if (pixel_semantic < 0).any():
            unknown = np.unique(ids[pixel_semantic < 0])[:5].tolist()
            raise ValueError(f"segment ids {unknown} of the panoptic map are not in segments_info")
        return pixel_semantic, instance[ids]

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for record, output in zip(inputs, outputs):
            video, frame = record["video_id"], int(record["frame_index"])
            last = self._last_frame.get(video)
            if last is not None and frame <= last:
                raise ValueError(
                    f"video {video!r}: frame_index {frame} comes after frame_index {last}; the "
                    "frames of a video must be evaluated in increasing frame_index order"
                )
            semantic_pred, instance_pred = self._prediction_maps(output["panoptic_seg"])
            semantic_gt, instance_gt = (np.asarray(a) for a in self._read_ground_truth(record))
            try:
                for metric in (self._stq, self._vpq):
                    metric.update(semantic_gt, instance_gt, semantic_pred, instance_pred, video)
            except ValueError as e:
                raise ValueError(f"video {video!r}, frame_index {frame}: {e}") from e
            self._last_frame[video] = frame

    def evaluate(self) -> dict[str, dict[str, float]]:
        self._check_single_process()
        if not self._last_frame:
            logger.warning("VideoPanopticEvaluator on %r got no frames", self._dataset_name)
            return {}
        stq, vpq = self._stq.result(), self._vpq.result()
        res = {"STQ": stq["STQ"], "AQ": stq["AQ"], "SQ": stq["IoU"], "VPQ": vpq["VPQ"]}
        res.update({f"VPQ@{k}": vpq[f"VPQ@{k}"] for k in self._window_sizes})
        for split in ("_th", "_st"):
            res[f"VPQ{split}"] = vpq[f"VPQ{split}"]
            res.update({f"VPQ{split}@{k}": vpq[f"VPQ{split}@{k}"] for k in self._window_sizes})
        res = {name: 100 * value for name, value in res.items()}
        logger.info(
            "Video panoptic evaluation of %r (%d videos, %d frames; VPQ over %s classes):\n%s",
            self._dataset_name,
            len(stq["ID_per_seq"]),
            sum(stq["Length_per_seq"]),
            self._average_over,
            create_small_table({k: res[k] for k in ("STQ", "AQ", "SQ", "VPQ")}),
        )
        per_k = {f"VPQ{s}@{k}": res[f"VPQ{s}@{k}"] for k in self._window_sizes for s in ("", "_th")}
        logger.info("VPQ per window size k (frames):\n%s", create_small_table(per_k))
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "video_panoptic_results.json")
            per_sequence = {
                str(q): {"STQ": s, "AQ": a, "SQ": i, "frames": n}
                for q, s, a, i, n in zip(
                    stq["ID_per_seq"],
                    stq["STQ_per_seq"],
                    stq["AQ_per_seq"],
                    stq["IoU_per_seq"],
                    stq["Length_per_seq"],
                )
            }
            with PathManager.open(path, "w") as f:
                json.dump({"metrics": res, "per_sequence": per_sequence}, f, indent=1)
        return {"video_panoptic_seg": res}


class YouTubeVISResultsWriter(DatasetEvaluator):
    """Writes a clip-level model's video outputs (``VideoKNetClip``: one output per video with
    "pred_scores", "pred_labels", "pred_masks" (k, T, H, W)) as the YouTube-VIS results file,
    ``output_dir/results.json``: ``[{"video_id", "category_id", "score", "segmentations": [RLE
    per frame, None where the mask is empty]}]`` with the json's video and category ids.

    The YouTube-VIS validation labels are not public: mask AP comes from the benchmark server
    (zip ``results.json`` and upload it), so ``evaluate`` returns no numbers.
    """

    def __init__(self, dataset_name: str, output_dir: str | None = None) -> None:
        metadata = MetadataCatalog.get(dataset_name)
        contiguous = metadata.thing_dataset_id_to_contiguous_id
        self._dataset_ids = {v: int(k) for k, v in contiguous.items()}
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self.reset()

    def reset(self) -> None:
        self._results: list[dict] = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        import pycocotools.mask as mask_util

        for clip, output in zip(inputs, outputs):
            masks = output["pred_masks"].cpu().numpy()
            for score, label, tube in zip(
                output["pred_scores"].tolist(), output["pred_labels"].tolist(), masks
            ):
                rles = mask_util.encode(np.asfortranarray(tube.transpose(1, 2, 0).astype(np.uint8)))
                segmentations = [
                    {"size": r["size"], "counts": r["counts"].decode()} if m.any() else None
                    for r, m in zip(rles, tube)
                ]
                self._results.append(
                    {
                        "video_id": clip.get("dataset_video_id", clip["video_id"]),
                        "category_id": self._dataset_ids[int(label)],
                        "score": float(score),
                        "segmentations": segmentations,
                    }
                )

    def evaluate(self) -> dict:
        results = [r for part in comm.gather(self._results) for r in part]
        if not comm.is_main_process():
            return {}
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "results.json")
            with PathManager.open(path, "w") as f:
                json.dump(results, f)
            logger.info(
                "%d objects of %r written to %s: zip it and upload it to the YouTube-VIS server "
                "for mask AP",
                len(results),
                self._dataset_name,
                path,
            )
        return {}
