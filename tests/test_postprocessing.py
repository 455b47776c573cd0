"""Inference post-processing of K-Net against reference implementations of the official code.

The references compute the full-resolution maps of all kernels at once (in float64) and run the
official merge as a Python loop over the kernels by descending score. The tile-pruned CPU path
is compared with them and with the chunked full computation: equal up to floating-point
rounding, i.e. at most 1e-4 of the pixels differ (none, on most of these inputs).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import knet.modeling.postprocessing.statistics as statistics
from knet.modeling.postprocessing import (
    KNetPostProcessor,
    OutputGeometry,
    detectron2_outputs,
    full_mask_statistics,
    kernel_scores_and_labels,
    mask_statistics,
    masks_to_boxes,
    resize_to_output,
    select_instances,
    semantic_probabilities,
    semantic_scores,
)

# 6 thing kernels, 3 thing + 2 stuff classes -> 8 kernels
P, T, K = 6, 3, 5
N = P + K - T
PADDED, IMAGE, OUTPUT = (40, 48), (37, 45), (50, 61)
SIZES = {"padded_size": PADDED, "image_size": IMAGE, "output_size": OUTPUT}
MAX_DIFFERING = 1e-4  # share of pixels that may differ from the reference (rounding)


def geometry_of(sizes) -> OutputGeometry:
    same = tuple(sizes["output_size"]) == tuple(sizes["image_size"])
    return OutputGeometry(
        sizes["padded_size"], sizes["image_size"], None if same else sizes["output_size"]
    )


# ----------------------------------------------------------------------------- references
def ref_probs(mask_logits: torch.Tensor, padded, image, output) -> torch.Tensor:
    """All kernels at once: sigmoid -> padded size -> crop -> output size (bilinear)."""
    probs = torch.sigmoid(mask_logits.double())[None]
    probs = F.interpolate(probs, size=padded, mode="bilinear", align_corners=False)
    probs = probs[:, :, : image[0], : image[1]]
    return F.interpolate(probs, size=output, mode="bilinear", align_corners=False)[0].float()


def ref_scores_labels(cls_logits: torch.Tensor, num_thing: int, num_prop: int):
    probs = torch.sigmoid(cls_logits.float())
    scores, labels = [], []
    for n in range(cls_logits.shape[0]):
        if n < num_prop:
            row = probs[n, :num_thing]
            scores.append(float(row.max()))
            labels.append(int(row.argmax()))
        else:
            c = num_thing + n - num_prop
            scores.append(float(probs[n, c]))
            labels.append(c)
    return torch.tensor(scores), labels


def ref_panoptic(cls_logits, mask_logits, score_thr=0.3, overlap_thr=0.6, sizes=None):
    """The official merge_stuff_thing on full-resolution maps of all kernels at once."""
    sizes = sizes or SIZES
    probs = ref_probs(mask_logits, sizes["padded_size"], sizes["image_size"], sizes["output_size"])
    scores, labels = ref_scores_labels(cls_logits, T, P)
    id_map = (scores[:, None, None] * probs).argmax(0)
    panoptic = torch.zeros(sizes["output_size"], dtype=torch.int32)
    info = []
    order = np.argsort(-scores.numpy(), kind="stable")
    for k in order.tolist():
        isthing = labels[k] < T
        if isthing and scores[k] < score_thr:
            continue
        mask = id_map == k
        area = int(mask.sum())
        original_area = int((probs[k] >= 0.5).sum())
        if area > 0 and original_area > 0:
            if area / original_area < overlap_thr:
                continue
            segment_id = len(info) + 1
            panoptic[mask] = segment_id
            info.append(
                {
                    "id": segment_id,
                    "category_id": labels[k],
                    "isthing": isthing,
                    "score": float(scores[k]),
                    "area": area,
                }
            )
    return panoptic, info


def np_box(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


# ----------------------------------------------------------------------------- inputs
def blob_logits(n: int, hw=(10, 12), seed: int = 0, noise: float = 1.5) -> torch.Tensor:
    """Stride-4 mask logits: a random rectangle of positive logits per kernel, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    logits = torch.full((n, h, w), -4.0)
    for i in range(n):
        y0 = int(torch.randint(0, h - 2, (1,), generator=gen))
        x0 = int(torch.randint(0, w - 2, (1,), generator=gen))
        y1 = y0 + 2 + int(torch.randint(0, h - y0 - 1, (1,), generator=gen))
        x1 = x0 + 2 + int(torch.randint(0, w - x0 - 1, (1,), generator=gen))
        logits[i, y0:y1, x0:x1] = 4.0
    return logits + noise * torch.randn(n, h, w, generator=gen)


def random_cls(n: int = N, k: int = K, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.randn(n, k, generator=gen) * 2


def postprocess(cls_logits, mask_logits, sizes=None, num_thing=T, num_prop=P, **options):
    """Detectron2 outputs of ``KNetPostProcessor`` with the outputs and options given (the
    kernels are ``num_prop`` thing kernels and one per stuff class)."""
    assert cls_logits.shape[0] == num_prop + cls_logits.shape[1] - num_thing
    flags = {"panoptic_on": False, "instance_on": False, "semantic_on": False}
    flags.update({k: v for k, v in options.items() if k in flags})
    kwargs = {k: v for k, v in options.items() if k not in flags}
    processor = KNetPostProcessor(num_thing_classes=num_thing, **flags, **kwargs)
    out = processor(cls_logits, mask_logits, geometry_of(sizes or SIZES))
    return detectron2_outputs(out)


def run_panoptic(cls_logits, mask_logits, sizes=None, **options):
    return postprocess(cls_logits, mask_logits, sizes, panoptic_on=True, **options)["panoptic_seg"]


def run_instance(cls_logits, mask_logits, topk=100, score_thresh=0.0, sizes=None):
    out = postprocess(
        cls_logits,
        mask_logits,
        sizes,
        instance_on=True,
        topk=topk,
        instances_score_thresh=score_thresh,
    )
    return out["instances"]


@pytest.fixture
def always_tiled(monkeypatch):
    """The tiled path runs even where the full maps would be cheaper (small test maps)."""
    monkeypatch.setattr(statistics, "MAX_EVALUATED_SHARE", float("inf"))


@pytest.fixture(params=["tiled", "full"])
def path(request, monkeypatch):
    """Runs a test through the tiled CPU path and through the full computation."""
    if request.param == "tiled":
        monkeypatch.setattr(statistics, "MAX_EVALUATED_SHARE", float("inf"))
    else:
        monkeypatch.setattr(statistics, "tiled_mask_statistics", lambda *args: None)
    return request.param


def assert_same_segments(got, ref, max_differing=0.0):
    """Same segments (ids, categories, scores, areas up to the differing pixels) and id maps
    differing on at most ``max_differing`` of the pixels."""
    (ids, info), (ref_ids, ref_info) = got, ref
    assert ids.dtype == torch.int32 and ids.shape == ref_ids.shape
    differing = int((ids != ref_ids).sum())
    assert differing <= max_differing * ids.numel()
    assert len(info) == len(ref_info)
    for s, r in zip(info, ref_info):
        assert set(s) == {"id", "category_id", "isthing", "score", "area"}
        assert (s["id"], s["category_id"], s["isthing"]) == (
            r["id"],
            r["category_id"],
            r["isthing"],
        )
        assert s["score"] == pytest.approx(r["score"], rel=1e-6)
        assert abs(s["area"] - r["area"]) <= differing


# ----------------------------------------------------------------------------- resizing
def test_resize_matches_reference_and_shape():
    logits = blob_logits(N, seed=1)
    got = resize_to_output(logits.sigmoid(), geometry_of(SIZES))
    assert got.shape == (N, *OUTPUT) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref_probs(logits, PADDED, IMAGE, OUTPUT), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_resize_in_chunks_equals_all_at_once(chunk_size):
    maps = blob_logits(N, seed=2).sigmoid()
    geometry = geometry_of(SIZES)
    torch.testing.assert_close(
        resize_to_output(maps, geometry, chunk_size),
        resize_to_output(maps, geometry),
        atol=1e-6,
        rtol=0,
    )


class _TracedResize(torch.nn.Module):
    """The exported graphs' resizing of 8 maps in chunks of 3: the image size from ``image``."""

    def forward(self, image, maps):
        h, w = maps.shape[1:]
        geometry = OutputGeometry((4 * h, 4 * w), (image.shape[1], image.shape[2]))
        return resize_to_output(maps, geometry, chunk_size=3)


def test_resize_traced_in_chunks_equals_all_at_once_at_other_sizes():
    gen = torch.Generator().manual_seed(4)
    sample = (torch.zeros(1, 61, 90), torch.rand(8, 16, 24, generator=gen))
    traced = torch.jit.trace(_TracedResize(), sample, check_trace=False)
    maps = torch.rand(8, 14, 20, generator=gen)
    got = traced(torch.zeros(1, 53, 77), maps)
    torch.testing.assert_close(got, resize_to_output(maps, OutputGeometry((56, 80), (53, 77))))


def test_resize_crops_padding_before_resizing():
    # padded 64x64, image 32x40: the stride-4 logits cover the image in rows < 8, cols < 10
    geometry = OutputGeometry((64, 64), (32, 40), (48, 60))
    gen = torch.Generator().manual_seed(2)
    inside = torch.randn(1, 16, 16, generator=gen)
    other = inside.clone()
    # the padded region differs (leaving one stride-4 cell of bilinear support untouched)
    other[:, 9:, :] = 8.0
    other[:, :, 11:] = -8.0
    a = resize_to_output(inside.sigmoid(), geometry)
    b = resize_to_output(other.sigmoid(), geometry)
    assert a.shape == (1, 48, 60)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # and the image content is not squeezed: resizing the uncropped padded map differs
    uncropped = F.interpolate(
        F.interpolate(inside.sigmoid()[None], size=(64, 64), mode="bilinear", align_corners=False),
        size=(48, 60),
        mode="bilinear",
        align_corners=False,
    )[0]
    assert not torch.allclose(a, uncropped, atol=1e-3)


def test_output_size_equal_to_the_image_skips_the_second_resize():
    maps = blob_logits(N, seed=3).sigmoid()
    once = resize_to_output(maps, OutputGeometry(PADDED, IMAGE))
    twice = resize_to_output(maps, OutputGeometry(PADDED, IMAGE, IMAGE))
    torch.testing.assert_close(once, twice, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- panoptic
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000])
def test_panoptic_matches_the_official_merge(seed, chunk_size, path):
    cls_logits = random_cls(seed=seed)
    mask_logits = blob_logits(N, seed=seed)
    got = run_panoptic(cls_logits, mask_logits, chunk_size=chunk_size)
    assert_same_segments(got, ref_panoptic(cls_logits, mask_logits))


def ref_joint_panoptic(cls_logits, mask_logits, score_thr=0.3, overlap_thr=0.6, topk=100):
    """Video K-Net's merge_stuff_thing_stuff_joint as a loop: the top-k (thing kernel, thing
    class) pairs and the stuff kernels by score compete pixel by pixel (score x probability),
    then are visited by descending score; kernel of each segment in "kernel"."""
    probs = ref_probs(mask_logits, PADDED, IMAGE, OUTPUT)
    cls = torch.sigmoid(cls_logits.double())
    pairs = sorted(
        ((float(cls[n, c]), n, c) for n in range(P) for c in range(T)),
        key=lambda x: -x[0],  # a stable sort: ties keep (kernel, class) order
    )[:topk]
    stuff = sorted(((float(cls[P + i, T + i]), P + i, T + i) for i in range(K - T)),
                   key=lambda x: -x[0])  # fmt: skip
    candidates = pairs + stuff
    weighted = torch.stack([score * probs[n] for score, n, _ in candidates])
    owner = weighted.argmax(0)
    panoptic = torch.zeros(OUTPUT, dtype=torch.int32)
    info = []
    for k in sorted(range(len(candidates)), key=lambda k: -candidates[k][0]):
        score, n, label = candidates[k]
        if label < T and score < score_thr:
            continue
        mask = owner == k
        area, own = int(mask.sum()), int((probs[n] >= 0.5).sum())
        if area > 0 and own > 0 and area / own >= overlap_thr:
            info.append({"id": len(info) + 1, "category_id": label, "isthing": label < T,
                         "score": score, "area": area, "kernel": n})  # fmt: skip
            panoptic[mask] = len(info)
    return panoptic, info


@pytest.mark.parametrize("seed", range(6))
def test_joint_merge_matches_video_knet(seed, path):
    """Thing candidates are (kernel, class) pairs: one kernel may enter with two classes."""
    cls_logits = random_cls(seed=seed)
    cls_logits[0, :T] = torch.tensor([3.0, 2.5, 2.0])  # kernel 0 comes with every thing class
    mask_logits = blob_logits(N, seed=seed)
    expected_ids, expected = ref_joint_panoptic(cls_logits, mask_logits)
    processor = KNetPostProcessor(
        num_thing_classes=T, panoptic_on=True, instance_on=True, semantic_on=False,
        joint_merge=True, segment_kernels=True,
    )  # fmt: skip
    out = processor(cls_logits, mask_logits, geometry_of(SIZES))
    ids, info = detectron2_outputs(out)["panoptic_seg"]
    assert int((ids != expected_ids).sum()) <= MAX_DIFFERING * ids.numel()
    assert [(s["category_id"], s["kernel"], s["isthing"]) for s in info] == [
        (r["category_id"], r["kernel"], r["isthing"]) for r in expected
    ]
    assert [s["score"] for s in info] == pytest.approx([r["score"] for r in expected], rel=1e-6)
    # the instances are the first thing candidates: the instance output is unchanged
    torch.testing.assert_close(out["scores"], select_instances(cls_logits, T, P, 100, 0.0)[0])


def test_panoptic_reference_inputs_are_not_trivial():
    """The random inputs above produce kept things and stuff, dropped kernels and void."""
    kept_things = kept_stuff = dropped = void = 0
    for seed in range(5):
        cls_logits, mask_logits = random_cls(seed=seed), blob_logits(N, seed=seed)
        panoptic, info = ref_panoptic(cls_logits, mask_logits)
        kept_things += sum(s["isthing"] for s in info)
        kept_stuff += sum(not s["isthing"] for s in info)
        dropped += N - len(info)
        void += int((panoptic == 0).sum())
    assert kept_things > 0 and kept_stuff > 0 and dropped > 0 and void > 0


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_panoptic_invariants(seed, path):
    cls_logits = random_cls(seed=seed)
    mask_logits = blob_logits(N, seed=seed)
    panoptic, info = run_panoptic(cls_logits, mask_logits, chunk_size=3)
    ids = [s["id"] for s in info]
    assert ids == list(range(1, len(ids) + 1))
    present = set(torch.unique(panoptic).tolist()) - {0}
    assert present == set(ids)
    assert [s["score"] for s in info] == sorted((s["score"] for s in info), reverse=True)
    probs = ref_probs(mask_logits, PADDED, IMAGE, OUTPUT)
    scores, labels = ref_scores_labels(cls_logits, T, P)
    for s in info:
        assert 0 <= s["category_id"] < K
        assert s["isthing"] == (s["category_id"] < T)
        assert s["area"] == int((panoptic == s["id"]).sum())
        if s["isthing"]:
            assert s["score"] >= 0.3
        # the kernel this segment came from: same score and category
        k = min(
            range(N),
            key=lambda n: abs(float(scores[n]) - s["score"]) + (labels[n] != s["category_id"]),
        )
        own = int((probs[k] >= 0.5).sum())
        assert own > 0 and s["area"] / own >= 0.6


def test_panoptic_thing_score_threshold_and_stuff_unthresholded(path):
    mask_logits = torch.full((N, 10, 12), -6.0)
    mask_logits[0, :5, :6] = 6.0  # thing kernel 0, score below 0.3
    mask_logits[1, 5:, :6] = 6.0  # thing kernel 1, score above 0.3
    mask_logits[P, :, 6:] = 6.0  # stuff kernel 0 (class T), low score
    cls_logits = torch.full((N, K), -8.0)
    cls_logits[0, 1] = -1.0  # sigmoid 0.27
    cls_logits[1, 2] = 0.0  # sigmoid 0.5
    cls_logits[P, T] = -3.0  # sigmoid 0.047: stuff is never thresholded
    panoptic, info = run_panoptic(cls_logits, mask_logits)
    cats = sorted((s["category_id"], s["isthing"]) for s in info)
    assert cats == [(2, True), (T, False)]
    assert_same_segments((panoptic, info), ref_panoptic(cls_logits, mask_logits))
    # the region of the dropped thing is void, not given to another segment
    probs = ref_probs(mask_logits, PADDED, IMAGE, OUTPUT)
    assert bool((panoptic[(probs[0] > 0.99) & (probs[1] < 0.01)] == 0).all())
    # the threshold is the one given
    _, info = run_panoptic(cls_logits, mask_logits, thing_score_thresh=0.2)
    assert sorted(s["category_id"] for s in info) == [1, 2, T]


def test_panoptic_overlap_ratio_drops_occluded_kernel(path):
    mask_logits = torch.full((N, 10, 12), -6.0)
    mask_logits[0, 1:9, 1:11] = 6.0  # large, high score
    mask_logits[1, 1:6, 1:11] = 6.0  # mostly covered by kernel 0 -> dropped
    mask_logits[2, 0:10, 0:12] = 6.0  # covers everything, low score -> small won area
    cls_logits = torch.full((N, K), -8.0)
    cls_logits[0, 0] = 4.0
    cls_logits[1, 1] = 2.0
    cls_logits[2, 2] = 0.0
    panoptic, info = run_panoptic(cls_logits, mask_logits)
    assert [s["category_id"] for s in info] == [0]
    assert_same_segments((panoptic, info), ref_panoptic(cls_logits, mask_logits))
    # with a permissive overlap threshold the occluded kernels come back
    panoptic, info = run_panoptic(cls_logits, mask_logits, overlap_threshold=0.0)
    assert sorted(s["category_id"] for s in info) == [0, 2]  # kernel 1 wins no pixel at all


def test_panoptic_without_segments_is_void(path):
    mask_logits = torch.full((N, 10, 12), -6.0)
    panoptic, info = run_panoptic(random_cls(seed=9), mask_logits)
    assert info == [] and bool((panoptic == 0).all())


@pytest.mark.parametrize("kind", ["duplicates", "saturated"])
def test_panoptic_ties_go_to_the_first_kernel(kind, path):
    """Equal values of score x prob: the first kernel wins, also across chunks."""
    sizes = {"padded_size": (68, 92), "image_size": (65, 89), "output_size": (97, 131)}
    n_prop, n_thing, n_cls = 20, 3, 6
    n = n_prop + n_cls - n_thing
    mask_logits = blob_logits(n, (17, 23), seed=5)
    cls_logits = torch.full((n, n_cls), -3.0)
    cls_logits[:, 0] = torch.linspace(-2, 3, n)
    if kind == "duplicates":  # kernel 2 repeated in the same and in the next chunk of 16
        cls_logits[2, 0] = 6.0
        for k in (7, 17):
            mask_logits[k], cls_logits[k] = mask_logits[2], cls_logits[2]
        winner = 2
    else:  # probability exactly 1 (everywhere or on a half), same score, thing and stuff
        mask_logits[9] = mask_logits[10] = mask_logits[n - 1] = 40.0
        mask_logits[8, :, :11] = 40.0
        cls_logits[8:11, 1] = 5.0
        cls_logits[n - 1, n_cls - 1] = 5.0
        winner = 8
    got = run_panoptic(cls_logits, mask_logits, sizes, num_thing=n_thing, num_prop=n_prop)
    ref = official_panoptic(cls_logits, mask_logits, n_thing, n_prop, sizes)
    assert_same_segments(got, ref)
    scores = kernel_scores_and_labels(cls_logits, n_thing, n_prop)[0]
    assert got[1][0]["score"] == float(scores[winner])


def official_panoptic(
    cls_logits, mask_logits, num_thing, num_prop, sizes, score_thr=0.3, overlap_thr=0.6
):
    """merge_stuff_thing as the official code runs it: float32 maps of all kernels at once."""
    probs = torch.sigmoid(mask_logits.float())[None]
    probs = F.interpolate(probs, size=sizes["padded_size"], mode="bilinear", align_corners=False)
    probs = probs[:, :, : sizes["image_size"][0], : sizes["image_size"][1]]
    if sizes["output_size"] != sizes["image_size"]:
        probs = F.interpolate(
            probs, size=sizes["output_size"], mode="bilinear", align_corners=False
        )
    probs = probs[0]
    cls = torch.sigmoid(cls_logits.float())
    thing_scores, thing_labels = cls[:num_prop, :num_thing].max(1)
    stuff = torch.arange(cls.shape[0] - num_prop)
    scores = torch.cat([thing_scores, cls[num_prop + stuff, num_thing + stuff]])
    labels = torch.cat([thing_labels, num_thing + stuff])
    id_map = (scores[:, None, None] * probs).argmax(0)  # the first maximum
    panoptic = torch.zeros(sizes["output_size"], dtype=torch.int32)
    info = []
    for k in np.argsort(-scores.numpy(), kind="stable").tolist():
        isthing = int(labels[k]) < num_thing
        if isthing and scores[k] < score_thr:
            continue
        mask = id_map == k
        area, original_area = int(mask.sum()), int((probs[k] >= 0.5).sum())
        if area > 0 and original_area > 0:
            if area / original_area < overlap_thr:
                continue
            info.append(
                {
                    "id": len(info) + 1,
                    "category_id": int(labels[k]),
                    "isthing": isthing,
                    "score": float(scores[k]),
                    "area": area,
                }
            )
            panoptic[mask] = len(info)
    return panoptic, info


# ----------------------------------------------------------------------------- tiled path
# Realistic sizes: stride-4 maps of trained-like predictions (sharp blobs, large stuff regions)
# with the geometries of the model's test resizing.
TILED_CASES = {
    "same size": ((48, 76), OutputGeometry((192, 304), (192, 304))),
    "cropped": ((50, 64), OutputGeometry((200, 256), (197, 250))),
    "downscaled": ((50, 68), OutputGeometry((200, 272), (200, 267), (120, 160))),
    "upscaled": ((14, 20), OutputGeometry((56, 80), (53, 75), (250, 353))),
    "odd": ((23, 41), OutputGeometry((92, 164), (91, 161), (137, 97))),
}


def trained_like(n_prop, n_stuff, hw, seed, n_cls=12, n_thing=7):
    """Sharp elliptic masks (logits +-10 with noise), a few confident things, scored stuff."""
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    logits = torch.empty(n_prop + n_stuff, h, w)
    for i in range(logits.shape[0]):
        cy, cx = (torch.rand(2, generator=gen) * torch.tensor([h, w])).tolist()
        ry, rx = ((torch.rand(2, generator=gen) * 0.3 + 0.05) * torch.tensor([h, w])).tolist()
        scale = 2.5 if i >= n_prop else 1.0
        dist = (((yy - cy) / (ry * scale)) ** 2 + ((xx - cx) / (rx * scale)) ** 2).sqrt()
        logits[i] = 10 * (1 - dist) + 0.5 * torch.randn(h, w, generator=gen)
    cls = torch.randn(logits.shape[0], n_cls, generator=gen) * 2 - 3
    cls[:n_prop:3, :n_thing] += 5
    return cls, logits


def assert_statistics_agree(got, ref):
    """Owner maps and masks differ on at most MAX_DIFFERING of the pixels; areas accordingly."""
    assert got.owner.shape == ref.owner.shape and got.owner.dtype == torch.int64
    differing = int((got.owner != ref.owner).sum())
    assert differing <= MAX_DIFFERING * ref.owner.numel()
    assert int((got.won_area - ref.won_area).abs().sum()) <= 2 * differing
    owning = (ref.won_area > 0) & (got.won_area > 0)
    area_diff = (got.own_area - ref.own_area)[owning].abs()
    assert bool((area_diff <= MAX_DIFFERING * ref.owner.numel()).all())
    assert got.selected_masks.shape == ref.selected_masks.shape
    assert got.selected_masks.dtype == torch.bool
    masks_differing = int((got.selected_masks != ref.selected_masks).sum())
    assert masks_differing <= MAX_DIFFERING * ref.selected_masks.numel()


@pytest.mark.parametrize("name", sorted(TILED_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_tiled_statistics_agree_with_the_full_computation(name, seed, always_tiled):
    hw, geometry = TILED_CASES[name]
    cls_logits, mask_logits = trained_like(30, 5, hw, seed)
    scores = kernel_scores_and_labels(cls_logits, 7, 30)[0]
    selected = select_instances(cls_logits, 7, 30, topk=40, score_thresh=0.0)[2]
    got = statistics.tiled_mask_statistics(mask_logits, geometry, scores, selected, 0.5)
    ref = full_mask_statistics(mask_logits, geometry, scores, selected, 0.5, chunk_size=7)
    assert got is not None
    assert_statistics_agree(got, ref)
    # the inputs are not trivial: several owners, partial masks
    assert int((ref.won_area > 0).sum()) > 3
    assert 0 < int(ref.selected_masks.sum()) < ref.selected_masks.numel() // 2


@pytest.mark.parametrize("name", sorted(TILED_CASES))
def test_tiled_panoptic_and_instances_match_the_official_computation(name, always_tiled):
    hw, geometry = TILED_CASES[name]
    cls_logits, mask_logits = trained_like(30, 5, hw, seed=3)
    sizes = {
        "padded_size": geometry.padded_size,
        "image_size": geometry.image_size,
        "output_size": geometry.out_size,
    }
    got = run_panoptic(cls_logits, mask_logits, sizes, num_thing=7, num_prop=30)
    ref = official_panoptic(cls_logits, mask_logits, 7, 30, sizes)
    assert len(ref[1]) > 2
    assert_same_segments(got, ref, max_differing=MAX_DIFFERING)
    instances = postprocess(
        cls_logits, mask_logits, sizes, num_thing=7, num_prop=30, instance_on=True, topk=20
    )["instances"]
    probs = ref_probs(mask_logits, sizes["padded_size"], sizes["image_size"], sizes["output_size"])
    kernels = select_instances(cls_logits, 7, 30, topk=20, score_thresh=0.0)[2]
    differing = int((instances.pred_masks != (probs[kernels] > 0.5)).sum())
    assert differing <= MAX_DIFFERING * instances.pred_masks.numel()


def test_tiled_statistics_of_scores_or_selection_alone(always_tiled):
    hw, geometry = TILED_CASES["cropped"]
    cls_logits, mask_logits = trained_like(30, 5, hw, seed=4)
    scores = kernel_scores_and_labels(cls_logits, 7, 30)[0]
    selected = torch.tensor([3, 3, 0, 29])
    only_scores = statistics.tiled_mask_statistics(mask_logits, geometry, scores, None, 0.5)
    only_masks = statistics.tiled_mask_statistics(mask_logits, geometry, None, selected, 0.5)
    ref = full_mask_statistics(mask_logits, geometry, scores, selected)
    assert only_scores.selected_masks.shape == (0, *geometry.out_size)
    assert only_masks.owner.numel() == 0 and only_masks.won_area.numel() == 0
    assert_statistics_agree(only_scores._replace(selected_masks=ref.selected_masks), ref)
    assert_statistics_agree(
        only_masks._replace(owner=ref.owner, won_area=ref.won_area, own_area=ref.own_area), ref
    )
    assert torch.equal(only_masks.selected_masks[0], only_masks.selected_masks[1])


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_tiled_statistics_near_and_at_the_mask_threshold(threshold, always_tiled):
    """Probabilities equal to, or within rounding of, the threshold: decided by evaluation."""
    hw, geometry = TILED_CASES["odd"]
    gen = torch.Generator().manual_seed(6)
    logit = float(torch.logit(torch.tensor(threshold, dtype=torch.float64)))
    mask_logits = logit + torch.randn(8, *hw, generator=gen) * 1e-6
    mask_logits[0] = logit
    mask_logits[1, ::2] = logit + 3.0
    scores = torch.rand(8, generator=gen)
    selected = torch.arange(8)
    got = statistics.tiled_mask_statistics(mask_logits, geometry, scores, selected, threshold)
    ref = full_mask_statistics(mask_logits, geometry, scores, selected, threshold)
    assert got is not None
    assert int((got.owner != ref.owner).sum()) <= MAX_DIFFERING * ref.owner.numel()
    # pixels within rounding of the threshold may go either way; all others agree
    probs = resize_to_output(mask_logits.sigmoid(), geometry)
    clear = (probs - threshold).abs() > 1e-5
    assert bool(clear.any()) and bool((~clear).any())
    assert torch.equal(got.selected_masks[clear], ref.selected_masks[clear])
    assert bool(ref.won_area[1] > 0)
    assert abs(int(got.own_area[1]) - int(ref.own_area[1])) <= int((~clear[1]).sum())


def test_tiled_path_hands_over_where_bounds_do_not_help():
    """Maps that are all alike everywhere leave every tile open: the full computation runs."""
    hw, geometry = TILED_CASES["same size"]
    mask_logits = torch.randn(20, *hw, generator=torch.Generator().manual_seed(7)) * 0.01
    scores = torch.full((20,), 0.5)
    assert statistics.tiled_mask_statistics(mask_logits, geometry, scores, None, 0.5) is None
    got = mask_statistics(mask_logits, geometry, scores, None)
    ref = full_mask_statistics(mask_logits, geometry, scores, None)
    assert torch.equal(got.owner, ref.owner)


def test_tiled_path_hands_over_non_finite_logits():
    hw, geometry = TILED_CASES["cropped"]
    _, mask_logits = trained_like(30, 5, hw, seed=8)
    mask_logits[3, 4, 5] = float("nan")
    assert (
        statistics.tiled_mask_statistics(mask_logits, geometry, torch.rand(35), None, 0.5) is None
    )
    mask_logits[3, 4, 5] = float("inf")  # infinite logits are probabilities 0 or 1: fine
    assert (
        statistics.tiled_mask_statistics(mask_logits, geometry, torch.rand(35), None, 0.5)
        is not None
    )


# ----------------------------------------------------------------------------- instance
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_inference_properties(seed, path):
    cls_logits = random_cls(seed=seed)
    cls_logits[P:] = 10.0  # stuff kernels must never produce instances
    mask_logits = blob_logits(N, seed=seed)
    result = run_instance(cls_logits, mask_logits, topk=7)
    assert result.image_size == OUTPUT
    assert len(result) == 7
    scores = result.scores
    assert bool((scores[:-1] >= scores[1:]).all())
    assert bool((result.pred_classes < T).all()) and bool((result.pred_classes >= 0).all())
    assert result.pred_masks.dtype == torch.bool and result.pred_masks.shape == (7, *OUTPUT)

    # the top-7 (kernel, class) pairs over the thing kernels, by class probability
    probs = torch.sigmoid(cls_logits[:P, :T].float())
    ref_scores = sorted(probs.flatten().tolist(), reverse=True)[:7]
    assert scores.tolist() == pytest.approx(ref_scores, rel=1e-6)

    full = ref_probs(mask_logits, PADDED, IMAGE, OUTPUT)
    for i in range(len(result)):
        c = int(result.pred_classes[i])
        matches = [n for n in range(P) if float(probs[n, c]) == float(scores[i])]
        assert len(matches) == 1
        expected = full[matches[0]] > 0.5
        assert torch.equal(result.pred_masks[i], expected)
        box = result.pred_boxes.tensor[i].tolist()
        assert box == np_box(result.pred_masks[i].numpy())


def test_instance_inference_score_threshold_and_topk(path):
    cls_logits = random_cls(seed=3)
    mask_logits = blob_logits(N, seed=3)
    probs = torch.sigmoid(cls_logits[:P, :T].float()).flatten()
    result = run_instance(cls_logits, mask_logits, topk=100, score_thresh=0.4)
    assert len(result) == int((probs >= 0.4).sum()) > 0
    assert bool((result.scores >= 0.4).all())
    result = run_instance(cls_logits, mask_logits, topk=100)
    assert len(result) == P * T  # all pairs when topk exceeds them
    result = run_instance(cls_logits, mask_logits, topk=3, score_thresh=0.0)
    assert len(result) == 3


def test_instance_inference_with_nothing_above_threshold(path):
    """A score threshold that removes every pair gives an empty Instances of the right size."""
    cls_logits = torch.full((N, K), -6.0)
    result = run_instance(cls_logits, blob_logits(N, seed=8), topk=10, score_thresh=0.5)
    assert len(result) == 0 and result.image_size == OUTPUT
    assert result.pred_masks.shape == (0, *OUTPUT) and result.pred_masks.dtype == torch.bool
    assert result.pred_boxes.tensor.shape == (0, 4)
    assert result.scores.shape == (0,) and result.pred_classes.shape == (0,)


def test_instance_kernel_with_two_classes_appears_twice(path):
    cls_logits = torch.full((N, K), -6.0)
    cls_logits[2, 0] = 3.0
    cls_logits[2, 1] = 2.0
    cls_logits[4, 2] = 1.0
    mask_logits = blob_logits(N, seed=4)
    result = run_instance(cls_logits, mask_logits, topk=3)
    assert result.pred_classes.tolist() == [0, 1, 2]
    assert torch.equal(result.pred_masks[0], result.pred_masks[1])
    assert not torch.equal(result.pred_masks[0], result.pred_masks[2])
    torch.testing.assert_close(result.pred_boxes.tensor[0], result.pred_boxes.tensor[1])


def test_instance_empty_mask_has_zero_box(path):
    cls_logits = torch.full((N, K), -6.0)
    cls_logits[0, 0] = 3.0
    mask_logits = torch.full((N, 10, 12), -8.0)
    result = run_instance(cls_logits, mask_logits, topk=1)
    assert not bool(result.pred_masks.any())
    assert result.pred_boxes.tensor.tolist() == [[0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("output", [(37, 45), (74, 90), (20, 23)])
def test_instance_output_size(output, path):
    sizes = {"padded_size": PADDED, "image_size": IMAGE, "output_size": output}
    result = run_instance(random_cls(seed=5), blob_logits(N, seed=5), topk=4, sizes=sizes)
    assert result.image_size == output and result.pred_masks.shape == (4, *output)
    for i in range(4):
        assert result.pred_boxes.tensor[i].tolist() == np_box(result.pred_masks[i].numpy())


def test_masks_to_boxes_matches_numpy():
    gen = torch.Generator().manual_seed(11)
    masks = torch.rand(6, 9, 14, generator=gen) > 0.9
    masks[0] = False
    masks[1] = False
    masks[1, 8, 13] = True  # a single corner pixel
    masks[2] = True
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.float32 and boxes.shape == (6, 4)
    assert boxes.tolist() == [np_box(m.numpy()) for m in masks]


def test_panoptic_and_instances_together_equal_each_alone(path):
    cls_logits = random_cls(seed=12)
    mask_logits = blob_logits(N, seed=12)
    both = postprocess(cls_logits, mask_logits, panoptic_on=True, instance_on=True, topk=7)
    panoptic = run_panoptic(cls_logits, mask_logits)
    instances = run_instance(cls_logits, mask_logits, topk=7)
    assert_same_segments(both["panoptic_seg"], panoptic)
    assert torch.equal(both["instances"].pred_masks, instances.pred_masks)
    assert torch.equal(both["instances"].pred_boxes.tensor, instances.pred_boxes.tensor)
    assert torch.equal(both["instances"].scores, instances.scores)


# ----------------------------------------------------------------------------- semantic
def test_semantic_scores_match_reference():
    cls_logits = random_cls(seed=6)
    mask_logits = blob_logits(N, seed=6)
    got = semantic_scores(cls_logits, mask_logits, geometry_of(SIZES), T, P, chunk_size=2)
    assert got.shape == (K, *OUTPUT)
    probs = ref_probs(mask_logits, PADDED, IMAGE, OUTPUT)
    cls = torch.sigmoid(cls_logits.float())
    ref = torch.zeros(K, *OUTPUT)
    for n in range(N):
        for c in range(K):
            trained = (n < P and c < T) or (n >= P and c == T + n - P)
            if trained:
                ref[c] += cls[n, c] * probs[n]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_semantic_scores_of_an_instance_model():
    cls_logits = random_cls(n=P, k=T, seed=7)
    mask_logits = blob_logits(P, seed=7)
    got = semantic_scores(cls_logits, mask_logits, geometry_of(SIZES), T, P)
    probs = ref_probs(mask_logits, PADDED, IMAGE, OUTPUT)
    ref = torch.einsum("nk,nhw->khw", torch.sigmoid(cls_logits), probs)
    assert got.shape == (T, *OUTPUT)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [0, 2])
def test_semantic_probabilities_are_the_softmax_of_the_resized_logits(chunk_size):
    logits = torch.randn(K, 10, 12, generator=torch.Generator().manual_seed(13)) * 3
    got = semantic_probabilities(logits, geometry_of(SIZES), chunk_size)
    ref = F.interpolate(logits.double()[None], size=PADDED, mode="bilinear", align_corners=False)
    ref = ref[:, :, : IMAGE[0], : IMAGE[1]]
    ref = F.interpolate(ref, size=OUTPUT, mode="bilinear", align_corners=False)[0].softmax(0)
    assert got.shape == (K, *OUTPUT) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- exported graphs
# Exported models resize the stride-4 maps by 4 to the padded input, which is the output: the
# traceable tile-bounded statistics serve that geometry (tests/test_export.py runs them exported).
EXPORT_CASES = {"even": ((48, 64), (192, 256)), "cropped": ((56, 80), (221, 317))}


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_exported_statistics_agree_with_the_full_computation(name, seed):
    hw, image = EXPORT_CASES[name]
    geometry = OutputGeometry((4 * hw[0], 4 * hw[1]), image)
    cls_logits, mask_logits = trained_like(30, 5, hw, seed)
    scores = kernel_scores_and_labels(cls_logits, 7, 30)[0]
    selected = select_instances(cls_logits, 7, 30, topk=40, score_thresh=0.0)[2]
    got = statistics.tiled_mask_statistics(
        mask_logits, geometry, scores, selected, 0.5, traced=True
    )
    ref = full_mask_statistics(mask_logits, geometry, scores, selected, 0.5)
    assert_statistics_agree(got, ref)
    assert int((ref.won_area > 0).sum()) > 3


@pytest.mark.parametrize("half", [False, True])
def test_exported_statistics_of_saturated_maps(half):
    """Saturated maps: one candidate per tile and every threshold decided, so nothing is
    evaluated (empty pair lists); with ``half``, the tiles along one edge are evaluated."""
    geometry = OutputGeometry((64, 96), (61, 90))
    mask_logits = torch.full((6, 16, 24), 30.0)
    if half:
        mask_logits[2, :8] = -30.0
    scores = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.4, 0.5])
    selected = torch.tensor([2, 2, 5])
    got = statistics.tiled_mask_statistics(
        mask_logits, geometry, scores, selected, 0.5, traced=True
    )
    ref = full_mask_statistics(mask_logits, geometry, scores, selected, 0.5)
    assert torch.equal(got.owner, ref.owner) and torch.equal(got.won_area, ref.won_area)
    assert torch.equal(got.own_area, ref.own_area)
    assert torch.equal(got.selected_masks, ref.selected_masks)


class _TracedStatistics(torch.nn.Module):
    """The exported graphs' statistics as a module of tensors: the image size from ``image``."""

    def forward(self, image, mask_logits, scores, selected):
        h, w = mask_logits.shape[1:]
        geometry = OutputGeometry((4 * h, 4 * w), (image.shape[1], image.shape[2]))
        stats = statistics.tiled_mask_statistics(
            mask_logits, geometry, scores, selected, 0.5, traced=True
        )
        return stats.owner, stats.won_area, stats.own_area, stats.selected_masks


def test_statistics_traced_with_one_pair_of_each_kind_run_on_many():
    """A trace whose sample has one tile shared by two kernels, one kernel selected and one
    undecided (kernel, tile) pair keeps those counts dynamic (an assignment of one row can be
    recorded as a reshape to its row's shape): the traced graph then serves inputs with many."""
    mask_logits = torch.full((3, 16, 24), -8.0)
    mask_logits[0] = 8.0  # kernel 0 covers the image; kernel 1 its top-left corner only
    mask_logits[1, :4, :4] = 8.0
    scores, selected = torch.tensor([0.6, 0.9, 0.3]), torch.tensor([1])
    sample = (torch.zeros(1, 61, 90), mask_logits, scores, selected)
    eager = _TracedStatistics()(*sample)
    assert int((eager[1] > 0).sum()) == 2  # two kernels own pixels: one tile is shared
    traced = torch.jit.trace(_TracedStatistics(), sample, check_trace=False)
    hw, image = EXPORT_CASES["cropped"]
    cls_logits, mask_logits = trained_like(30, 5, hw, seed=0)
    scores = kernel_scores_and_labels(cls_logits, 7, 30)[0]
    selected = select_instances(cls_logits, 7, 30, topk=40, score_thresh=0.0)[2]
    got = statistics.MaskStatistics(*traced(torch.zeros(1, *image), mask_logits, scores, selected))
    geometry = OutputGeometry((4 * hw[0], 4 * hw[1]), image)
    assert_statistics_agree(got, full_mask_statistics(mask_logits, geometry, scores, selected))
