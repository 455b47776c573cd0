"""Hungarian matcher of K-Net: cost terms against per-pair loops, assignment against brute force."""

import itertools
import math

import pytest
import torch

from knet.modeling.criterion.matcher import HungarianMatcher, dice_cost, focal_cost, mask_cost

ALPHA, GAMMA, EPS_FOCAL, EPS_DICE = 0.25, 2.0, 1e-12, 1e-3


# ----------------------------------------------------------------------------- references
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ref_focal_cost(cls_logits: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
    n, g = cls_logits.shape[0], gt_labels.shape[0]
    out = torch.zeros(n, g, dtype=torch.float64)
    for i in range(n):
        for j in range(g):
            p = sigmoid(float(cls_logits[i, int(gt_labels[j])]))
            pos = ALPHA * (1 - p) ** GAMMA * -math.log(p + EPS_FOCAL)
            neg = (1 - ALPHA) * p**GAMMA * -math.log(1 - p + EPS_FOCAL)
            out[i, j] = pos - neg
    return out


def ref_dice_cost(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    n, g = probs.shape[0], targets.shape[0]
    out = torch.zeros(n, g, dtype=torch.float64)
    for i in range(n):
        for j in range(g):
            p, t = probs[i].double().flatten(), targets[j].double().flatten()
            num = 2 * float((p * t).sum())
            den = (float((p * p).sum()) + EPS_DICE) + (float((t * t).sum()) + EPS_DICE)
            out[i, j] = -num / den
    return out


def ref_mask_cost(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    n, g = probs.shape[0], targets.shape[0]
    out = torch.zeros(n, g, dtype=torch.float64)
    for i in range(n):
        for j in range(g):
            p, t = probs[i].double().flatten(), targets[j].double().flatten()
            agree = float((p * t).sum()) + float(((1 - p) * (1 - t)).sum())
            out[i, j] = -agree / p.numel()
    return out


def ref_total_cost(mask_logits, gt_masks, cls_logits=None, gt_labels=None, weights=(2, 1, 4)):
    w_cls, w_mask, w_dice = weights
    probs = mask_logits.double().sigmoid()
    cost = w_dice * ref_dice_cost(probs, gt_masks) + w_mask * ref_mask_cost(probs, gt_masks)
    if cls_logits is not None:
        cost = cost + w_cls * ref_focal_cost(cls_logits, gt_labels)
    return cost


def brute_force_assignment(cost: torch.Tensor):
    """Minimum-cost one-to-one assignment of min(N, G) pairs, by enumeration."""
    n, g = cost.shape
    best, best_pairs = float("inf"), None
    if n >= g:
        for preds in itertools.permutations(range(n), g):
            pairs = sorted(zip(preds, range(g)))
            total = sum(float(cost[i, j]) for i, j in pairs)
            if total < best:
                best, best_pairs = total, pairs
    else:
        for gts in itertools.permutations(range(g), n):
            pairs = list(zip(range(n), gts))
            total = sum(float(cost[i, j]) for i, j in pairs)
            if total < best:
                best, best_pairs = total, pairs
    return best, best_pairs


# ----------------------------------------------------------------------------- inputs
def random_problem(n: int, g: int, num_classes: int = 5, hw=(6, 7), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mask_logits = torch.randn(n, *hw, generator=gen) * 3
    # soft targets, like bilinearly downsampled binary masks
    gt_masks = (torch.rand(g, *hw, generator=gen) > 0.6).float()
    gt_masks[:, ::2] *= torch.rand(g, 1, hw[1], generator=gen)
    cls_logits = torch.randn(n, num_classes, generator=gen) * 2
    gt_labels = torch.randint(0, num_classes, (g,), generator=gen)
    return mask_logits, gt_masks, cls_logits, gt_labels


# ----------------------------------------------------------------------------- cost terms
def test_focal_cost_matches_per_pair_loop():
    _, _, cls_logits, gt_labels = random_problem(5, 4, num_classes=6, seed=1)
    cls_logits[0, :] = 12.0  # confident positive: p close to 1 exercises the eps terms
    cls_logits[1, :] = -12.0
    got = focal_cost(cls_logits.double(), gt_labels)
    torch.testing.assert_close(got, ref_focal_cost(cls_logits, gt_labels), rtol=1e-9, atol=1e-12)


def test_focal_cost_prefers_the_predicted_class():
    cls_logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    cost = focal_cost(cls_logits, torch.tensor([0, 1]))
    assert cost[0, 0] < cost[0, 1] and cost[1, 1] < cost[1, 0]


def test_dice_cost_matches_squared_denominator_form():
    mask_logits, gt_masks, _, _ = random_problem(4, 3, seed=2)
    probs = mask_logits.flatten(1).double().sigmoid()
    targets = gt_masks.flatten(1).double()
    got = dice_cost(probs, targets)
    torch.testing.assert_close(got, ref_dice_cost(probs, targets), rtol=1e-9, atol=1e-12)
    # the naive 2|X∩Y| / (|X| + |Y|) form gives different values on soft inputs
    naive = -2 * probs @ targets.t() / (probs.sum(1)[:, None] + targets.sum(1)[None])
    assert not torch.allclose(got, naive, atol=1e-3)


def test_dice_cost_eps_on_empty_masks():
    probs = torch.zeros(1, 10, dtype=torch.float64)
    targets = torch.zeros(1, 10, dtype=torch.float64)
    assert float(dice_cost(probs, targets)) == 0.0
    # a perfect match of one pixel: 2 / (1 + 1e-3 + 1 + 1e-3)
    probs[0, 0] = targets[0, 0] = 1.0
    assert float(dice_cost(probs, targets)) == pytest.approx(-2 / 2.002, rel=1e-12)


def test_mask_cost_matches_per_pair_loop():
    mask_logits, gt_masks, _, _ = random_problem(4, 5, seed=3)
    probs = mask_logits.flatten(1).double().sigmoid()
    targets = gt_masks.flatten(1).double()
    got = mask_cost(probs, targets)
    torch.testing.assert_close(got, ref_mask_cost(probs, targets), rtol=1e-9, atol=1e-12)
    assert bool((got <= 0).all()) and bool((got >= -1).all())


def test_cost_matrix_is_weighted_sum_of_terms():
    mask_logits, gt_masks, cls_logits, gt_labels = random_problem(5, 3, seed=4)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=1.0, cost_dice=4.0)
    got = matcher.cost_matrix(mask_logits, gt_masks, cls_logits, gt_labels)
    ref = ref_total_cost(mask_logits, gt_masks, cls_logits, gt_labels)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)

    other = HungarianMatcher(cost_class=0.5, cost_mask=3.0, cost_dice=1.5)
    got = other.cost_matrix(mask_logits, gt_masks, cls_logits, gt_labels)
    ref = ref_total_cost(mask_logits, gt_masks, cls_logits, gt_labels, weights=(0.5, 3.0, 1.5))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_class_cost_skipped_without_cls_logits():
    mask_logits, gt_masks, cls_logits, gt_labels = random_problem(5, 3, seed=5)
    matcher = HungarianMatcher()
    got = matcher.cost_matrix(mask_logits, gt_masks, None, gt_labels)
    torch.testing.assert_close(
        got.double(), ref_total_cost(mask_logits, gt_masks), atol=1e-5, rtol=1e-5
    )
    with_cls = matcher.cost_matrix(mask_logits, gt_masks, cls_logits, gt_labels)
    assert not torch.allclose(got, with_cls)


def test_cost_is_computed_in_fp32():
    mask_logits, gt_masks, cls_logits, gt_labels = random_problem(5, 3, seed=6)
    matcher = HungarianMatcher()
    half = matcher.cost_matrix(
        mask_logits.bfloat16(), gt_masks.bfloat16(), cls_logits.bfloat16(), gt_labels
    )
    assert half.dtype == torch.float32
    ref = matcher.cost_matrix(
        mask_logits.bfloat16().float(),
        gt_masks.bfloat16().float(),
        cls_logits.bfloat16().float(),
        gt_labels,
    )
    torch.testing.assert_close(half, ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- assignment
@pytest.mark.parametrize(
    "n, g, seed",
    [(4, 4, 0), (6, 3, 1), (7, 5, 2), (5, 1, 3), (3, 5, 4), (2, 6, 5), (1, 3, 6), (6, 6, 7)],
)
@pytest.mark.parametrize("with_cls", [True, False])
def test_assignment_equals_brute_force(n, g, seed, with_cls):
    mask_logits, gt_masks, cls_logits, gt_labels = random_problem(n, g, seed=seed)
    if not with_cls:
        cls_logits = None
    rows, cols = HungarianMatcher()(mask_logits, gt_masks, cls_logits, gt_labels)
    assert rows.dtype == cols.dtype == torch.int64
    assert len(rows) == len(cols) == min(n, g)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)

    cost = ref_total_cost(mask_logits, gt_masks, cls_logits, gt_labels)
    best, best_pairs = brute_force_assignment(cost)
    pairs = sorted(zip(rows.tolist(), cols.tolist()))
    total = sum(float(cost[i, j]) for i, j in pairs)
    assert total == pytest.approx(best, abs=1e-5)
    assert pairs == best_pairs
    if n < g:  # surplus GTs stay unmatched
        assert len(set(range(g)) - set(cols.tolist())) == g - n


def test_class_cost_changes_assignment():
    # two identical masks: only the class decides which prediction takes which GT
    gt_masks = torch.zeros(2, 4, 4)
    gt_masks[0, :2] = 1
    gt_masks[1, 2:] = 1
    mask_logits = torch.full((2, 4, 4), -5.0)
    mask_logits[:, :, :] = torch.where(gt_masks.sum(0) > 0, 5.0, -5.0)
    gt_labels = torch.tensor([0, 1])
    cls_logits = torch.tensor([[-6.0, 6.0], [6.0, -6.0]])
    rows, cols = HungarianMatcher()(mask_logits, gt_masks, cls_logits, gt_labels)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}
    rows, cols = HungarianMatcher()(mask_logits, gt_masks, -cls_logits, gt_labels)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 0, 1: 1}


def test_mask_cost_drives_assignment():
    gt_masks = torch.zeros(3, 8, 8)
    gt_masks[0, :4, :4] = 1
    gt_masks[1, 4:, 4:] = 1
    gt_masks[2, :4, 4:] = 1
    perm = [2, 0, 1]  # prediction i looks like GT perm[i]
    mask_logits = torch.stack([gt_masks[j] * 10 - 5 for j in perm])
    rows, cols = HungarianMatcher()(mask_logits, gt_masks)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 2, 1: 0, 2: 1}


def test_empty_ground_truth():
    mask_logits, _, cls_logits, _ = random_problem(5, 1, seed=8)
    rows, cols = HungarianMatcher()(
        mask_logits, torch.zeros(0, 6, 7), cls_logits, torch.zeros(0, dtype=torch.int64)
    )
    assert rows.shape == cols.shape == (0,)
    assert rows.dtype == cols.dtype == torch.int64


def test_matcher_does_not_track_gradients():
    mask_logits, gt_masks, cls_logits, gt_labels = random_problem(4, 3, seed=9)
    mask_logits.requires_grad_(True)
    cost = HungarianMatcher().cost_matrix(mask_logits, gt_masks, cls_logits, gt_labels)
    assert not cost.requires_grad
