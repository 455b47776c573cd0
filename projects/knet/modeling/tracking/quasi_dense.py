"""Online quasi-dense embedding tracker of Video K-Net.

Each frame the model hands over its thing segments: a box, a score, a class and an association
embedding (C,) per segment. The tracker links them to the tracks it remembers and returns one
track id per segment. The official tracker is lxtGH/Video-K-Net
``knet/video/qdtrack/trackers/quasi_dense_embed_tracker.py`` (``QuasiDenseEmbedTracker``), and
its caller is ``simple_test`` of ``knet/video/knet_quansi_dense_embed_fc_joint_train.py``.
This module computes the same ids. The one deliberate difference, the order of the ids, is
described under *Ids* below.

One call of :meth:`QuasiDenseTracker.match` on n detections:

1. sort by score, descending (stable: equal scores keep their input order);
2. remove duplicates. Detection i (sorted) is dropped when ``IoU(i, j) > thr_i`` for some j < i,
   with ``thr_i = nms_backdrop_iou_thresh`` if ``s_i < obj_score_thresh`` else
   ``nms_class_iou_thresh``. Every higher-scored j counts, including detections that were
   themselves dropped. The IoU is class-agnostic. The m detections left are matched;
3. associate them with the memory, if both are non-empty. The memory holds the T tracks
   (ascending ids) and then the B backdrops (id -1), most recent frame first:
   ``F = E M^T`` (m, T+B) of raw dot products and, for ``bisoftmax``,
   ``S = (softmax_row(F) + softmax_col(F)) / 2``. With ``with_cats``,
   ``S <- S * [label_i == label_j]``. Then a greedy pass in score order: ``(conf, j) =
   max_j S_ij`` (the first j on ties). If ``conf > match_score_thresh`` and j is a track:
   a detection with ``s_i > obj_score_thresh`` takes the track and zeroes column j for the
   detections after it. Otherwise it is a suppressed duplicate (-2) if ``conf >
   nms_conf_thresh``. A best match to a backdrop leaves -1;
4. births: every detection still at -1 with ``s_i > init_score_thresh`` gets the next id of a
   running counter (in score order);
5. update the memory:

   - a matched track takes ``e <- (1 - m) e_old + m e_new``. ``m = memo_momentum`` weighs the
     *new* embedding, and the expression is evaluated in exactly this form. Its box, label and
     last frame are refreshed;
   - born tracks are appended as they are;
   - the detections still at -1 become this frame's backdrops, except those with
     ``IoU > nms_backdrop_iou_thresh`` to any earlier of the m detections, whatever that
     detection's id. Only the newest ``memo_backdrop_frames`` frames of backdrops are kept;
   - a track dies when ``frame_id - last_frame >= memo_tracklet_frames``. The check runs after
     the frame's matching, so a track last seen at f can still be matched at f + 5 (default).

The memory changes only when ``match`` is called. The official caller skips frames without
thing segments, so on those frames no track dies and the backdrops stay. Call ``match`` on the
same frames as the official caller to get the same ids. A call with n = 0 behaves as in the
official tracker: it empties the newest backdrop frame and runs the death check.

Ids: ``match`` returns (n,) int64 ids aligned with its *input* order:

- ``>= 0``: a track id (the official output paints track id + 1);
- ``-1`` (:data:`UNASSIGNED`): not matched and not born, *or* removed by the duplicate removal;
- ``-2`` (:data:`SUPPRESSED`): a low-scored duplicate of a track that already exists.

The official caller paints both -1 and -2 as 0 (no track). The official tracker returns its ids
in sorted and filtered order, and its caller paints ``ids[k]`` onto the k-th unsorted segment.
Sorting changes little there, because segments already come by descending score. But every
removed duplicate shifts the ids of all later segments, and the last ones get no id. With
``official_id_alignment=True``, ``match`` reproduces that: the ids of the m kept detections in
score order go to input positions 0..m-1, and positions m..n-1 get -1.

Tracker boxes come from the segment masks with :func:`masks_to_tracker_boxes`. They only
matter for the duplicate removal and the backdrops. Matching uses the embeddings alone.

All state is plain tensors (:meth:`~QuasiDenseTracker.state_dict`). The per-frame network can
therefore be exported without the tracker, and a video can be paused and resumed.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

UNASSIGNED = -1  # not matched, not born, or removed as a duplicate box
SUPPRESSED = -2  # a low-scored duplicate of an existing track
EMPTY_MASK_BOX = (-1.0, -1.0, 10.0, 10.0)  # the official box of an empty mask
IOU_EPS = 1e-6  # the union is clamped to this (MMDetection's bbox_overlaps)
MATCH_METRICS = ("bisoftmax", "softmax", "cosine")
_STATE_KEYS = (
    "num_tracks",
    "track_ids",
    "track_labels",
    "track_boxes",
    "track_embeds",
    "track_last_frames",
    "backdrop_counts",
    "backdrop_labels",
    "backdrop_boxes",
    "backdrop_embeds",
)


# ----------------------------------------------------------------------------- boxes
def masks_to_tracker_boxes(masks: Tensor) -> Tensor:
    """(n, H, W) masks (bool, or any dtype, nonzero = inside) -> (n, 4) float32 boxes of the
    official tracker.

    A box is ``(x_min, y_min, x_max, y_max)`` of the mask's pixels, *inclusive* pixel indices
    with no +1. A single pixel therefore gives a zero-area box, and a one-pixel-wide mask does
    too. An empty mask gives :data:`EMPTY_MASK_BOX` ``(-1, -1, 10, 10)``, so empty masks are
    duplicates of each other. The semantic filter of the official caller (mask AND
    thing pixels of the semantic argmax) is applied by the caller, before this.
    """
    n, height, width = masks.shape
    pixels = (masks != 0).to(torch.uint8)  # amax over uint8: bool reductions are slower
    extents = []
    for hit, size in ((pixels.amax(dim=1), width), (pixels.amax(dim=2), height)):  # x, then y
        first = hit.argmax(dim=1)  # argmax returns the first maximum
        last = size - 1 - hit.flip(1).argmax(dim=1)
        extents.append((first, last))
    (x0, x1), (y0, y1) = extents
    nonempty = (
        pixels.flatten(1).amax(dim=1) > 0
        if height * width
        else masks.new_zeros(n, dtype=torch.bool)
    )
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    fallback = torch.tensor(EMPTY_MASK_BOX, device=masks.device).expand(n, 4)
    return torch.where(nonempty[:, None], boxes, fallback)


def tracker_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(n, 4), (k, 4) XYXY -> (n, k) IoU, ``overlap / max(union, 1e-6)``, as the official
    tracker's ``bbox_overlaps``.

    A zero-area box has IoU 0 with every box, itself included. ``torchvision.ops.box_iou``
    divides by the unclamped union. It returns NaN (0/0) for two zero-area boxes and values
    above 1 for degenerate boxes (x_max < x_min), so it is not used here.
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1[:, None] + area2[None, :] - overlap).clamp(min=IOU_EPS)
    return overlap / union


def _overlaps_earlier(iou: Tensor, thresh: Tensor | float) -> Tensor:
    """(m, m) IoU of score-sorted boxes -> (m,) bool: ``IoU(i, j) > thresh_i`` for some j < i."""
    m = iou.shape[0]
    earlier = torch.ones(m, m, dtype=torch.bool, device=iou.device).tril(diagonal=-1)
    if isinstance(thresh, Tensor):
        thresh = thresh[:, None]
    return ((iou > thresh) & earlier).any(dim=1)


def _cat(first: Tensor, second: Tensor) -> Tensor:
    """``cat([first, second])`` in the dtype and on the device of ``first``. An operand without
    rows is skipped: an empty memory tensor may still sit on the CPU with 0 columns."""
    if second.shape[0] == 0:
        return first.clone()
    if first.shape[0] == 0:
        return second.clone()
    return torch.cat([first, second.to(first)])


# ----------------------------------------------------------------------------- tracker
class QuasiDenseTracker:
    """The quasi-dense embedding tracker of Video K-Net, one video at a time (see the module's
    docstring for the algorithm and the id convention).

    A plain object, not an ``nn.Module``: its state is a few tensors that
    :meth:`state_dict` / :meth:`load_state_dict` save and restore. The defaults are those of the
    released Video K-Net configs (KITTI-STEP and VIPSeg). The tracker class's own defaults are
    init 0.8, obj 0.5 and 10 memory frames.

    Args:
        init_score_thresh: a detection is born as a new track when ``score > this``.
        obj_score_thresh: a detection may take a track when ``score > this``. Below it, the
            duplicate removal uses ``nms_backdrop_iou_thresh``.
        match_score_thresh: the similarity a match needs (``conf > this``).
        memo_tracklet_frames: a track dies when ``frame_id - last_frame >= this``.
        memo_backdrop_frames: how many frames of backdrops are remembered.
        memo_momentum: m in ``e <- (1 - m) e_old + m e_new`` (the weight of the new embedding).
        nms_conf_thresh: a low-scored detection whose best track has ``conf > this`` gets -2.
        nms_backdrop_iou_thresh: IoU of duplicate removal for low scores, and of the backdrop
            filter.
        nms_class_iou_thresh: IoU of duplicate removal for ``score >= obj_score_thresh``.
        with_cats: a detection only matches tracks and backdrops of its class.
        match_metric: "bisoftmax" (the released configs), "softmax" (rows only) or "cosine".
        official_id_alignment: return the ids in the official caller's misaligned order
            (see the module's docstring). Only for comparisons with official outputs.
    """

    def __init__(
        self,
        *,
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
        official_id_alignment: bool = False,
    ) -> None:
        if not 0.0 <= memo_momentum <= 1.0:
            raise ValueError(f"memo_momentum must lie in [0, 1], got {memo_momentum}")
        if memo_tracklet_frames < 0 or memo_backdrop_frames < 0:
            raise ValueError("memo_tracklet_frames and memo_backdrop_frames must be >= 0")
        if match_metric not in MATCH_METRICS:
            raise ValueError(f"match_metric must be one of {MATCH_METRICS}, got {match_metric!r}")
        self.init_score_thresh = init_score_thresh
        self.obj_score_thresh = obj_score_thresh
        self.match_score_thresh = match_score_thresh
        self.memo_tracklet_frames = memo_tracklet_frames
        self.memo_backdrop_frames = memo_backdrop_frames
        self.memo_momentum = memo_momentum
        self.nms_conf_thresh = nms_conf_thresh
        self.nms_backdrop_iou_thresh = nms_backdrop_iou_thresh
        self.nms_class_iou_thresh = nms_class_iou_thresh
        self.with_cats = with_cats
        self.match_metric = match_metric
        self.official_id_alignment = official_id_alignment
        self.reset()

    def options(self) -> dict:
        """The constructor's arguments (an exported model stores them to track as the model)."""
        names = inspect.signature(QuasiDenseTracker.__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self"}

    # ------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget everything (a new video starts): no tracks, no backdrops, next id 0."""
        self._num_tracks = 0
        # tracks, ascending ids (= birth order, the official memory order)
        self._track_ids = torch.zeros(0, dtype=torch.int64)
        self._track_labels = torch.zeros(0, dtype=torch.int64)
        self._track_boxes = torch.zeros(0, 4)
        self._track_embeds = torch.zeros(0, 0)
        self._track_last_frames = torch.zeros(0, dtype=torch.int64)
        # backdrops of the remembered frames, newest frame first; counts: rows per frame
        self._backdrop_counts = torch.zeros(0, dtype=torch.int64)
        self._backdrop_labels = torch.zeros(0, dtype=torch.int64)
        self._backdrop_boxes = torch.zeros(0, 4)
        self._backdrop_embeds = torch.zeros(0, 0)

    @property
    def empty(self) -> bool:
        """True when no track is remembered (backdrops alone do not count, as officially: with
        no track there is nothing to match)."""
        return self._track_ids.numel() == 0

    @property
    def num_tracks(self) -> int:
        """How many ids were handed out since the last reset (the next id)."""
        return self._num_tracks

    def state_dict(self) -> dict[str, Tensor]:
        """The whole state as plain tensors (copies): ``num_tracks`` () int64; ``track_ids``,
        ``track_labels``, ``track_last_frames`` (T,) int64, ``track_boxes`` (T, 4),
        ``track_embeds`` (T, C); ``backdrop_counts`` (F,) int64 rows per remembered frame,
        newest first, ``backdrop_labels`` (B,), ``backdrop_boxes`` (B, 4), ``backdrop_embeds``
        (B, C). Before the first detection, C is 0."""
        state = {key: getattr(self, "_" + key) for key in _STATE_KEYS[1:]}
        state = {key: value.clone() for key, value in state.items()}
        return {"num_tracks": torch.tensor(self._num_tracks, dtype=torch.int64), **state}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a state written by :meth:`state_dict`; later calls continue the video exactly
        as the saved tracker would have."""
        if set(state) != set(_STATE_KEYS):
            raise KeyError(
                f"tracker state needs the keys {sorted(_STATE_KEYS)}, got {sorted(state)}"
            )
        num_tracks = int(state["num_tracks"])
        ids = state["track_ids"]
        t, b = ids.shape[0], state["backdrop_labels"].shape[0]
        rows = {
            "track_labels": t,
            "track_boxes": t,
            "track_embeds": t,
            "track_last_frames": t,
            "backdrop_boxes": b,
            "backdrop_embeds": b,
        }
        for key, expected in rows.items():
            if state[key].shape[0] != expected:
                raise ValueError(
                    f"tracker state: {key} has {state[key].shape[0]} rows, not {expected}"
                )
        if int(state["backdrop_counts"].sum()) != b:
            raise ValueError("tracker state: backdrop_counts do not add up to the backdrops")
        if t and not (bool((ids[1:] > ids[:-1]).all()) and int(ids[-1]) < num_tracks):
            raise ValueError("tracker state: track ids must ascend and lie below num_tracks")
        self._num_tracks = num_tracks
        for key in _STATE_KEYS[1:]:
            setattr(self, "_" + key, state[key].clone())

    # ------------------------------------------------------------------------- matching
    @torch.no_grad()
    def match(
        self, boxes: Tensor, scores: Tensor, labels: Tensor, embeddings: Tensor, frame_id: int
    ) -> Tensor:
        """Track one frame's detections and update the memory.

        Args:
            boxes: (n, 4) float XYXY (:func:`masks_to_tracker_boxes`).
            scores: (n,) detection scores. They are compared with the thresholds in their own
                dtype, so pass float32 to match the official tracker bit for bit.
            labels: (n,) int64 thing classes.
            embeddings: (n, C) association embeddings.
            frame_id: the frame's number in its video. Gaps count toward a track's death.

        Returns:
            (n,) int64 ids on the device of ``scores``: >= 0 track id, -1 (:data:`UNASSIGNED`)
            or -2 (:data:`SUPPRESSED`). The ids follow the input order, or the official caller's
            order with ``official_id_alignment``.
        """
        n = scores.shape[0]
        if boxes.shape != (n, 4) or labels.shape != (n,) or embeddings.dim() != 2:
            raise ValueError(
                f"match expects boxes (n, 4), scores (n,), labels (n,), embeddings (n, C); got "
                f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}, "
                f"{tuple(embeddings.shape)}"
            )
        if embeddings.shape[0] != n:
            raise ValueError(f"{embeddings.shape[0]} embeddings for {n} detections")
        device = scores.device
        order = torch.sort(scores, descending=True, stable=True).indices
        sorted_boxes, sorted_scores = boxes[order], scores[order]
        # duplicate removal against every higher-scored detection, removed ones included
        thresh = torch.where(
            sorted_scores < self.obj_score_thresh,
            self.nms_backdrop_iou_thresh,
            self.nms_class_iou_thresh,
        ).to(sorted_boxes.dtype)
        kept = ~_overlaps_earlier(tracker_box_iou(sorted_boxes, sorted_boxes), thresh)
        index = order[kept]  # input position of each of the m kept detections, in score order
        boxes, scores, labels = boxes[index], scores[index], labels[index].long()
        embeddings = embeddings[index]

        ids = torch.full((index.shape[0],), UNASSIGNED, dtype=torch.int64)  # CPU, sequential
        if index.numel() and not self.empty:
            ids = self._associate(scores, labels, embeddings)
        born = (ids == UNASSIGNED) & (scores > self.init_score_thresh).cpu()
        num_born = int(born.sum())
        ids[born] = torch.arange(self._num_tracks, self._num_tracks + num_born)
        self._num_tracks += num_born
        ids = ids.to(device)
        self._update_memory(ids, boxes, labels, embeddings, frame_id)

        out = torch.full((n,), UNASSIGNED, dtype=torch.int64, device=device)
        if self.official_id_alignment:
            out[: ids.shape[0]] = ids
        else:
            out[index] = ids
        return out

    def _associate(self, scores: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        """Ids (m,) int64 on the CPU (track, -1 or -2) of score-sorted detections against the
        memory (step 3 of the module's docstring)."""
        num_backdrops = self._backdrop_labels.shape[0]
        memory = _cat(self._track_embeds, self._backdrop_embeds)
        memory_labels = _cat(self._track_labels, self._backdrop_labels)
        memory_ids = torch.cat(
            [self._track_ids.cpu(), torch.full((num_backdrops,), UNASSIGNED, dtype=torch.int64)]
        )
        embeddings = embeddings.to(memory)
        if self.match_metric == "cosine":
            similarity = F.normalize(embeddings, p=2, dim=1) @ F.normalize(memory, p=2, dim=1).t()
        else:
            logits = embeddings @ memory.t()  # (m, T+B) raw dot products: no norm, no temperature
            similarity = logits.softmax(dim=1)
            if self.match_metric == "bisoftmax":
                similarity = (similarity + logits.softmax(dim=0)) / 2
        if self.with_cats:
            same_class = labels.to(memory_labels.device)[:, None] == memory_labels[None, :]
            similarity = similarity * same_class.to(similarity.dtype)

        # Greedy in score order: a taken track is zeroed for the later detections, so every
        # track is taken at most once. This is sequential, so it runs on the CPU (m <= ~100).
        similarity, scores = similarity.cpu(), scores.cpu()
        ids = torch.full((scores.shape[0],), UNASSIGNED, dtype=torch.int64)
        for i in range(scores.shape[0]):
            conf, j = similarity[i].max(dim=0)  # the first maximum on ties
            if not conf > self.match_score_thresh or memory_ids[j] < 0:
                continue  # no match, or the best match is a backdrop: stays -1
            if scores[i] > self.obj_score_thresh:
                ids[i] = memory_ids[j]
                similarity[i + 1 :, j] = 0
            elif conf > self.nms_conf_thresh:
                ids[i] = SUPPRESSED
        return ids

    def _update_memory(
        self, ids: Tensor, boxes: Tensor, labels: Tensor, embeddings: Tensor, frame_id: int
    ) -> None:
        """Step 5 of the module's docstring, for the m kept detections in score order."""
        # the memory stays where it is (a state loaded on the CPU may meet CUDA inputs)
        device = self._track_ids.device if self._track_ids.numel() else ids.device
        ids, boxes, labels = ids.to(device), boxes.to(device), labels.to(device)
        embeddings = embeddings.to(device)
        # 1. matched tracks: non-negative ids already in the memory
        track_ids = self._track_ids.to(device)  # empty: may still sit on the CPU
        matched = (ids >= 0) & torch.isin(ids, track_ids)
        if bool(matched.any()):
            rows = torch.searchsorted(track_ids, ids[matched])  # track ids ascend
            old = self._track_embeds[rows]
            new = embeddings[matched].to(old)
            m = self.memo_momentum
            updated = (1 - m) * old + m * new  # this exact form: the official rounding
            self._track_embeds = self._track_embeds.index_copy(0, rows, updated)
            new_boxes = boxes[matched].to(self._track_boxes)
            self._track_boxes = self._track_boxes.index_copy(0, rows, new_boxes)
            self._track_labels = self._track_labels.index_copy(0, rows, labels[matched])
            last = torch.full((rows.shape[0],), frame_id, dtype=torch.int64, device=device)
            self._track_last_frames = self._track_last_frames.index_copy(0, rows, last)
        # 2. births, appended in ascending id order
        born = (ids >= 0) & ~matched
        if bool(born.any()):
            frames = torch.full((int(born.sum()),), frame_id, dtype=torch.int64, device=device)
            self._track_ids = _cat(self._track_ids, ids[born])
            self._track_labels = _cat(self._track_labels, labels[born])
            self._track_boxes = _cat(self._track_boxes, boxes[born])
            self._track_embeds = _cat(self._track_embeds, embeddings[born])
            self._track_last_frames = _cat(self._track_last_frames, frames)
        # 3. this frame's backdrops (still -1, no IoU > thr with any earlier kept detection)
        #    go first; only the newest memo_backdrop_frames frames stay
        overlapping = _overlaps_earlier(tracker_box_iou(boxes, boxes), self.nms_backdrop_iou_thresh)
        backdrop = (ids == UNASSIGNED) & ~overlapping
        counts = torch.cat([backdrop.sum().view(1).cpu(), self._backdrop_counts.cpu()])
        self._backdrop_counts = counts[: self.memo_backdrop_frames]
        rows_kept = int(self._backdrop_counts.sum())
        for key, new in (("labels", labels), ("boxes", boxes), ("embeds", embeddings)):
            name = "_backdrop_" + key
            setattr(self, name, _cat(new[backdrop], getattr(self, name))[:rows_kept])
        # 4. deaths, after this frame's matching
        alive = frame_id - self._track_last_frames < self.memo_tracklet_frames
        if not bool(alive.all()):
            for key in ("ids", "labels", "boxes", "embeds", "last_frames"):
                name = "_track_" + key
                setattr(self, name, getattr(self, name)[alive])


def track_panoptic_segments(
    tracker: QuasiDenseTracker,
    outputs: dict[str, Tensor],
    embeddings: Tensor,
    frame_id: int,
    thing_pixels: Tensor | None = None,
) -> Tensor:
    """The track ids of one frame's panoptic segments (the official caller of the tracker).

    Args:
        outputs: the frame's panoptic outputs as tensors: "panoptic_seg" (H, W) ids (segment
            row i has id i + 1), "segment_isthing", "segment_score", "segment_category_id" and
            "segment_kernel" (S,) (the kernel each segment comes from).
        embeddings: (N, E) association embeddings of the frame's kernels.
        thing_pixels: (H, W) bool: the tracker boxes keep only these pixels of a segment (the
            official semantic filter); None: the whole segments.

    Returns:
        (S,) int64: >= 1 the track of a thing segment, 0 for stuff and untracked things. A
        frame without things leaves the tracker untouched, as the official caller does.
    """
    isthing = outputs["segment_isthing"].bool()
    track_ids = torch.zeros(isthing.shape, dtype=torch.int64, device=isthing.device)
    things = isthing.nonzero().squeeze(1)
    if things.numel() == 0:
        return track_ids
    ids = outputs["panoptic_seg"]
    masks = ids[None] == (things + 1).to(ids.dtype)[:, None, None]
    if thing_pixels is not None:
        masks &= thing_pixels
    matched = tracker.match(
        masks_to_tracker_boxes(masks),
        outputs["segment_score"][things],
        outputs["segment_category_id"][things],
        embeddings[outputs["segment_kernel"][things].to(embeddings.device)],
        frame_id,
    ).to(track_ids.device)
    track_ids[things] = torch.where(matched >= 0, matched + 1, 0)
    return track_ids
