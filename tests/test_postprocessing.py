"""Inference post-processing of K-Net against unchunked reference implementations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import knet.modeling.panoptic_merge as pp
from knet.modeling.postprocessing import (
    SelectedMasks,
    instance_inference,
    kernel_scores_and_labels,
    mask_probs_at_image_size,
    panoptic_inference,
    select_instances,
    semantic_inference,
)

# 6 thing kernels, 3 thing + 2 stuff classes -> 8 kernels
P, T, K = 6, 3, 5
N = P + K - T
PADDED, IMAGE, OUTPUT = (40, 48), (37, 45), (50, 61)
SIZES = {"padded_size": PADDED, "image_size": IMAGE, "output_size": OUTPUT}


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


def run_panoptic(cls_logits, mask_logits, chunk_size=16, sizes=None, **overrides):
    kwargs = {
        "num_thing_classes": T,
        "num_proposals": P,
        "instance_score_thresh": 0.3,
        "overlap_threshold": 0.6,
        "mask_threshold": 0.5,
        "chunk_size": chunk_size,
    }
    kwargs.update(overrides)
    return panoptic_inference(cls_logits, mask_logits, **kwargs, **(sizes or SIZES))


def run_instance(cls_logits, mask_logits, topk=100, score_thresh=0.0, sizes=None):
    return instance_inference(
        cls_logits,
        mask_logits,
        num_thing_classes=T,
        num_proposals=P,
        topk=topk,
        score_thresh=score_thresh,
        mask_threshold=0.5,
        **(sizes or SIZES),
    )


# ----------------------------------------------------------------------------- mask resizing
def test_mask_probs_match_reference_and_shape():
    logits = blob_logits(N, seed=1)
    got = mask_probs_at_image_size(logits, PADDED, IMAGE, OUTPUT)
    assert got.shape == (N, *OUTPUT) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref_probs(logits, PADDED, IMAGE, OUTPUT), atol=1e-6, rtol=0)


def test_mask_probs_crop_padding_before_resizing():
    # padded 64x64, image 32x40: the stride-4 logits cover the image in rows < 8, cols < 10
    padded, image, output = (64, 64), (32, 40), (48, 60)
    gen = torch.Generator().manual_seed(2)
    inside = torch.randn(1, 16, 16, generator=gen)
    other = inside.clone()
    # the padded region differs (leaving one stride-4 cell of bilinear support untouched)
    other[:, 9:, :] = 8.0
    other[:, :, 11:] = -8.0
    a = mask_probs_at_image_size(inside, padded, image, output)
    b = mask_probs_at_image_size(other, padded, image, output)
    assert a.shape == (1, *output)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # and the image content is not squeezed: resizing the uncropped padded map differs
    uncropped = F.interpolate(
        F.interpolate(inside.sigmoid()[None], size=padded, mode="bilinear", align_corners=False),
        size=output,
        mode="bilinear",
        align_corners=False,
    )[0]
    assert not torch.allclose(a, uncropped, atol=1e-3)


# ----------------------------------------------------------------------------- panoptic
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000])
def test_panoptic_matches_unchunked_reference(seed, chunk_size):
    cls_logits = random_cls(seed=seed)
    mask_logits = blob_logits(N, seed=seed)
    panoptic, info = run_panoptic(cls_logits, mask_logits, chunk_size=chunk_size)
    ref_panoptic_seg, ref_info = ref_panoptic(cls_logits, mask_logits)
    assert panoptic.shape == OUTPUT and panoptic.dtype == torch.int32
    assert torch.equal(panoptic, ref_panoptic_seg)
    assert len(info) == len(ref_info)
    for got, ref in zip(info, ref_info):
        assert set(got) == {"id", "category_id", "isthing", "score", "area"}
        assert got["id"] == ref["id"] and got["category_id"] == ref["category_id"]
        assert got["isthing"] == ref["isthing"] and got["area"] == ref["area"]
        assert got["score"] == pytest.approx(ref["score"], rel=1e-6)


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
def test_panoptic_invariants(seed):
    cls_logits = random_cls(seed=seed)
    mask_logits = blob_logits(N, seed=seed)
    panoptic, info = run_panoptic(cls_logits, mask_logits, chunk_size=3)
    ids = [s["id"] for s in info]
    assert len(ids) == len(set(ids)) and 0 not in ids
    present = set(torch.unique(panoptic).tolist()) - {0}
    assert present == set(ids)
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


def test_panoptic_thing_score_threshold_and_stuff_unthresholded():
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
    ref_panoptic_seg, ref_info = ref_panoptic(cls_logits, mask_logits)
    assert torch.equal(panoptic, ref_panoptic_seg)
    # the region of the dropped thing is void, not given to another segment
    probs = ref_probs(mask_logits, PADDED, IMAGE, OUTPUT)
    assert bool((panoptic[(probs[0] > 0.99) & (probs[1] < 0.01)] == 0).all())


def test_panoptic_overlap_ratio_drops_occluded_kernel():
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
    ref_panoptic_seg, ref_info = ref_panoptic(cls_logits, mask_logits)
    assert torch.equal(panoptic, ref_panoptic_seg) and len(ref_info) == 1
    # with a permissive overlap threshold the occluded kernels come back
    panoptic, info = run_panoptic(cls_logits, mask_logits, overlap_threshold=0.0)
    assert sorted(s["category_id"] for s in info) == [0, 2]  # kernel 1 wins no pixel at all


def test_panoptic_without_segments_is_void():
    mask_logits = torch.full((N, 10, 12), -6.0)
    panoptic, info = run_panoptic(random_cls(seed=9), mask_logits)
    assert info == [] and bool((panoptic == 0).all())


# ----------------------------------------------------------------------------- instance
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_inference_properties(seed):
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


def test_instance_inference_score_threshold_and_topk():
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


def test_instance_inference_with_nothing_above_threshold():
    """A score threshold that removes every pair gives an empty Instances of the right size."""
    cls_logits = torch.full((N, K), -6.0)
    result = run_instance(cls_logits, blob_logits(N, seed=8), topk=10, score_thresh=0.5)
    assert len(result) == 0 and result.image_size == OUTPUT
    assert result.pred_masks.shape == (0, *OUTPUT) and result.pred_masks.dtype == torch.bool
    assert result.pred_boxes.tensor.shape == (0, 4)
    assert result.scores.shape == (0,) and result.pred_classes.shape == (0,)


def test_mask_probs_of_no_kernels():
    probs = mask_probs_at_image_size(torch.zeros(0, 10, 12), PADDED, IMAGE, OUTPUT)
    assert probs.shape == (0, *OUTPUT)


def test_instance_kernel_with_two_classes_appears_twice():
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


def test_instance_empty_mask_has_zero_box():
    cls_logits = torch.full((N, K), -6.0)
    cls_logits[0, 0] = 3.0
    mask_logits = torch.full((N, 10, 12), -8.0)
    result = run_instance(cls_logits, mask_logits, topk=1)
    assert not bool(result.pred_masks.any())
    assert result.pred_boxes.tensor.tolist() == [[0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("output", [(37, 45), (74, 90), (20, 23)])
def test_instance_output_size(output):
    sizes = {"padded_size": PADDED, "image_size": IMAGE, "output_size": output}
    result = run_instance(random_cls(seed=5), blob_logits(N, seed=5), topk=4, sizes=sizes)
    assert result.image_size == output and result.pred_masks.shape == (4, *output)
    for i in range(4):
        assert result.pred_boxes.tensor[i].tolist() == np_box(result.pred_masks[i].numpy())


# ----------------------------------------------------------------------------- semantic
def test_semantic_inference_matches_reference():
    cls_logits = random_cls(seed=6)
    mask_logits = blob_logits(N, seed=6)
    got = semantic_inference(cls_logits, mask_logits, num_thing_classes=T, num_proposals=P, **SIZES)
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


def test_semantic_inference_instance_model():
    cls_logits = random_cls(n=P, k=T, seed=7)
    mask_logits = blob_logits(P, seed=7)
    got = semantic_inference(cls_logits, mask_logits, num_thing_classes=T, num_proposals=P, **SIZES)
    probs = ref_probs(mask_logits, PADDED, IMAGE, OUTPUT)
    ref = torch.einsum("nk,nhw->khw", torch.sigmoid(cls_logits), probs)
    assert got.shape == (T, *OUTPUT)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_instance_masks_shared_with_the_merge_equal_the_standalone_output(chunk_size):
    """The meta-arch collects instance masks from the merge's chunks: same result as alone."""
    from knet.modeling.postprocessing import SelectedMasks, build_instances, select_instances

    g = torch.Generator().manual_seed(7)
    cls_logits = torch.randn(N, K, generator=g) * 2
    mask_logits = torch.randn(N, 10, 12, generator=g) * 3
    alone = run_instance(cls_logits, mask_logits, topk=7, score_thresh=0.2)
    scores, labels, kernels = select_instances(
        cls_logits, num_thing_classes=T, num_proposals=P, topk=7, score_thresh=0.2
    )
    collected = SelectedMasks(kernels, 0.5, OUTPUT)
    run_panoptic(cls_logits, mask_logits, chunk_size=chunk_size, on_chunk=collected)
    shared = build_instances(OUTPUT, scores, labels, collected.masks)
    assert len(shared) == len(alone) > 0
    assert torch.equal(shared.pred_masks, alone.pred_masks)
    assert torch.equal(shared.scores, alone.scores)
    assert torch.equal(shared.pred_classes, alone.pred_classes)
    assert torch.equal(shared.pred_boxes.tensor, alone.pred_boxes.tensor)


# ----------------------------------------------------------------------------- tiled merge
# On the CPU the merge evaluates the probability maps only on the tiles its bounds leave
# undecided. It must reproduce the full computation bit for bit: it is compared below with the
# official merge on float32 maps of all kernels at once, and with the chunked merge.
# low-res (h, w) and sizes, all with H + W > 128: F.interpolate then uses the generic CPU kernel
# that the tiled merge emulates
TILED_SIZES = {
    "upsample": (
        (17, 23),
        {"padded_size": (68, 92), "image_size": (65, 89), "output_size": (97, 131)},
    ),
    "same": ((16, 25), {"padded_size": (64, 100), "image_size": (61, 99), "output_size": (61, 99)}),
    "downsample": (
        (30, 34),
        {"padded_size": (120, 136), "image_size": (117, 133), "output_size": (58, 77)},
    ),
    "mixed": (
        (12, 40),
        {"padded_size": (48, 160), "image_size": (48, 157), "output_size": (103, 41)},
    ),
}
needs_emulation = pytest.mark.skipif(
    pp._cpu_bilinear_arithmetic() is None,
    reason="F.interpolate's CPU arithmetic is not reproduced on this build: the merge is chunked",
)


@pytest.fixture
def merge_paths(monkeypatch):
    """Counts the runs of the tiled and of the chunked merge computations; the tiled one runs
    even where it costs more than the full maps (the small maps of these tests)."""
    monkeypatch.setattr(pp, "_TILE_COST", 0.0)
    calls = {"tiled": 0, "chunked": 0}
    for name, key in (("_tiled_owner_and_areas", "tiled"), ("_chunked_owner_and_areas", "chunked")):
        original = getattr(pp, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(pp, name, counted)
    return calls


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


def merge(cls_logits, mask_logits, num_thing, num_prop, sizes, chunk_size=16, **overrides):
    kwargs = {"instance_score_thresh": 0.3, "overlap_threshold": 0.6, "mask_threshold": 0.5}
    kwargs.update(overrides)
    return panoptic_inference(
        cls_logits,
        mask_logits,
        num_thing_classes=num_thing,
        num_proposals=num_prop,
        chunk_size=chunk_size,
        **kwargs,
        **sizes,
    )


def assert_same_panoptic(got, ref):
    assert got[0].dtype == torch.int32 and got[0].shape == ref[0].shape
    assert torch.equal(got[0], ref[0])
    assert got[1] == ref[1]  # ids, categories, scores (exact floats), areas and their order


def smooth_logits(n, hw, seed, amplitude=6.0):
    """Smooth random fields: several kernels compete almost everywhere."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, max(2, hw[0] // 4), max(2, hw[1] // 4), generator=gen)
    return amplitude * F.interpolate(coarse, size=hw, mode="bilinear", align_corners=False)[:, 0]


def random_case(n_prop, n_thing, n_cls, hw, seed):
    gen = torch.Generator().manual_seed(seed)
    n = n_prop + n_cls - n_thing
    return torch.randn(n, n_cls, generator=gen) * 2, blob_logits(n, hw, seed=seed)


def assert_same_reductions(
    cls_logits, mask_logits, num_thing, num_prop, sizes, threshold=0.5, area_threshold=0.5
):
    """The tiled reductions (owner, won areas, the own areas the merge uses, instance masks of
    every thing kernel) equal the chunked ones; returns the latter."""
    scores, labels = kernel_scores_and_labels(cls_logits, num_thing, num_prop)
    keepable = (labels >= num_thing) | (scores >= 0.3)
    kernels = torch.arange(num_prop).repeat(2)
    tiled_masks = SelectedMasks(kernels, threshold, sizes["output_size"])
    args = (area_threshold, sizes["padded_size"], sizes["image_size"], sizes["output_size"])
    fused = pp._cpu_bilinear_arithmetic()
    probs = pp._chunked_sigmoid(mask_logits, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pp, "_TILE_COST", 0.0)  # no hand-over to the full maps
        got = pp._tiled_owner_and_areas(scores, probs, keepable, *args, tiled_masks, fused)
    chunked_masks = SelectedMasks(kernels, threshold, sizes["output_size"])
    ref = pp._chunked_owner_and_areas(scores, mask_logits, *args, 16, chunked_masks)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    need = (ref[1] > 0) & keepable
    assert torch.equal(got[2][need], ref[2][need])
    assert torch.equal(tiled_masks.masks, chunked_masks.masks)
    return ref, chunked_masks.masks


def test_resize_emulation_is_bit_identical():
    fused = pp._cpu_bilinear_arithmetic()
    if fused is None:
        pytest.skip("no emulation for this build")
    for hw, sizes in TILED_SIZES.values():
        logits = smooth_logits(5, hw, seed=1) + torch.randn(5, *hw)
        got = pp._resize_exact(logits.sigmoid(), **sizes, fused=fused)
        assert torch.equal(got, mask_probs_at_image_size(logits, **sizes))


@needs_emulation
@pytest.mark.parametrize("name", sorted(TILED_SIZES))
def test_tile_bounds_hold_and_tile_values_are_exact(name):
    fused = pp._cpu_bilinear_arithmetic()
    hw, sizes = TILED_SIZES[name]
    logits = smooth_logits(6, hw, seed=2, amplitude=20.0)
    logits[0] = -100.0 + torch.randn(hw)  # subnormal probabilities
    logits[1, :, ::3] = 40.0  # exactly 1
    probs = logits.sigmoid()
    full = mask_probs_at_image_size(logits, **sizes)
    second = sizes["output_size"] != sizes["image_size"]
    rows, cols = (
        pp._axis_tiles(
            hw[i],
            sizes["padded_size"][i],
            sizes["image_size"][i],
            sizes["output_size"][i],
            second,
            pp._TILE,
            fused,
        )
        for i in range(2)
    )
    lower, upper = pp._widen(*pp._tile_bounds(probs, rows, cols))
    kernels = torch.arange(6)
    for ty in range(rows.n):
        for tx in range(cols.n):
            tile = full[:, rows.pos[ty]][:, :, cols.pos[tx]]
            assert bool((tile.double().amin((1, 2)) >= lower[:, ty, tx]).all())
            assert bool((tile.double().amax((1, 2)) <= upper[:, ty, tx]).all())
            ty_, tx_ = torch.full((6,), ty), torch.full((6,), tx)
            assert torch.equal(pp._tile_probs(probs, kernels, ty_, tx_, rows, cols, fused), tile)


@needs_emulation
@pytest.mark.parametrize("name", sorted(TILED_SIZES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiled_merge_matches_official_merge(name, seed, merge_paths):
    hw, sizes = TILED_SIZES[name]
    cls_logits, mask_logits = random_case(12, 5, 9, hw, seed)
    got = merge(cls_logits, mask_logits, 5, 12, sizes, chunk_size=5)
    ref = official_panoptic(cls_logits, mask_logits, 5, 12, sizes)
    assert merge_paths == {"tiled": 1, "chunked": 0}
    assert_same_panoptic(got, ref)
    assert len(ref[1]) > 0 and bool((ref[0] == 0).any())


@needs_emulation
@pytest.mark.parametrize("name", sorted(TILED_SIZES))
@pytest.mark.parametrize("amplitude", [0.5, 8.0])
def test_tiled_merge_with_many_competing_kernels(name, amplitude, merge_paths):
    """Smooth overlapping maps: most tiles keep several candidates."""
    hw, sizes = TILED_SIZES[name]
    n_prop, n_thing, n_cls = 30, 4, 10
    n = n_prop + n_cls - n_thing
    mask_logits = smooth_logits(n, hw, seed=3, amplitude=amplitude)
    cls_logits = torch.randn(n, n_cls, generator=torch.Generator().manual_seed(4))
    thresholds = {"score_thr": 0.0, "overlap_thr": 0.1}  # keep many kernels
    ref = official_panoptic(cls_logits, mask_logits, n_thing, n_prop, sizes, **thresholds)
    assert len(ref[1]) > 1
    for chunk_size in (1, 7, 16, 100):
        got = merge(
            cls_logits,
            mask_logits,
            n_thing,
            n_prop,
            sizes,
            chunk_size=chunk_size,
            instance_score_thresh=0.0,
            overlap_threshold=0.1,
        )
        assert_same_panoptic(got, ref)
    assert merge_paths == {"tiled": 4, "chunked": 0}
    assert_same_reductions(cls_logits, mask_logits, n_thing, n_prop, sizes)


@needs_emulation
@pytest.mark.parametrize("name", sorted(TILED_SIZES))
@pytest.mark.parametrize("kind", ["duplicates", "saturated"])
def test_tiled_merge_ties_go_to_the_first_kernel(name, kind, merge_paths):
    """Equal values of score x prob: the first kernel wins, also across chunks."""
    hw, sizes = TILED_SIZES[name]
    n_prop, n_thing, n_cls = 20, 3, 6
    n = n_prop + n_cls - n_thing
    mask_logits = blob_logits(n, hw, seed=5)
    cls_logits = torch.full((n, n_cls), -3.0)
    cls_logits[:, 0] = torch.linspace(-2, 3, n)
    if kind == "duplicates":  # kernel 2 repeated in the same and in the next chunk of 16
        cls_logits[2, 0] = 6.0
        for k in (7, 17):
            mask_logits[k], cls_logits[k] = mask_logits[2], cls_logits[2]
        winner = 2
    else:  # probability exactly 1 (everywhere or on a half), same score, thing and stuff
        mask_logits[9] = mask_logits[10] = mask_logits[n - 1] = 40.0
        mask_logits[8, :, : hw[1] // 2] = 40.0
        cls_logits[8:11, 1] = 5.0
        cls_logits[n - 1, n_cls - 1] = 5.0
        winner = 8
    got = merge(cls_logits, mask_logits, n_thing, n_prop, sizes)
    assert_same_panoptic(got, official_panoptic(cls_logits, mask_logits, n_thing, n_prop, sizes))
    assert merge_paths == {"tiled": 1, "chunked": 0}
    chunked = merge(cls_logits, mask_logits, n_thing, n_prop, sizes, on_chunk=lambda *a: None)
    assert merge_paths["chunked"] == 1  # an arbitrary callback needs the full maps
    assert_same_panoptic(got, chunked)
    scores = kernel_scores_and_labels(cls_logits, n_thing, n_prop)[0]
    assert got[1][0]["score"] == float(scores[winner])


@needs_emulation
@pytest.mark.parametrize("name", sorted(TILED_SIZES))
def test_tiled_merge_near_the_mask_threshold(name, merge_paths):
    """Probabilities within a few ulps of 0.5: own areas (>=) and instance masks (>)."""
    hw, sizes = TILED_SIZES[name]
    n_prop, n_thing, n_cls = 8, 3, 5
    n = n_prop + n_cls - n_thing
    gen = torch.Generator().manual_seed(6)
    mask_logits = torch.randn(n, *hw, generator=gen) * 1e-6
    mask_logits[0] = 0.0  # exactly 0.5 before resizing
    mask_logits[1, ::2] = 0.0
    mask_logits[2] = 3e-7 * torch.sign(torch.randn(hw, generator=gen))
    cls_logits = torch.randn(n, n_cls, generator=gen) * 2
    for overlap in (0.0, 0.6, 1.0):
        got = merge(cls_logits, mask_logits, n_thing, n_prop, sizes, overlap_threshold=overlap)
        ref = official_panoptic(
            cls_logits, mask_logits, n_thing, n_prop, sizes, overlap_thr=overlap
        )
        assert_same_panoptic(got, ref)
    selected = select_instances(
        cls_logits, num_thing_classes=n_thing, num_proposals=n_prop, topk=20, score_thresh=0.0
    )
    collected = SelectedMasks(selected[2], 0.5, sizes["output_size"])
    merge(cls_logits, mask_logits, n_thing, n_prop, sizes, on_chunk=collected)
    assert merge_paths == {"tiled": 4, "chunked": 0}
    alone = instance_inference(
        cls_logits,
        mask_logits,
        num_thing_classes=n_thing,
        num_proposals=n_prop,
        topk=20,
        score_thresh=0.0,
        mask_threshold=0.5,
        **sizes,
    )
    assert torch.equal(collected.masks, alone.pred_masks)
    assert bool(collected.masks.any()) and not bool(collected.masks.all())
    assert_same_reductions(cls_logits, mask_logits, n_thing, n_prop, sizes)


@needs_emulation
@pytest.mark.parametrize(
    "case", ["things only", "stuff only", "one kernel", "nothing kept", "tiny values"]
)
def test_tiled_merge_edge_cases(case, merge_paths):
    hw, sizes = TILED_SIZES["upsample"]
    n_prop, n_thing, n_cls = {
        "things only": (6, 3, 3),
        "stuff only": (0, 3, 7),
        "one kernel": (1, 3, 3),
    }.get(case, (6, 3, 7))
    cls_logits, mask_logits = random_case(n_prop, n_thing, n_cls, hw, seed=7)
    if case == "nothing kept":
        mask_logits = torch.full_like(mask_logits, -8.0)
    if case == "tiny values":  # subnormal probabilities and scores: products underflow to 0
        gen = torch.Generator().manual_seed(8)
        mask_logits = -100.0 + torch.randn(mask_logits.shape, generator=gen)
        mask_logits[:, :3] = -200.0
        mask_logits[1, 2:6, 3:9] = 10.0
        cls_logits = -80.0 + torch.randn(cls_logits.shape, generator=gen)
    got = merge(cls_logits, mask_logits, n_thing, n_prop, sizes, instance_score_thresh=0.0)
    ref = official_panoptic(cls_logits, mask_logits, n_thing, n_prop, sizes, score_thr=0.0)
    assert merge_paths == {"tiled": 1, "chunked": 0}
    assert_same_panoptic(got, ref)
    if case == "nothing kept":
        assert got[1] == [] and bool((got[0] == 0).all())
    else:
        assert len(got[1]) > 0
        assert all(s["isthing"] == (case != "stuff only") for s in got[1])


@needs_emulation
@pytest.mark.parametrize("name", sorted(TILED_SIZES))
@pytest.mark.parametrize("chunk_size", [1, 16])
def test_tiled_merge_equals_the_chunked_merge_with_instance_masks(name, chunk_size, merge_paths):
    """Panoptic output and shared instance masks (a kernel selected with several classes, an
    empty mask) equal those of the chunked merge, whose maps come from full-size resizes."""
    hw, sizes = TILED_SIZES[name]
    n_prop, n_thing, n_cls = 15, 4, 8
    cls_logits, mask_logits = random_case(n_prop, n_thing, n_cls, hw, seed=8)
    cls_logits[3, :n_thing] = torch.tensor([4.0, 3.9, 3.8, -5.0])  # kernel 3: three classes
    mask_logits[5] = -30.0  # an empty mask
    selected = select_instances(
        cls_logits, num_thing_classes=n_thing, num_proposals=n_prop, topk=25, score_thresh=0.1
    )
    assert int((selected[2] == 3).sum()) == 3 and bool((selected[2] == 5).any())
    tiled_masks = SelectedMasks(selected[2], 0.5, sizes["output_size"])
    got = merge(cls_logits, mask_logits, n_thing, n_prop, sizes, chunk_size, on_chunk=tiled_masks)
    assert merge_paths == {"tiled": 1, "chunked": 0}
    chunked_masks = SelectedMasks(selected[2], 0.5, sizes["output_size"])
    ref = merge(
        cls_logits, mask_logits, n_thing, n_prop, sizes, chunk_size, on_chunk=chunked_masks.__call__
    )
    assert merge_paths == {"tiled": 1, "chunked": 1}
    assert_same_panoptic(got, ref)
    assert torch.equal(tiled_masks.masks, chunked_masks.masks)
    alone = instance_inference(
        cls_logits,
        mask_logits,
        num_thing_classes=n_thing,
        num_proposals=n_prop,
        topk=25,
        score_thresh=0.1,
        mask_threshold=0.5,
        **sizes,
    )
    assert torch.equal(tiled_masks.masks, alone.pred_masks)
    assert not bool(tiled_masks.masks[selected[2] == 5].any())


@needs_emulation
def test_merge_falls_back_where_f_interpolate_uses_another_kernel(merge_paths):
    """Small outputs, and 3-kernel chunks on one thread, are resized by a channels-last kernel
    with other roundings: the chunked merge runs there."""
    hw, sizes = TILED_SIZES["upsample"]
    cls_logits, mask_logits = random_case(6, 3, 7, hw, seed=9)
    small = dict(sizes, output_size=(50, 61))
    got = merge(cls_logits, mask_logits, 3, 6, small)
    assert merge_paths == {"tiled": 0, "chunked": 1}
    assert_same_panoptic(got, official_panoptic(cls_logits, mask_logits, 3, 6, small))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        got = merge(cls_logits, mask_logits, 3, 6, sizes, chunk_size=3)
        assert merge_paths == {"tiled": 0, "chunked": 2}
        got_tiled = merge(cls_logits, mask_logits, 3, 6, sizes, chunk_size=4)
        assert merge_paths == {"tiled": 1, "chunked": 2}
    finally:
        torch.set_num_threads(threads)
    assert_same_panoptic(got, got_tiled)


@needs_emulation
def test_tiled_merge_leaves_undecided_maps_to_the_chunked_merge(merge_paths, monkeypatch):
    """Where the bounds decide little (smooth overlapping maps), the full maps are cheaper:
    the cost guard hands the merge to the chunked computation, with the same result."""
    hw, sizes = TILED_SIZES["upsample"]
    n_prop, n_thing, n_cls = 30, 4, 10
    n = n_prop + n_cls - n_thing
    mask_logits = smooth_logits(n, hw, seed=3, amplitude=0.5)
    cls_logits = torch.randn(n, n_cls, generator=torch.Generator().manual_seed(4))
    tiled = merge(cls_logits, mask_logits, n_thing, n_prop, sizes, overlap_threshold=0.1)
    assert merge_paths == {"tiled": 1, "chunked": 0}
    monkeypatch.setattr(pp, "_TILE_COST", 4.0)
    guarded = merge(cls_logits, mask_logits, n_thing, n_prop, sizes, overlap_threshold=0.1)
    assert merge_paths == {"tiled": 2, "chunked": 1}
    assert_same_panoptic(tiled, guarded)
    assert len(tiled[1]) > 0


@needs_emulation
def test_tiled_merge_with_no_selected_instances(merge_paths):
    hw, sizes = TILED_SIZES["same"]
    cls_logits, mask_logits = random_case(6, 3, 7, hw, seed=10)
    selected = select_instances(
        cls_logits, num_thing_classes=3, num_proposals=6, topk=10, score_thresh=1.0
    )
    collected = SelectedMasks(selected[2], 0.5, sizes["output_size"])
    got = merge(cls_logits, mask_logits, 3, 6, sizes, on_chunk=collected)
    assert merge_paths == {"tiled": 1, "chunked": 0}
    assert collected.masks.shape == (0, *sizes["output_size"])
    assert_same_panoptic(got, official_panoptic(cls_logits, mask_logits, 3, 6, sizes))


@needs_emulation
@pytest.mark.parametrize("instance_threshold", [0.3, 0.5, 0.7])
def test_tiled_merge_with_another_instance_mask_threshold(instance_threshold, merge_paths):
    """Own areas (prob >= 0.5) and instance masks (prob > their threshold) decided apart."""
    hw, sizes = TILED_SIZES["upsample"]
    cls_logits, mask_logits = random_case(10, 4, 8, hw, seed=11)
    mask_logits = mask_logits.clamp(-2.0, 2.0)  # probabilities between 0.12 and 0.88
    # a high-scoring thing between 0.55 and 0.82: its area is decided on every tile, its mask
    # at 0.7 is not
    mask_logits[0] = torch.empty(hw).uniform_(0.2, 1.5, generator=torch.Generator().manual_seed(1))
    cls_logits[0, 0] = 8.0
    selected = select_instances(
        cls_logits, num_thing_classes=4, num_proposals=10, topk=30, score_thresh=0.0
    )
    tiled_masks = SelectedMasks(selected[2], instance_threshold, sizes["output_size"])
    got = merge(cls_logits, mask_logits, 4, 10, sizes, on_chunk=tiled_masks)
    chunked_masks = SelectedMasks(selected[2], instance_threshold, sizes["output_size"])
    ref = merge(cls_logits, mask_logits, 4, 10, sizes, on_chunk=chunked_masks.__call__)
    assert merge_paths == {"tiled": 1, "chunked": 1}
    assert_same_panoptic(got, ref)
    assert_same_panoptic(got, official_panoptic(cls_logits, mask_logits, 4, 10, sizes))
    assert torch.equal(tiled_masks.masks, chunked_masks.masks)
    assert len(got[1]) > 0
    assert_same_reductions(cls_logits, mask_logits, 4, 10, sizes, instance_threshold)


@needs_emulation
def test_tile_bounds_cover_resized_values_above_their_sources():
    """A constant map can come out of the resize one ulp above its value (a weight pair of
    1 - w1 and w1 summing above 1): the bounds' slack keeps such pixels undecided."""
    hw = (25, 42)
    sizes = {"padded_size": (100, 168), "image_size": (97, 163), "output_size": (147, 291)}
    cls_logits, mask_logits = random_case(6, 3, 5, hw, seed=13)
    mask_logits[0] = 3.0
    cls_logits[0, 0] = 8.0  # kernel 0 wins wherever the others are low
    value = float(torch.sigmoid(torch.tensor(3.0)))
    above = float(torch.nextafter(torch.tensor(value), torch.tensor(1.0)))
    ref, masks = assert_same_reductions(
        cls_logits, mask_logits, 3, 6, sizes, threshold=value, area_threshold=above
    )
    # the case occurs: kernel 0 has pixels above its value, but not everywhere
    assert 0 < int(masks[0].sum()) < masks[0].numel()
    assert 0 < int(ref[2][0]) < masks[0].numel() and int(ref[1][0]) > 0


def test_chunked_sigmoid_is_the_chunked_merges():
    """Per chunk, as the chunked merge calls it (the vectorised and scalar sigmoid paths may
    round differently, and which elements take which depends on the call)."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(23, 13, 17, generator=gen) * 8
    for chunk_size in (1, 3, 5, 16, 100):
        ref = torch.cat([logits[s : s + chunk_size].sigmoid() for s in range(0, 23, chunk_size)])
        assert torch.equal(pp._chunked_sigmoid(logits, chunk_size), ref)
        strided = logits.transpose(1, 2)
        ref = torch.cat([strided[s : s + chunk_size].sigmoid() for s in range(0, 23, chunk_size)])
        assert torch.equal(pp._chunked_sigmoid(strided, chunk_size), ref)
