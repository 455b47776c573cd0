"""STQ and VPQ (knet.evaluation.video): DeepLab2's published STQ values, a brute-force
reference on random sequences, COCO's image PQ for one-frame windows, and the evaluator."""

from __future__ import annotations

import json
import math
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.utils import comm
from panopticapi.evaluation import pq_compute_single_core
from panopticapi.utils import id2rgb
from PIL import Image
from references.video_metrics import stq_reference, vpq_reference

from knet.evaluation.video import (
    SegmentationAndTrackingQuality,
    VideoPanopticEvaluator,
    VideoPanopticQuality,
)

IGNORE = 255


def _grid(text: str) -> np.ndarray:
    """'0012/0112' -> 2-D int array, one digit per pixel, rows separated by '/'."""
    return np.array([[int(c) for c in row] for row in text.split("/")], dtype=np.int64)


# ------------------------------------------------------------------- DeepLab2's golden values
# 3 classes (0 sky, 1 vegetation, 2 car = thing), one sequence of three 8x8 frames
COMPLEX_GT = [
    (
        "00000000/00000000/00020111/02222111/22222211/22222221/22222221/22222211",
        "00000000/00000000/00020000/02222000/22222200/22222220/22222220/22222200",
    ),
    (
        "00000000/00000000/02001100/22211110/22221111/22222111/22222111/22221111",
        "00000000/00000000/02000000/22200000/22220000/22222000/22222000/22220000",
    ),
    (
        "00000000/00000000/00000000/20111000/22111100/22211110/22211111/22211111",
        "00000000/00000000/00000000/20000000/22000000/22200000/22200000/22200000",
    ),
]
COMPLEX_PRED = [
    (
        "00000000/00000000/00000100/00022111/02222211/22222221/22222221/22222221",
        "00000000/00000000/00000000/00022000/02222100/22222110/22221110/22221110",
    ),
    (
        "00000000/00000000/00001100/02221111/22221111/22222111/22222211/22222111",
        "00000000/00000000/00000000/02220000/22220000/22222000/22221100/22221000",
    ),
    (
        "00000000/00000000/00001000/00111100/22211100/22211111/22221111/22221111",
        "00000000/00000000/00000000/00000000/22200000/22200000/22220000/22220000",
    ),
]


def test_stq_complex_example_matches_deeplab2():
    metric = SegmentationAndTrackingQuality(3, [2], IGNORE, 16, 2**24)
    for (sg, ig), (sp, ip) in zip(COMPLEX_GT, COMPLEX_PRED):
        metric.update(_grid(sg), _grid(ig), _grid(sp), _grid(ip), sequence_id=1)
    result = metric.result()
    assert result["STQ"] == pytest.approx(0.66841773352, abs=1e-11)
    assert result["AQ"] == pytest.approx(0.55366581415, abs=1e-11)
    assert result["IoU"] == pytest.approx(0.8069529580309542, abs=1e-14)
    assert result["STQ_per_seq"] == pytest.approx([0.66841773352], abs=1e-11)
    assert result["AQ_per_seq"] == pytest.approx([0.55366581415], abs=1e-11)
    assert result["IoU_per_seq"] == pytest.approx([0.8069529580309542], abs=1e-14)
    assert result["ID_per_seq"] == [1]
    assert result["Length_per_seq"] == [3]


# 2 classes (0 car = thing, 1 sky); a 1-row frame per example. "s" = sky (instance 0), a digit
# a car instance id (0 in the ground truth: crowd). Values: STQ, AQ, IoU.
BASIC = [
    ("11111", "11111", 1.0, 1.0, 1.0),
    ("11111", "11222", 0.72111026, 0.52, 1.0),
    ("11111", "12222", 0.82462113, 0.68, 1.0),
    ("11111", "12345", 0.447213596, 0.2, 1.0),
    ("11111", "12122", 0.72111026, 0.52, 1.0),
    ("11111", "s1111", 0.50596443, 0.64, 0.4),
    ("011111", "111111", 1.0, 1.0, 1.0),
    ("011111", "222211", 0.72111026, 0.52, 1.0),
    ("011111", "22s111", 0.40824829, 0.4, 5 / 12),
    ("s1111", "11111", 0.56568542, 0.8, 0.4),
    ("s1111", "22211", 0.42426407, 0.45, 0.4),
    ("s1111", "22s11", 0.3, 0.3, 0.3),
]


def _row(text: str) -> tuple[np.ndarray, np.ndarray]:
    semantic = np.array([[1 if c == "s" else 0 for c in text]])
    instance = np.array([[0 if c == "s" else int(c) for c in text]])
    return semantic, instance


def test_stq_basic_examples_match_deeplab2():
    metric = SegmentationAndTrackingQuality(2, [0], IGNORE, 16, 2**24)
    for i, (gt, pred, stq, aq, iou) in enumerate(BASIC):
        metric.reset()
        metric.update(*_row(gt), *_row(pred), sequence_id=1)
        result = metric.result()
        # AQ and IoU are exact fractions; DeepLab2 quotes STQ = sqrt(AQ * IoU) to 8-9 digits.
        assert result["AQ"] == pytest.approx(aq, abs=1e-12), i
        assert result["IoU"] == pytest.approx(iou, abs=1e-12), i
        assert result["STQ"] == pytest.approx(stq, abs=1e-8), i
        assert result["STQ"] == pytest.approx(math.sqrt(aq * iou), abs=1e-12), i


# ----------------------------------------------------------------------- random sequences
NUM_CLASSES = 5
THINGS = [1, 3, 4]


def _random_frame(rng, previous, shape=(6, 8), block=2):
    """Blocky ground truth that changes a little from frame to frame (so tubes persist and
    IoUs > 0.5 occur), with void and crowd pixels, and a noisy prediction of it: class changes,
    track swaps, untracked and void predictions."""
    cells = (shape[0] // block, shape[1] // block)
    if previous is None:
        sem = rng.integers(0, NUM_CLASSES, cells)
        ins = rng.integers(1, 4, cells)
    else:
        sem, ins = previous[0].copy(), previous[1].copy()
        change = rng.random(cells) < 0.25
        sem[change] = rng.integers(0, NUM_CLASSES, change.sum())
        ins[change] = rng.integers(1, 4, change.sum())
    state = (sem, ins)
    up = np.ones((block, block), dtype=np.int64)
    sg, ig = np.kron(sem, up), np.kron(ins, up)
    thing = np.isin(sg, THINGS)
    ig = np.where(thing, ig, 0)
    ig[thing & (rng.random(shape) < 0.1)] = 0  # crowd
    sg[rng.random(shape) < 0.08] = IGNORE
    ig[sg == IGNORE] = rng.integers(0, 3, (sg == IGNORE).sum())  # void's instance ids: ignored

    sp, ip = sg.copy(), ig.copy()
    noise = rng.random(shape) < 0.15
    sp[noise] = rng.integers(0, NUM_CLASSES, noise.sum())
    void = sg == IGNORE
    sp[void] = rng.integers(0, NUM_CLASSES, void.sum())  # predictions on void
    sp[rng.random(shape) < 0.04] = IGNORE
    if rng.random() < 0.3:  # a track swap
        a, b = ip == 1, ip == 2
        ip[a], ip[b] = 2, 1
    ip[rng.random(shape) < 0.1] = rng.integers(0, 4)
    ip = np.where(np.isin(sp, THINGS), ip, 0)
    return state, (sg, ig, sp, ip)


def _random_sequences(seed: int, lengths=(1, 3, 7, 5)) -> dict:
    rng = np.random.default_rng(seed)
    sequences = {}
    for s, n in enumerate(lengths):
        frames, state = [], None
        for _ in range(n):
            state, frame = _random_frame(rng, state)
            frames.append(frame)
        sequences[f"video{s}"] = frames
    return sequences


def _interleaved(sequences: dict):
    """(sequence id, frame) in round-robin order over the sequences, each in its own order."""
    longest = max(len(f) for f in sequences.values())
    for t in range(longest):
        for seq_id, frames in sequences.items():
            if t < len(frames):
                yield seq_id, frames[t]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stq_matches_brute_force_reference(seed):
    sequences = _random_sequences(seed)
    metric = SegmentationAndTrackingQuality(NUM_CLASSES, THINGS, IGNORE, 16, 2**24)
    for seq_id, frame in _interleaved(sequences):
        metric.update(*frame, sequence_id=seq_id)
    result = metric.result()
    expected = stq_reference(sequences, NUM_CLASSES, THINGS, IGNORE)
    assert 0 < expected["AQ"] < 1 and 0 < expected["IoU"] < 1  # a non-trivial case
    for key in ("STQ", "AQ", "IoU"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    for key in ("STQ_per_seq", "AQ_per_seq", "IoU_per_seq"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    assert result["ID_per_seq"] == list(sequences)
    assert result["Length_per_seq"] == expected["Length_per_seq"]


def test_stq_ignore_label_inside_the_class_range():
    """DeepLab2 also allows a void label that is a class id: its row leaves the confusion."""
    ignore = 2  # a stuff class of the random data becomes void, and so does 255
    sequences = {
        q: [tuple(np.where(a == IGNORE, ignore, a) for a in frame) for frame in frames]
        for q, frames in _random_sequences(7, lengths=(3, 2)).items()
    }
    metric = SegmentationAndTrackingQuality(NUM_CLASSES, THINGS, ignore, 16, 2**24)
    for seq_id, frame in _interleaved(sequences):
        metric.update(*frame, sequence_id=seq_id)
    expected = stq_reference(sequences, NUM_CLASSES, THINGS, ignore)
    for key in ("STQ", "AQ", "IoU"):
        assert metric.result()[key] == pytest.approx(expected[key], abs=1e-12), key


@pytest.mark.parametrize("seed,average_over", [(0, "present"), (1, "all"), (2, "present")])
def test_vpq_matches_brute_force_reference(seed, average_over):
    sequences = _random_sequences(seed)
    sizes = (1, 2, 4, 6)
    metric = VideoPanopticQuality(NUM_CLASSES, THINGS, IGNORE, sizes, average_over)
    for seq_id, frame in _interleaved(sequences):
        metric.update(*frame, sequence_id=seq_id)
    result = metric.result()
    expected = vpq_reference(sequences, NUM_CLASSES, THINGS, IGNORE, sizes, average_over)
    assert 0 < expected["VPQ@1"] < 1 and 0 < expected["VPQ@4"] < 1  # a non-trivial case
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    # windows of k frames: n - k + 1 per sequence of n >= k frames (lengths 1, 3, 7, 5)
    assert [result[f"windows@{k}"] for k in sizes] == [16, 12, 6, 2]
    # at most max(k) frames of a sequence are kept
    assert all(len(recent) <= max(sizes) for recent in metric._recent.values())


def test_vpq_average_over_present_and_all():
    """A perfect prediction scores 1 over the classes present, and (present / all classes)
    under the official scripts' mean over all classes."""
    frames = _random_sequences(5, lengths=(4,))["video0"]
    frames = [(np.where(sg == 2, 0, sg), ig) for sg, ig, _, _ in frames]  # class 2 is absent
    perfect = [(sg, ig, sg, np.where(sg == IGNORE, 0, ig)) for sg, ig in frames]
    present = {int(c) for sg, *_ in perfect for c in np.unique(sg) if c != IGNORE}
    assert len(present) < NUM_CLASSES  # a class is absent, for the "all" case below
    for average_over, expected in (("present", 1.0), ("all", len(present) / NUM_CLASSES)):
        metric = VideoPanopticQuality(NUM_CLASSES, THINGS, IGNORE, (1, 3), average_over)
        for frame in perfect:
            metric.update(*frame)
        result = metric.result()
        assert result["VPQ@1"] == pytest.approx(expected, abs=1e-9)
        assert result["VPQ@3"] == pytest.approx(expected, abs=1e-9)


def _frames(seed: int, n: int):
    rng = np.random.default_rng(seed)
    frames, state = [], None
    for _ in range(n):
        state, frame = _random_frame(rng, state)
        frames.append(frame)
    return frames


def test_perfect_prediction_scores_one():
    frames = _frames(11, 5)
    stq = SegmentationAndTrackingQuality(NUM_CLASSES, THINGS, IGNORE)
    vpq = VideoPanopticQuality(NUM_CLASSES, THINGS, IGNORE, (1, 2, 4))
    for sg, ig, _, _ in frames:
        # a perfect prediction: void pixels predicted as anything (here class 0)
        sp = np.where(sg == IGNORE, 0, sg)
        ip = np.where(sg == IGNORE, 0, ig)
        stq.update(sg, ig, sp, ip, "v")
        vpq.update(sg, ig, sp, ip, "v")
    s, v = stq.result(), vpq.result()
    assert s["STQ"] == s["AQ"] == s["IoU"] == 1.0
    assert [v[k] for k in ("VPQ", "VPQ@1", "VPQ@2", "VPQ@4", "VPQ_th", "VPQ_st")] == [1.0] * 6


def test_track_swap_lowers_aq_and_long_windows_only():
    """Two cars, perfectly segmented, but the tracker swaps their ids from frame 2 on."""
    h, w, n = 4, 6, 4
    sg = np.zeros((h, w), dtype=np.int64)  # class 0: road (stuff)
    sg[:, :2] = 1  # car 1
    sg[:, 4:] = 1  # car 2
    ig = np.zeros_like(sg)
    ig[:, :2], ig[:, 4:] = 1, 2
    swapped = np.where(ig == 1, 2, np.where(ig == 2, 1, 0))
    stq = SegmentationAndTrackingQuality(2, [1], IGNORE)
    vpq = VideoPanopticQuality(2, [1], IGNORE, (1, 2, 4))
    sequences = {"s": []}
    for t in range(n):
        ip = ig if t < 2 else swapped
        stq.update(sg, ig, sg, ip, "s")
        vpq.update(sg, ig, sg, ip, "s")
        sequences["s"].append((sg, ig, sg, ip))
    s, v = stq.result(), vpq.result()
    # each GT tube: 8 + 8 pixels, split half / half between two predicted tubes of IoU 1/3
    assert s["AQ"] == pytest.approx(1 / 3, abs=1e-12)
    assert s["IoU"] == 1.0
    assert v["VPQ@1"] == 1.0
    # windows of 2 frames: 3, the middle one (frames 1-2) misses both cars: PQ_car = 4 TP / 6 TP
    # + 2 FN / 2 + 2 FP / 2; windows of 4 frames: one, with no car matched
    assert v["VPQ_th@2"] == pytest.approx(4 / (4 + 2), abs=1e-12)
    assert v["VPQ_st@2"] == 1.0
    assert v["VPQ_th@4"] == 0.0
    expected = vpq_reference(sequences, 2, [1], IGNORE, (1, 2, 4))
    for key, value in expected.items():
        assert v[key] == pytest.approx(value, abs=1e-12), key


# ------------------------------------------------------------------ one frame = image PQ (COCO)
def _write_panoptic(folder, name, semantic, instance, void_label, category_offset=1):
    """A COCO panoptic PNG + segments_info of one map; void pixels get id 0 (COCO's VOID)."""
    ids = np.zeros(semantic.shape, dtype=np.uint32)
    segments = []
    keys = sorted({(int(s), int(i)) for s, i in zip(semantic.ravel(), instance.ravel())})
    for s, i in keys:
        if s == void_label:
            continue
        mask = (semantic == s) & (instance == i)
        segment_id = len(segments) + 1
        ids[mask] = segment_id
        segments.append(
            {
                "id": segment_id,
                "category_id": s + category_offset,
                "iscrowd": 0,
                "area": int(mask.sum()),
            }
        )
    Image.fromarray(id2rgb(ids)).save(os.path.join(folder, name))
    return {"image_id": 1, "file_name": name, "segments_info": segments}


@pytest.mark.parametrize("seed", [0, 3])
def test_vpq_of_one_frame_equals_coco_image_pq(seed, tmp_path, capsys):
    sg, ig, sp, ip = _random_sequences(seed, lengths=(1,))["video0"][0]
    sg, ig, sp, ip = (np.kron(a, np.ones((4, 4), dtype=np.int64)) for a in (sg, ig, sp, ip))
    metric = VideoPanopticQuality(NUM_CLASSES, THINGS, IGNORE, (1,))
    metric.update(sg, ig, sp, ip)
    result = metric.result()

    gt = _write_panoptic(tmp_path, "gt.png", sg, np.where(sg == IGNORE, 0, ig), IGNORE)
    pred = _write_panoptic(tmp_path, "pred.png", sp, ip, IGNORE)
    categories = {c + 1: {"id": c + 1, "isthing": int(c in THINGS)} for c in range(NUM_CLASSES)}
    stat = pq_compute_single_core(0, [(gt, pred)], str(tmp_path), str(tmp_path), categories)
    for key, isthing in (("VPQ@1", None), ("VPQ_th@1", True), ("VPQ_st@1", False)):
        coco, _ = stat.pq_average(categories, isthing=isthing)
        assert result[key] == pytest.approx(coco["pq"], abs=1e-12), key
    assert 0 < result["VPQ@1"] < 1


# ---------------------------------------------------------------------------- argument checks
def test_offset_check():
    SegmentationAndTrackingQuality(3, [2], IGNORE, 16, 3 << 16)  # the smallest valid offset
    with pytest.raises(ValueError, match="offset"):
        SegmentationAndTrackingQuality(3, [2], IGNORE, 16, (3 << 16) - 1)
    with pytest.raises(ValueError, match="offset"):
        SegmentationAndTrackingQuality(124, range(66, 124), IGNORE, 16, 2**22)


def test_invalid_labels_raise():
    stq = SegmentationAndTrackingQuality(3, [2], IGNORE)
    vpq = VideoPanopticQuality(3, [2], IGNORE, (1, 2))
    ok = np.zeros((2, 3), dtype=np.int64)
    for metric in (stq, vpq):
        with pytest.raises(ValueError, match="outside"):
            metric.update(ok + 3, ok, ok, ok)  # class 3 of 3 classes
        with pytest.raises(ValueError, match="outside"):
            metric.update(ok, ok, ok, ok - 1)  # negative instance
        with pytest.raises(ValueError, match="shape"):
            metric.update(ok, ok, ok[:1], ok[:1])
    with pytest.raises(ValueError, match="window_sizes"):
        VideoPanopticQuality(3, [2], IGNORE, (0, 2))
    with pytest.raises(ValueError, match="average_over"):
        VideoPanopticQuality(3, [2], IGNORE, (1,), "mean")


# ---------------------------------------------------------------------------------- evaluator
THING_IDS = {11: 0, 13: 1}  # dataset id -> contiguous id; things first
STUFF_IDS = {21: 2, 22: 3, 23: 4}


@pytest.fixture
def dataset_name():
    name = f"video_metrics_test_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(
        thing_dataset_id_to_contiguous_id=THING_IDS,
        stuff_dataset_id_to_contiguous_id=STUFF_IDS,
        ignore_label=IGNORE,
    )
    yield name
    MetadataCatalog.remove(name)


def _model_output(semantic, instance, rng):
    """A ``panoptic_seg`` output for (semantic, instance) maps: shuffled segment ids, id 0 where
    the semantic map is -1 (no segment)."""
    ids = np.zeros(semantic.shape, dtype=np.int32)
    segments = []
    keys = sorted({(int(s), int(i)) for s, i in zip(semantic.ravel(), instance.ravel())})
    keys = [k for k in keys if k[0] >= 0]
    for segment_id, (s, i) in zip(rng.permutation(len(keys)) + 1, keys):
        ids[(semantic == s) & (instance == i)] = segment_id
        info = {"id": int(segment_id), "category_id": s, "isthing": s < len(THING_IDS)}
        if info["isthing"]:
            info["track_id"] = i
        segments.append(info)
    return {"panoptic_seg": (torch.from_numpy(ids), segments)}


def _evaluator_data(seed):
    """Two videos of 5-class frames (classes 0, 1 things as in THING_IDS) and model outputs; a
    few predicted pixels have no segment (id 0)."""
    rng = np.random.default_rng(seed)
    remap = np.array([2, 0, 3, 1, 1])  # random data's classes -> things 0-1 first, stuff 2-4
    videos = {}
    for video, n in (("a", 4), ("b", 3)):
        frames, state = [], None
        for _ in range(n):
            state, (sg, ig, sp, ip) = _random_frame(rng, state)
            sg = np.where(sg == IGNORE, IGNORE, remap[np.minimum(sg, 4)])
            sp = np.where(sp == IGNORE, IGNORE, remap[np.minimum(sp, 4)])
            ig = np.where((sg == 0) | (sg == 1), ig, 0)
            sp[sp == IGNORE] = -1  # the model predicts no void; these pixels have no segment
            ip = np.where((sp == 0) | (sp == 1), ip, 0)
            frames.append((sg, ig, sp, ip))
        videos[video] = frames
    return videos


def test_evaluator_end_to_end(dataset_name, tmp_path):
    videos = _evaluator_data(3)
    ground_truth = {(v, t): f[:2] for v, frames in videos.items() for t, f in enumerate(frames)}
    sizes = (1, 2, 3)
    evaluator = VideoPanopticEvaluator(
        dataset_name,
        read_ground_truth=lambda r: ground_truth[(r["video_id"], r["frame_index"])],
        vpq_window_sizes=sizes,
        output_dir=str(tmp_path),
    )
    rng = np.random.default_rng(0)
    evaluator.reset()
    for t in range(4):  # videos interleaved, one frame per call (batch size 1)
        for video, frames in videos.items():
            if t < len(frames):
                sg, ig, sp, ip = frames[t]
                record = {"video_id": video, "frame_index": t, "file_name": f"{video}/{t}.jpg"}
                evaluator.process([record], [_model_output(sp, ip, rng)])
    res = evaluator.evaluate()["video_panoptic_seg"]

    # pixels without a segment are class 0 (unassigned_label) with instance 0
    scored = {
        v: [(sg, ig, np.where(sp < 0, 0, sp), np.where(sp < 0, 0, ip)) for sg, ig, sp, ip in f]
        for v, f in videos.items()
    }
    stq = stq_reference(scored, 5, [0, 1], IGNORE)
    vpq = vpq_reference(scored, 5, [0, 1], IGNORE, sizes)
    assert res["STQ"] == pytest.approx(100 * stq["STQ"], abs=1e-10)
    assert res["AQ"] == pytest.approx(100 * stq["AQ"], abs=1e-10)
    assert res["SQ"] == pytest.approx(100 * stq["IoU"], abs=1e-10)
    for key, value in vpq.items():
        assert res[key] == pytest.approx(100 * value, abs=1e-10), key
    assert set(res) == {"STQ", "AQ", "SQ"} | set(vpq)
    assert all(0 < res[key] < 100 for key in ("STQ", "AQ", "SQ", "VPQ@1", "VPQ@3"))
    with open(tmp_path / "video_panoptic_results.json") as f:
        written = json.load(f)
    assert written["metrics"] == pytest.approx(res)
    assert sorted(written["per_sequence"]) == ["a", "b"]
    assert written["per_sequence"]["a"]["frames"] == 4

    # unassigned pixels as void instead: they are left out
    evaluator = VideoPanopticEvaluator(
        dataset_name,
        read_ground_truth=lambda r: ground_truth[(r["video_id"], r["frame_index"])],
        vpq_window_sizes=sizes,
        unassigned_label=IGNORE,
    )
    evaluator.reset()
    for video, frames in videos.items():
        for t, (_, _, sp, ip) in enumerate(frames):
            record = {"video_id": video, "frame_index": t}
            evaluator.process([record], [_model_output(sp, ip, rng)])
    res = evaluator.evaluate()["video_panoptic_seg"]
    scored = {
        v: [(sg, ig, np.where(sp < 0, IGNORE, sp), ip) for sg, ig, sp, ip in f]
        for v, f in videos.items()
    }
    assert res["STQ"] == pytest.approx(100 * stq_reference(scored, 5, [0, 1], IGNORE)["STQ"])
    assert res["VPQ"] == pytest.approx(100 * vpq_reference(scored, 5, [0, 1], IGNORE, sizes)["VPQ"])


def test_evaluator_rejects_frames_out_of_order(dataset_name):
    sg = np.zeros((2, 2), dtype=np.int64) + 2
    evaluator = VideoPanopticEvaluator(dataset_name, read_ground_truth=lambda r: (sg, sg * 0))
    evaluator.reset()
    output = _model_output(sg, sg * 0, np.random.default_rng(0))
    evaluator.process([{"video_id": "v1", "frame_index": 3}], [output])
    evaluator.process([{"video_id": "v2", "frame_index": 0}], [output])  # another video
    with pytest.raises(ValueError, match=r"video 'v1': frame_index 2 comes after frame_index 3"):
        evaluator.process([{"video_id": "v1", "frame_index": 2}], [output])
    with pytest.raises(ValueError, match=r"video 'v2': frame_index 0 comes after frame_index 0"):
        evaluator.process([{"video_id": "v2", "frame_index": 0}], [output])


def test_evaluator_rejects_bad_outputs_and_several_processes(dataset_name, monkeypatch):
    sg = np.zeros((2, 2), dtype=np.int64)
    evaluator = VideoPanopticEvaluator(dataset_name, read_ground_truth=lambda r: (sg, sg))
    evaluator.reset()
    ids = torch.ones((2, 2), dtype=torch.int32)
    untracked = {"panoptic_seg": (ids, [{"id": 1, "category_id": 0, "isthing": True}])}
    with pytest.raises(ValueError, match="track_id"):
        evaluator.process([{"video_id": 0, "frame_index": 0}], [untracked])
    unknown = {"panoptic_seg": (ids * 2, [{"id": 1, "category_id": 2, "isthing": False}])}
    with pytest.raises(ValueError, match=r"\[2\] .* not in segments_info"):
        evaluator.process([{"video_id": 0, "frame_index": 0}], [unknown])
    small = {"panoptic_seg": (ids[:1], [{"id": 1, "category_id": 2, "isthing": False}])}
    with pytest.raises(ValueError, match="video 0, frame_index 0: .*shape"):
        evaluator.process([{"video_id": 0, "frame_index": 0}], [small])

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    with pytest.raises(RuntimeError, match="one process"):
        evaluator.reset()


def test_evaluator_checks_metadata():
    name = f"video_metrics_test_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(
        thing_dataset_id_to_contiguous_id={1: 0}, stuff_dataset_id_to_contiguous_id={2: 2}
    )
    try:
        with pytest.raises(ValueError, match="0 .. C - 1"):
            VideoPanopticEvaluator(name, read_ground_truth=lambda r: None)
    finally:
        MetadataCatalog.remove(name)
