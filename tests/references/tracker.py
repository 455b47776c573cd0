"""Video K-Net's quasi-dense embedding tracker, restated as plain loops over Python numbers.

Written from the specification of the official ``QuasiDenseEmbedTracker`` (lxtGH/Video-K-Net,
``knet/video/qdtrack/trackers/quasi_dense_embed_tracker.py``) and its caller, without the
project's code. Tracks live in a dict (insertion order = birth order), backdrops in a list of
frames (newest first), and every number is a Python float. :meth:`ReferenceTracker.match`
returns what the official tracker returns, the ids of the kept detections in score order,
together with the input position of each. :func:`input_order_ids` and :func:`official_order_ids`
turn that into per-input ids.
"""

from __future__ import annotations

import math

import torch

EMPTY_MASK_BOX = (-1.0, -1.0, 10.0, 10.0)


def reference_mask_box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """Tight box of one (H, W) mask from its nonzero pixels, inclusive indices, no +1."""
    pixels = mask.nonzero().tolist()  # [[row, col], ...]
    if not pixels:
        return EMPTY_MASK_BOX
    rows = [p[0] for p in pixels]
    cols = [p[1] for p in pixels]
    return (float(min(cols)), float(min(rows)), float(max(cols)), float(max(rows)))


def reference_iou(a: list[float], b: list[float]) -> float:
    """IoU of two XYXY boxes with the union clamped to 1e-6 (zero area -> IoU 0)."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    union = max(area_a + area_b - inter, 1e-6)
    return inter / union


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _dot(u: list[float], v: list[float]) -> float:
    return sum(x * y for x, y in zip(u, v))


def _unit(u: list[float]) -> list[float]:
    norm = max(math.sqrt(_dot(u, u)), 1e-12)
    return [x / norm for x in u]


class ReferenceTracker:
    """One video's tracker. Thresholds have the names and defaults of the project's tracker."""

    def __init__(
        self,
        init_score_thresh: float = 0.35,
        obj_score_thresh: float = 0.3,
        match_score_thresh: float = 0.5,
        memo_tracklet_frames: int = 5,
        memo_backdrop_frames: int = 1,
        memo_momentum: float = 0.8,
        nms_conf_thresh: float = 0.5,
        nms_backdrop_iou_thresh: float = 0.3,
        nms_class_iou_thresh: float = 0.7,
        with_cats: bool = True,
        match_metric: str = "bisoftmax",
    ) -> None:
        self.init_thr = init_score_thresh
        self.obj_thr = obj_score_thresh
        self.match_thr = match_score_thresh
        self.track_frames = memo_tracklet_frames
        self.backdrop_frames = memo_backdrop_frames
        self.momentum = memo_momentum
        self.nms_conf = nms_conf_thresh
        self.backdrop_iou = nms_backdrop_iou_thresh
        self.class_iou = nms_class_iou_thresh
        self.with_cats = with_cats
        self.metric = match_metric
        self.next_id = 0
        self.tracks: dict[int, dict] = {}  # id -> embed, label, box, last
        self.backdrops: list[list[dict]] = []  # frames, newest first; each a list of entries

    def match(self, boxes, scores, labels, embeds, frame_id: int) -> tuple[list[int], list[int]]:
        """-> (input positions of the kept detections in score order, their ids)."""
        n = len(scores)
        dets = [
            {
                "pos": k,
                "box": [float(v) for v in boxes[k]],
                "score": float(scores[k]),
                "label": int(labels[k]),
                "embed": [float(v) for v in embeds[k]],
            }
            for k in range(n)
        ]
        dets.sort(key=lambda d: -d["score"])  # Python's sort is stable

        # duplicate removal: against every higher-scored detection, removed or not
        kept = []
        for i, det in enumerate(dets):
            thr = self.backdrop_iou if det["score"] < self.obj_thr else self.class_iou
            if not any(reference_iou(det["box"], dets[j]["box"]) > thr for j in range(i)):
                kept.append(det)

        ids = [-1] * len(kept)
        if kept and self.tracks:
            memory = [(tid, t["embed"], t["label"]) for tid, t in self.tracks.items()]
            for frame in self.backdrops:
                memory += [(-1, b["embed"], b["label"]) for b in frame]
            sim = self._similarity([d["embed"] for d in kept], [m[1] for m in memory])
            for i, det in enumerate(kept):
                for j, (_, _, label) in enumerate(memory):
                    if self.with_cats and det["label"] != label:
                        sim[i][j] = 0.0
            for i, det in enumerate(kept):
                best = 0
                for j in range(1, len(memory)):
                    if sim[i][j] > sim[i][best]:
                        best = j
                conf, tid = sim[i][best], memory[best][0]
                if conf > self.match_thr and tid >= 0:
                    if det["score"] > self.obj_thr:
                        ids[i] = tid
                        for other in range(len(kept)):
                            if other != i:
                                sim[other][best] = 0.0
                    elif conf > self.nms_conf:
                        ids[i] = -2
        for i, det in enumerate(kept):
            if ids[i] == -1 and det["score"] > self.init_thr:
                ids[i] = self.next_id
                self.next_id += 1

        # memory: tracks, then backdrops, then deaths
        m = self.momentum
        for i, det in enumerate(kept):
            tid = ids[i]
            if tid < 0:
                continue
            if tid in self.tracks:
                track = self.tracks[tid]
                track["embed"] = [(1 - m) * o + m * e for o, e in zip(track["embed"], det["embed"])]
                track.update(box=det["box"], label=det["label"], last=frame_id)
            else:
                self.tracks[tid] = {
                    "embed": list(det["embed"]),
                    "label": det["label"],
                    "box": det["box"],
                    "last": frame_id,
                }
        frame = []
        for i, det in enumerate(kept):
            if ids[i] != -1:
                continue
            if any(reference_iou(det["box"], kept[j]["box"]) > self.backdrop_iou for j in range(i)):
                continue
            frame.append({"embed": det["embed"], "label": det["label"], "box": det["box"]})
        self.backdrops.insert(0, frame)
        for tid in list(self.tracks):
            if frame_id - self.tracks[tid]["last"] >= self.track_frames:
                del self.tracks[tid]
        del self.backdrops[self.backdrop_frames :]
        return [d["pos"] for d in kept], ids

    def _similarity(self, dets: list[list[float]], memory: list[list[float]]) -> list[list[float]]:
        if self.metric == "cosine":
            return [[_dot(_unit(d), _unit(e)) for e in memory] for d in dets]
        feats = [[_dot(d, e) for e in memory] for d in dets]
        rows = [_softmax(row) for row in feats]
        if self.metric == "softmax":
            return rows
        cols = [_softmax([feats[i][j] for i in range(len(dets))]) for j in range(len(memory))]
        return [
            [(rows[i][j] + cols[j][i]) / 2 for j in range(len(memory))] for i in range(len(dets))
        ]


def input_order_ids(n: int, positions: list[int], ids: list[int]) -> list[int]:
    """Ids in the input order; detections removed as duplicates get -1."""
    out = [-1] * n
    for pos, tid in zip(positions, ids):
        out[pos] = tid
    return out


def official_order_ids(n: int, ids: list[int]) -> list[int]:
    """What the official caller paints: the k-th returned id on the k-th input, -1 (no id) on
    the inputs past the returned ones."""
    return list(ids) + [-1] * (n - len(ids))
