"""Brute-force STQ and VPQ written from their definitions, for the tests.

Pixels are (sequence, frame, row, column) tuples, segments and tubes Python sets of them, and
every quantity a loop over tubes / segments with set intersections and unions: slow, but with
nothing in common with the vectorised implementation (no packed ids, no confusion matrix).

Definitions (DeepLab2's STQ; VPQ as image PQ on windows of k frames side by side):

- STQ: a ground-truth tube is the pixels of one (thing class, instance != 0) in a sequence, a
  predicted tube those of one (thing class, instance), crowd pixels (thing ground truth with
  instance 0) excluded from both. AQ = sum over sequences and ground-truth tubes g of
  1/|g| sum_p |g∩p|^2 / |g∪p|, divided by the number of ground-truth tubes. SQ: per label c
  (classes and the void label) IoU_c = |G_c ∩ P_c| / |G_c ∪ (P_c minus void)|, where G_c are the
  non-void ground-truth pixels of class c (none for void) and P_c the pixels predicted c;
  averaged over the labels with a non-empty union.
- VPQ: in a window, segments are the pixels of one (class, instance) over its frames, ground-
  truth void one region; same-class pairs with |g∩p| / (|g∪p| - |p∩void|) > 0.5 are TP,
  other ground-truth segments FN, other predicted segments FP unless they are void or more
  than half on void.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

# one frame: (semantic_gt, instance_gt, semantic_pred, instance_pred), 2-D arrays
Frame = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _pixels(frame: Frame):
    """Yield ((row, column), semantic_gt, instance_gt, semantic_pred, instance_pred)."""
    sg, ig, sp, ip = frame
    for y in range(sg.shape[0]):
        for x in range(sg.shape[1]):
            yield (y, x), int(sg[y, x]), int(ig[y, x]), int(sp[y, x]), int(ip[y, x])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _class_iou(pixels: list[tuple], num_classes: int, ignore_label: int) -> float:
    """Mean IoU over the labels of non-empty union; ``pixels``: (key, gt label, predicted label)."""
    gt, pred, void = defaultdict(set), defaultdict(set), set()
    for key, sg, sp in pixels:
        if sg == ignore_label:
            void.add(key)
        else:
            gt[sg].add(key)
        pred[sp].add(key)
    ious = []
    for label in sorted(set(range(num_classes)) | {ignore_label}):
        g, p = gt.get(label, set()), pred.get(label, set()) - void
        union = g | p
        if union:
            ious.append(len(g & p) / len(union))
    return _mean(ious)


def stq_reference(
    sequences: dict, num_classes: int, things: Sequence[int], ignore_label: int
) -> dict:
    """STQ, AQ, IoU and the per-sequence lists of ``sequences``: id -> list of frames."""
    things = set(things)
    aq_sums, tube_counts, ious, all_pixels = [], [], [], []
    for seq_id, frames in sequences.items():
        gt_tubes, pred_tubes, seq_pixels = defaultdict(set), defaultdict(set), []
        for t, frame in enumerate(frames):
            for (y, x), sg, ig, sp, ip in _pixels(frame):
                key = (seq_id, t, y, x)
                seq_pixels.append((key, sg, sp))
                crowd = sg in things and ig == 0
                if sg in things and not crowd:
                    gt_tubes[(sg, ig)].add(key)
                if sp in things and not crowd:
                    pred_tubes[(sp, ip)].add(key)
        aq = 0.0
        for g in gt_tubes.values():
            inner = 0.0
            for p in pred_tubes.values():
                tpa = len(g & p)
                if tpa:
                    inner += tpa * tpa / len(g | p)
            aq += inner / len(g)
        aq_sums.append(aq)
        tube_counts.append(len(gt_tubes))
        ious.append(_class_iou(seq_pixels, num_classes, ignore_label))
        all_pixels += seq_pixels
    n_tubes = sum(tube_counts)
    aq_total = sum(aq_sums) / n_tubes if n_tubes else 0.0
    iou_total = _class_iou(all_pixels, num_classes, ignore_label)
    aq_per_seq = [a / n if n else 0.0 for a, n in zip(aq_sums, tube_counts)]
    return {
        "STQ": math.sqrt(aq_total * iou_total),
        "AQ": aq_total,
        "IoU": iou_total,
        "AQ_per_seq": aq_per_seq,
        "IoU_per_seq": ious,
        "STQ_per_seq": [math.sqrt(a * i) for a, i in zip(aq_per_seq, ious)],
        "Length_per_seq": [len(f) for f in sequences.values()],
    }


def window_counts(
    frames: Sequence[Frame], num_classes: int, ignore_label: int
) -> dict[str, list[float]]:
    """Per-class IoU sum, TP, FN, FP of one window of frames (one image of segments)."""
    gt, pred, void = defaultdict(set), defaultdict(set), set()
    for t, frame in enumerate(frames):
        for (y, x), sg, ig, sp, ip in _pixels(frame):
            key = (t, y, x)
            if sg == ignore_label:
                void.add(key)
            else:
                gt[(sg, ig)].add(key)
            pred[(sp, 0 if sp == ignore_label else ip)].add(key)
    counts = {name: [0.0] * num_classes for name in ("IoU", "TP", "FN", "FP")}
    gt_matched, pred_matched = set(), set()
    for g_id, g in gt.items():
        for p_id, p in pred.items():
            if g_id[0] != p_id[0]:
                continue
            iou = len(g & p) / (len(g | p) - len(p & void))
            if iou > 0.5:
                assert g_id not in gt_matched and p_id not in pred_matched  # matches are unique
                gt_matched.add(g_id)
                pred_matched.add(p_id)
                counts["TP"][g_id[0]] += 1
                counts["IoU"][g_id[0]] += iou
    for g_id in gt:
        if g_id not in gt_matched:
            counts["FN"][g_id[0]] += 1
    for p_id, p in pred.items():
        if p_id in pred_matched or p_id[0] == ignore_label:
            continue
        if len(p & void) / len(p) > 0.5:
            continue
        counts["FP"][p_id[0]] += 1
    return counts


def pq_from_counts(
    counts: dict[str, list[float]], classes: Sequence[int], average_over: str
) -> float:
    """Mean PQ over ``classes``: "present" (TP + FN + FP > 0) or "all" (1e-10 guards)."""
    values = []
    for c in classes:
        iou, tp, fn, fp = (counts[name][c] for name in ("IoU", "TP", "FN", "FP"))
        if average_over == "all":
            values.append(iou / (tp + 1e-10) * tp / (tp + fn / 2 + fp / 2 + 1e-10))
        elif tp + fn + fp > 0:
            values.append(iou / tp * tp / (tp + fn / 2 + fp / 2) if tp else 0.0)
    return _mean(values)


def vpq_reference(
    sequences: dict,
    num_classes: int,
    things: Sequence[int],
    ignore_label: int,
    window_sizes: Sequence[int],
    average_over: str = "present",
) -> dict[str, float]:
    """VPQ@k, VPQ_th@k, VPQ_st@k per k and their means over k, of ``sequences``."""
    things = sorted(set(things))
    stuff = [c for c in range(num_classes) if c not in things]
    splits = {"": list(range(num_classes)), "_th": things, "_st": stuff}
    out = {}
    for k in window_sizes:
        total = {name: [0.0] * num_classes for name in ("IoU", "TP", "FN", "FP")}
        for frames in sequences.values():
            for start in range(len(frames) - k + 1):
                counts = window_counts(frames[start : start + k], num_classes, ignore_label)
                for name in total:
                    total[name] = [a + b for a, b in zip(total[name], counts[name])]
        for suffix, classes in splits.items():
            out[f"VPQ{suffix}@{k}"] = pq_from_counts(total, classes, average_over)
    for suffix in splits:
        out[f"VPQ{suffix}"] = _mean([out[f"VPQ{suffix}@{k}"] for k in window_sizes])
    return out
