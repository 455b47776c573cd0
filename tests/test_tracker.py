"""Video K-Net's quasi-dense embedding tracker: random videos against a loop-based reference, and
the behaviours of the official tracker one at a time (persistence, occlusion and death, classes,
duplicates, -2 suppression, backdrops, momentum, id alignment, pause/resume)."""

from __future__ import annotations

import io

import pytest
import torch
from references.tracker import (
    ReferenceTracker,
    input_order_ids,
    official_order_ids,
    reference_iou,
    reference_mask_box,
)
from torchvision.ops import box_iou

from knet.modeling.tracking import (
    EMPTY_MASK_BOX,
    SUPPRESSED,
    UNASSIGNED,
    QuasiDenseTracker,
    masks_to_tracker_boxes,
    tracker_box_iou,
)

DIM = 8
SCALE = 4.0  # prototype embeddings SCALE * e_k: dot 16 with itself, 0 with the others


def proto(k: int, dim: int = DIM) -> torch.Tensor:
    e = torch.zeros(dim, dtype=torch.float64)
    e[k] = SCALE
    return e


def box_at(k: int) -> list[float]:
    """Disjoint 10x10 boxes, one per object."""
    return [20.0 * k, 0.0, 20.0 * k + 10.0, 10.0]


def frame(dets: list[tuple]) -> tuple[torch.Tensor, ...]:
    """[(box, score, label, embedding), ...] -> the four input tensors of ``match``."""
    if not dets:
        return (
            torch.zeros(0, 4, dtype=torch.float64),
            torch.zeros(0, dtype=torch.float64),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, DIM, dtype=torch.float64),
        )
    boxes = torch.tensor([d[0] for d in dets], dtype=torch.float64)
    scores = torch.tensor([d[1] for d in dets], dtype=torch.float64)
    labels = torch.tensor([d[2] for d in dets], dtype=torch.int64)
    embeds = torch.stack([d[3] for d in dets])
    return boxes, scores, labels, embeds


def obj(k: int, score: float = 0.9, label: int = 0) -> tuple:
    """Object k: its own box and prototype embedding."""
    return (box_at(k), score, label, proto(k))


def run(tracker: QuasiDenseTracker, dets: list[tuple], frame_id: int) -> list[int]:
    return tracker.match(*frame(dets), frame_id=frame_id).tolist()


# ----------------------------------------------------------------------------- random videos
def random_video(seed: int, num_frames: int = 15, num_objects: int = 6) -> list[tuple]:
    """[(frame_id, boxes, scores, labels, embeds), ...]: objects that come and go, move a little,
    jitter in score and embedding, plus duplicates (shifted boxes, other classes, equal scores),
    empty-mask and zero-area boxes, clutter, empty frames and gaps in the frame numbers. The
    detections come in a random order."""
    g = torch.Generator().manual_seed(seed)

    def rand() -> float:
        return float(torch.rand((), generator=g))

    def randint(high: int) -> int:
        return int(torch.randint(high, (), generator=g))

    protos = torch.randn(num_objects, DIM, generator=g, dtype=torch.float64) * 2.0
    classes = [randint(3) for _ in range(num_objects)]
    corners = [[float(randint(200)), float(randint(100))] for _ in range(num_objects)]
    sizes = [[float(10 + randint(40)), float(10 + randint(40))] for _ in range(num_objects)]
    video, frame_id = [], 0
    for _ in range(num_frames):
        dets = []
        if rand() > 0.08:
            for k in range(num_objects):
                corners[k][0] += randint(7) - 3
                corners[k][1] += randint(7) - 3
                if rand() < 0.3:
                    continue  # occluded in this frame
                x, y = corners[k]
                box = [x, y, x + sizes[k][0], y + sizes[k][1]]
                score = 0.2 + 0.8 * rand()
                noise = torch.randn(DIM, generator=g, dtype=torch.float64) * 0.4
                dets.append((box, score, classes[k], protos[k] + noise))
                if rand() < 0.2:  # a duplicate segment of the same object
                    shift = float(randint(4))
                    dup_box = [box[0] + shift, box[1], box[2] + shift, box[3]]
                    dup_score = score if rand() < 0.3 else 0.2 + 0.8 * rand()
                    dup_label = classes[k] if rand() < 0.5 else randint(3)
                    noise = torch.randn(DIM, generator=g, dtype=torch.float64) * 0.4
                    dets.append((dup_box, dup_score, dup_label, protos[k] + noise))
            for _ in range(randint(3)):  # clutter
                kind = rand()
                if kind < 0.3:
                    box = list(EMPTY_MASK_BOX)
                elif kind < 0.5:
                    x, y = float(randint(250)), float(randint(150))
                    box = [x, y, x + randint(2) * 5.0, y]  # zero area
                else:
                    x, y = float(randint(250)), float(randint(150))
                    box = [x, y, x + 5.0 + randint(30), y + 5.0 + randint(30)]
                embed = torch.randn(DIM, generator=g, dtype=torch.float64) * 2.0
                dets.append((box, 0.2 + 0.8 * rand(), randint(3), embed))
        perm = torch.randperm(len(dets), generator=g).tolist()
        video.append((frame_id, *frame([dets[p] for p in perm])))
        frame_id += 1 if rand() < 0.8 else 2 + randint(3)
    return video


def tracker_memory(tracker: QuasiDenseTracker) -> dict:
    """The tracker's memory in the reference's terms, for comparing the two."""
    state = tracker.state_dict()
    tracks = {}
    for t, tid in enumerate(state["track_ids"].tolist()):
        label, last = int(state["track_labels"][t]), int(state["track_last_frames"][t])
        tracks[tid] = (state["track_embeds"][t].tolist(), label, last)
    return {
        "tracks": tracks,
        "backdrops": state["backdrop_embeds"].flatten().tolist(),
        "counts": state["backdrop_counts"].tolist(),
        "next": int(state["num_tracks"]),
    }


def reference_memory(ref: ReferenceTracker) -> dict:
    return {
        "tracks": {tid: (t["embed"], t["label"], t["last"]) for tid, t in ref.tracks.items()},
        "backdrops": [v for f in ref.backdrops for b in f for v in b["embed"]],
        "counts": [len(f) for f in ref.backdrops],
        "next": ref.next_id,
    }


@pytest.mark.parametrize(
    "seed,metric,official",
    [(0, "bisoftmax", False), (1, "bisoftmax", True), (2, "bisoftmax", False),
     (3, "bisoftmax", True), (4, "bisoftmax", False), (5, "softmax", False),
     (6, "cosine", True)],
)  # fmt: skip
def test_random_videos_match_reference(seed: int, metric: str, official: bool):
    tracker = QuasiDenseTracker(match_metric=metric, official_id_alignment=official)
    ref = ReferenceTracker(match_metric=metric)
    matched = removed = 0
    for frame_id, boxes, scores, labels, embeds in random_video(seed):
        n = scores.shape[0]
        next_before = ref.next_id
        positions, ref_ids = ref.match(boxes, scores, labels, embeds, frame_id)
        expected = (
            official_order_ids(n, ref_ids) if official else input_order_ids(n, positions, ref_ids)
        )
        assert tracker.match(boxes, scores, labels, embeds, frame_id).tolist() == expected
        matched += sum(0 <= i < next_before for i in ref_ids)
        removed += n - len(ref_ids)
    mine, theirs = tracker_memory(tracker), reference_memory(ref)
    assert mine["next"] == theirs["next"] and mine["counts"] == theirs["counts"]
    assert mine["tracks"].keys() == theirs["tracks"].keys()
    for tid, (embed, label, last) in theirs["tracks"].items():
        assert mine["tracks"][tid][1:] == (label, last)
        assert mine["tracks"][tid][0] == pytest.approx(embed, rel=1e-12, abs=1e-12)
    assert mine["backdrops"] == pytest.approx(theirs["backdrops"], rel=1e-12, abs=1e-12)
    # the videos exercise matching across frames and the duplicate removal
    assert matched > 10 and removed > 0


def test_random_videos_exercise_suppression():
    """Across the seeds above, some detections are suppressed duplicates (-2)."""
    suppressed = 0
    for seed in range(5):
        ref = ReferenceTracker()
        for frame_id, boxes, scores, labels, embeds in random_video(seed):
            suppressed += ref.match(boxes, scores, labels, embeds, frame_id)[1].count(SUPPRESSED)
    assert suppressed > 0


# ----------------------------------------------------------------------------- persistence
def test_ids_persist_with_jittering_scores_and_order():
    g = torch.Generator().manual_seed(0)
    tracker = QuasiDenseTracker()
    first = None
    for frame_id in range(15):
        scores = (0.4 + 0.6 * torch.rand(4, generator=g)).tolist()
        order = torch.randperm(4, generator=g).tolist()
        dets = [obj(k, scores[k], label=k % 2) for k in order]
        ids = dict(zip(order, run(tracker, dets, frame_id)))
        if first is None:
            first = ids
            assert sorted(ids.values()) == [0, 1, 2, 3]
        assert ids == first
    assert tracker.num_tracks == 4


@pytest.mark.parametrize("missing", [1, 2, 3, 4, 5, 6])
def test_reidentification_after_occlusion(missing: int):
    """Object 1 is missing for ``missing`` frames while object 0 stays (the tracker is called on
    every frame). Last seen at f, a track is still matched at f + 5 and is deleted after that
    frame's update, so it comes back after 1-4 missing frames and is new after 5 or more."""
    tracker = QuasiDenseTracker()
    assert run(tracker, [obj(0), obj(1)], 0) == [0, 1]
    for frame_id in range(1, missing + 1):
        assert run(tracker, [obj(0)], frame_id) == [0]
    back = run(tracker, [obj(0), obj(1)], missing + 1)
    assert back == ([0, 1] if missing <= 4 else [0, 2])


def test_no_death_check_on_frames_without_a_call():
    """Death is checked only when ``match`` runs: a track last seen at frame 0 is still there at
    frame 9 if nothing was tracked in between, but not if a frame >= 5 was tracked."""
    tracker = QuasiDenseTracker()
    run(tracker, [obj(0), obj(1)], 0)
    assert run(tracker, [obj(0), obj(1)], 9) == [0, 1]
    tracker = QuasiDenseTracker()
    run(tracker, [obj(0), obj(1)], 0)
    run(tracker, [obj(0)], 5)  # gaps in the frame numbers count
    assert run(tracker, [obj(0), obj(1)], 9) == [0, 2]


def test_class_aware_matching():
    """A detection that looks like track 0 but has another class does not take it."""
    start = [obj(0, label=0), obj(1, label=1)]
    dets = [(box_at(0), 0.9, 1, proto(0)), obj(1, 0.8, label=1)]
    tracker = QuasiDenseTracker()
    run(tracker, start, 0)
    assert run(tracker, dets, 1) == [2, 1]  # born, not track 0
    tracker = QuasiDenseTracker(with_cats=False)
    run(tracker, start, 0)
    assert run(tracker, dets, 1) == [0, 1]


def test_single_detection_takes_a_same_class_track():
    """With one detection the column softmax is 1, so its bisoftmax score is >= 0.5 for every
    track: an unrelated lone detection takes the first best track of its class. With a second
    detection in the frame the same detection is born instead."""
    stranger = (box_at(5), 0.9, 0, proto(2))  # dot product 0 with both tracks
    tracker = QuasiDenseTracker()
    run(tracker, [obj(0), obj(1)], 0)
    assert run(tracker, [stranger], 1) == [0]  # S = (1/2 + 1) / 2 = 0.75 for both: the first
    tracker = QuasiDenseTracker()
    run(tracker, [obj(0), obj(1)], 0)
    assert run(tracker, [stranger, (box_at(6), 0.8, 0, proto(3))], 1) == [2, 3]
    tracker = QuasiDenseTracker()  # another class: nothing to take
    run(tracker, [obj(0), obj(1)], 0)
    assert run(tracker, [(box_at(5), 0.9, 1, proto(2))], 1) == [2]


# ----------------------------------------------------------------------------- duplicates
def test_duplicate_removal_compares_with_removed_detections():
    """B overlaps A (IoU 0.75 > 0.7) and is removed; C overlaps only the removed B (0.76; 0.59
    with A) and is removed too. A low score (< 0.3) is removed at IoU > 0.3."""
    a = [0.0, 0.0, 10.0, 10.0]
    b = [0.0, 0.0, 10.0, 7.5]
    c = [0.0, -1.0, 10.0, 6.5]
    assert reference_iou(b, a) == 0.75 and reference_iou(c, a) < 0.6 < 0.76 < reference_iou(c, b)
    tracker = QuasiDenseTracker()
    dets = [(a, 0.9, 0, proto(0)), (b, 0.8, 1, proto(1)), (c, 0.7, 2, proto(2))]
    assert run(tracker, dets, 0) == [0, UNASSIGNED, UNASSIGNED]
    assert tracker.num_tracks == 1
    d = [0.0, 0.0, 10.0, 4.0]  # IoU 0.4 with A
    tracker = QuasiDenseTracker(init_score_thresh=0.2)
    dets = [(a, 0.9, 0, proto(0)), (d, 0.5, 0, proto(1)), (d, 0.25, 1, proto(2))]
    # D at 0.5 is kept (threshold 0.7) and born; D at 0.25 overlaps A by 0.4 > 0.3: removed
    assert run(tracker, dets, 0) == [0, 1, UNASSIGNED]


def test_thresholds_are_strict():
    """The IoU threshold of the duplicate removal drops to 0.3 only for scores *below* 0.3, and a
    birth needs a score *above* the birth threshold."""
    a, x = [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]  # IoU 0.5
    for score, expected in ((0.3, [0, 1]), (0.2999, [0, UNASSIGNED])):
        tracker = QuasiDenseTracker(init_score_thresh=0.2)
        assert run(tracker, [(a, 0.9, 0, proto(0)), (x, score, 0, proto(1))], 0) == expected
    for score, expected in ((0.35, UNASSIGNED), (0.3501, 0)):
        assert run(QuasiDenseTracker(), [(a, score, 0, proto(0))], 0) == [expected]


def test_empty_and_zero_area_boxes():
    """Two empty masks share the fallback box and are duplicates; two one-pixel masks on the
    same pixel have zero-area boxes, IoU 0, and both survive."""
    masks = torch.zeros(4, 20, 30, dtype=torch.bool)
    masks[2, 5, 7] = masks[3, 5, 7] = True
    boxes = masks_to_tracker_boxes(masks).double()
    assert boxes.tolist() == [list(EMPTY_MASK_BOX)] * 2 + [[7.0, 5.0, 7.0, 5.0]] * 2
    iou = tracker_box_iou(boxes, boxes)
    assert iou[0, 1] == 1 and iou[2, 3] == 0 and iou[2, 2] == 0
    tracker = QuasiDenseTracker()
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    embeds = torch.stack([proto(k) for k in range(4)])
    ids = tracker.match(boxes, scores, torch.zeros(4, dtype=torch.int64), embeds, 0)
    assert ids.tolist() == [0, UNASSIGNED, 1, 2]


def test_box_iou_against_torchvision_and_loops():
    g = torch.Generator().manual_seed(3)
    xy = torch.randint(0, 40, (30, 2), generator=g).double()
    boxes = torch.cat([xy, xy + torch.randint(1, 30, (30, 2), generator=g)], dim=1)
    iou = tracker_box_iou(boxes, boxes[:12])
    torch.testing.assert_close(iou, box_iou(boxes, boxes[:12]), rtol=1e-12, atol=1e-12)
    flat = [reference_iou(a.tolist(), b.tolist()) for a in boxes for b in boxes[:12]]
    assert iou.flatten().tolist() == pytest.approx(flat, rel=1e-12, abs=1e-12)


def test_low_scored_duplicate_of_a_track_is_suppressed():
    """A detection whose best match is a track but whose score is <= 0.3 gets -2; above 0.3 it
    takes the track; -2 detections are not backdrops. (Object 1 has another class, so that it
    cannot take track 0.)"""
    far = [100.0, 100.0, 110.0, 110.0]
    tracker = QuasiDenseTracker()
    run(tracker, [obj(0)], 0)
    assert run(tracker, [obj(1, label=1), (far, 0.28, 0, proto(0))], 1) == [1, SUPPRESSED]
    assert tracker.state_dict()["backdrop_counts"].tolist() == [0]
    assert run(tracker, [obj(1, label=1), (far, 0.32, 0, proto(0))], 2) == [1, 0]
    # a low score that matches no track (S = 0.5 exactly) is not born: -1, and a backdrop
    assert run(tracker, [obj(1, label=1), (far, 0.32, 0, proto(5))], 3) == [1, UNASSIGNED]
    assert tracker.state_dict()["backdrop_counts"].tolist() == [1]


def test_scores_are_compared_in_their_dtype():
    """float32(0.3) > 0.3 is False in float32, as in the official tracker (scores are stored in
    a float32 box tensor), while the same number in float64 is above 0.3."""
    box, label, embed = torch.tensor([box_at(0)]), torch.zeros(1, dtype=torch.int64), proto(0)[None]
    exact = torch.tensor([0.3], dtype=torch.float32)
    for scores, expected in ((exact, SUPPRESSED), (exact.double(), 0)):
        tracker = QuasiDenseTracker()
        run(tracker, [obj(0)], 0)
        assert tracker.match(box, scores, label, embed, 1).tolist() == [expected]


# ----------------------------------------------------------------------------- backdrops
def test_backdrop_filter():
    """-1 detections become backdrops unless they overlap (IoU > 0.3) an earlier kept detection;
    -2 and tracked detections never do."""
    overlapping = ([0.0, 0.0, 10.0, 6.0], 0.32, 0, proto(2))  # IoU 0.6 with object 0: kept
    lonely = ([50.0, 50.0, 60.0, 60.0], 0.33, 0, proto(1))
    tracker = QuasiDenseTracker()
    assert run(tracker, [obj(0), overlapping, lonely], 0) == [0, UNASSIGNED, UNASSIGNED]
    state = tracker.state_dict()
    assert state["backdrop_counts"].tolist() == [1]
    assert torch.equal(state["backdrop_embeds"], proto(1)[None])
    assert state["backdrop_boxes"].tolist() == [lonely[0]]


@pytest.mark.parametrize("between", ["none", "call", "skip"])
def test_backdrops_refresh_only_when_the_tracker_runs(between: str):
    """A backdrop from frame 0 absorbs a low-scored lone detection that looks like it (-1). If a
    frame in between was tracked, the backdrop is gone and the detection is a suppressed
    duplicate of track 0 (-2); a frame that was not tracked keeps it."""
    tracker = QuasiDenseTracker()
    run(tracker, [obj(0), ([50.0, 50.0, 60.0, 60.0], 0.32, 0, proto(1))], 0)
    frame_id = 1
    if between != "none":
        if between == "call":
            run(tracker, [obj(0)], 1)
        frame_id = 2
    ids = run(tracker, [([80.0, 80.0, 90.0, 90.0], 0.28, 0, proto(1))], frame_id)
    assert ids == ([SUPPRESSED] if between == "call" else [UNASSIGNED])


def test_more_backdrop_frames():
    tracker = QuasiDenseTracker(memo_backdrop_frames=2)
    for frame_id in range(4):
        lone = ([50.0, 50.0, 60.0, 60.0], 0.3, frame_id % 2, proto(1 + frame_id))
        run(tracker, [obj(0), lone], frame_id)
    state = tracker.state_dict()
    assert state["backdrop_counts"].tolist() == [1, 1]
    assert torch.equal(state["backdrop_embeds"], torch.stack([proto(4), proto(3)]))
    assert state["backdrop_labels"].tolist() == [1, 0]


# ----------------------------------------------------------------------------- memory
def test_momentum_update_formula():
    """e <- (1 - m) e_old + m e_new, evaluated in this form (in float32 it differs in the last
    bit from e_old + m (e_new - e_old) for some elements)."""
    g = torch.Generator().manual_seed(1)
    old, new = torch.randn(2, 64, generator=g)
    tracker = QuasiDenseTracker()
    box, label = torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(1, dtype=torch.int64)
    tracker.match(box, torch.tensor([0.9]), label, old[None], 0)
    tracker.match(box, torch.tensor([0.9]), label, new[None], 1)  # a lone detection: matched
    stored = tracker.state_dict()["track_embeds"][0]
    assert torch.equal(stored, (1 - 0.8) * old + 0.8 * new)
    assert not torch.equal(stored, old + 0.8 * (new - old))
    assert tracker.state_dict()["track_last_frames"].tolist() == [1]


def test_reset_starts_a_new_video():
    video = random_video(7)
    tracker = QuasiDenseTracker()
    first = [tracker.match(*f[1:], frame_id=f[0]).tolist() for f in video]
    assert not tracker.empty and tracker.num_tracks > 0
    tracker.reset()
    assert tracker.empty and tracker.num_tracks == 0
    assert all(v.numel() == 0 for v in tracker.state_dict().values() if v.dim())
    again = [tracker.match(*f[1:], frame_id=f[0]).tolist() for f in video]
    assert again == first


def test_state_dict_round_trip_continues_identically():
    video = random_video(8, num_frames=16)
    tracker = QuasiDenseTracker()
    for frame_id, *inputs in video[:8]:
        tracker.match(*inputs, frame_id=frame_id)
    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)  # plain tensors: loadable with weights_only
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = QuasiDenseTracker()
    resumed.load_state_dict(saved)
    for frame_id, *inputs in video[8:]:
        assert torch.equal(
            tracker.match(*inputs, frame_id=frame_id), resumed.match(*inputs, frame_id=frame_id)
        )
    for key, value in tracker.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    # the saved state is a copy: tracking on did not change it
    assert not torch.equal(saved["num_tracks"], tracker.state_dict()["num_tracks"])
    with pytest.raises(KeyError):
        resumed.load_state_dict({k: v for k, v in saved.items() if k != "track_ids"})


# ----------------------------------------------------------------------------- id alignment
def test_official_alignment_shifts_ids_after_a_removed_duplicate():
    """Input in descending score order (as the official caller's segments): the official ids
    are the kept detections' ids written from the start, so a removed duplicate shifts every
    later id and leaves the last input without one."""
    dup = ([0.0, 0.0, 10.0, 9.0], 0.8, 1, proto(5))  # IoU 0.9 with object 0
    dets = [obj(0, 0.9), dup, obj(1, 0.7), obj(2, 0.6)]
    assert run(QuasiDenseTracker(), dets, 0) == [0, UNASSIGNED, 1, 2]
    assert run(QuasiDenseTracker(official_id_alignment=True), dets, 0) == [0, 1, 2, UNASSIGNED]


def test_official_alignment_differs_only_after_a_removal_on_sorted_input():
    differing = 0
    for seed in (0, 1, 2):
        default, official = QuasiDenseTracker(), QuasiDenseTracker(official_id_alignment=True)
        for frame_id, boxes, scores, labels, embeds in random_video(seed):
            order = scores.argsort(descending=True, stable=True)
            inputs = (boxes[order], scores[order], labels[order], embeds[order])
            ids = default.match(*inputs, frame_id=frame_id)
            official_ids = official.match(*inputs, frame_id=frame_id)
            kept = ReferenceTracker().match(*inputs, frame_id)[0]  # what the removal keeps
            if len(kept) == scores.shape[0]:
                assert torch.equal(ids, official_ids)
            else:
                differing += not torch.equal(ids, official_ids)
    assert differing > 0


def test_default_ids_follow_the_input_order():
    video = random_video(9)
    plain, shuffled = QuasiDenseTracker(), QuasiDenseTracker()
    g = torch.Generator().manual_seed(0)
    for frame_id, boxes, scores, labels, embeds in video:
        n = scores.shape[0]
        scores = scores + torch.arange(n) * 1e-9  # no ties: their order is the input order
        perm = torch.randperm(n, generator=g)
        ids = plain.match(boxes, scores, labels, embeds, frame_id)
        permuted = shuffled.match(boxes[perm], scores[perm], labels[perm], embeds[perm], frame_id)
        assert torch.equal(permuted, ids[perm])
    assert plain.num_tracks > 5


# ----------------------------------------------------------------------------- boxes, checks
def test_masks_to_tracker_boxes_against_loops():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(12, 17, 23, generator=g) > 0.97
    masks[0] = False
    masks[1] = False
    masks[1, 16, 22] = True  # one pixel in the corner: a zero-area box
    boxes = masks_to_tracker_boxes(masks)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [list(reference_mask_box(m)) for m in masks]
    assert boxes[1].tolist() == [22.0, 16.0, 22.0, 16.0]
    assert masks_to_tracker_boxes(masks.float() * 0.5).tolist() == boxes.tolist()
    assert masks_to_tracker_boxes(masks[:0]).shape == (0, 4)


def test_empty_frames_and_argument_checks():
    tracker = QuasiDenseTracker()
    run(tracker, [obj(0), ([50.0, 50.0, 60.0, 60.0], 0.3, 0, proto(1))], 0)
    assert run(tracker, [], 1) == []  # as officially: empties the backdrops, checks deaths
    assert tracker.state_dict()["backdrop_counts"].tolist() == [0]
    assert run(tracker, [], 5) == [] and tracker.empty
    with pytest.raises(ValueError):
        QuasiDenseTracker(match_metric="l2")
    with pytest.raises(ValueError):
        QuasiDenseTracker(memo_momentum=1.5)
    with pytest.raises(ValueError):
        tracker.match(
            torch.zeros(2, 4), torch.zeros(3), torch.zeros(3).long(), torch.zeros(3, 4), 0
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_resumes_from_a_cpu_state():
    video = random_video(10, num_frames=16)
    cpu, cuda = QuasiDenseTracker(), QuasiDenseTracker()
    for frame_id, *inputs in video[:8]:
        ids = cpu.match(*inputs, frame_id=frame_id)
        on_device = cuda.match(*(x.cuda() for x in inputs), frame_id=frame_id)
        assert on_device.is_cuda and torch.equal(on_device.cpu(), ids)
    resumed = QuasiDenseTracker()
    resumed.load_state_dict(cpu.state_dict())  # a CPU state, CUDA inputs from here on
    for frame_id, *inputs in video[8:]:
        ids = cpu.match(*inputs, frame_id=frame_id)
        for tracker in (cuda, resumed):
            assert torch.equal(
                tracker.match(*(x.cuda() for x in inputs), frame_id=frame_id).cpu(), ids
            )
