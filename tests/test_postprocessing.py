"""Inference post-processing of K-Net against unchunked reference implementations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from knet.modeling.postprocessing import (
    instance_inference,
    mask_probs_at_image_size,
    panoptic_inference,
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
