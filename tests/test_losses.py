"""K-Net losses: the loss functions against the MMDet 2.17 formulas and ``KNetCriterion``'s
targets (matching on the previous stage, label weights, stuff pairing, seg and rank targets)."""

import math

import pytest
import torch

from knet.modeling.criterion import KNetCriterion
from knet.modeling.criterion.losses import dice_loss, mask_bce_loss, rank_loss, weighted_focal_loss
from knet.modeling.criterion.matcher import HungarianMatcher

ALPHA, GAMMA = 0.25, 2.0
# A small panoptic problem: 3 thing kernels, 2 thing + 2 stuff classes, 5 kernels in total.
P, T, K, H, W = 3, 2, 4, 8, 8
N = P + (K - T)


# ----------------------------------------------------------------------------- references
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ref_dice(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-3) -> float:
    losses = []
    for m in range(logits.shape[0]):
        p = [sigmoid(v) for v in logits[m].flatten().tolist()]
        t = targets[m].flatten().tolist()
        inter = sum(a * b for a, b in zip(p, t))
        den = (sum(a * a for a in p) + eps) + (sum(b * b for b in t) + eps)
        losses.append(1 - 2 * inter / den)
    return sum(losses) / len(losses)


def ref_bce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = sigmoid(x)
        total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    return total / logits.numel()


def ref_focal(logits: torch.Tensor, labels, weights: torch.Tensor, avg_factor: float) -> float:
    """Sum of per-element sigmoid focal losses (label == num_classes: background), weighted."""
    total = 0.0
    m, k = logits.shape
    for i in range(m):
        for c in range(k):
            p = sigmoid(float(logits[i, c]))
            if int(labels[i]) == c:
                e = -ALPHA * (1 - p) ** GAMMA * math.log(p)
            else:
                e = -(1 - ALPHA) * p**GAMMA * math.log(1 - p)
            total += float(weights[i, c]) * e
    return total / avg_factor


def ref_rank(mask_logits: torch.Tensor, rank_target: torch.Tensor, ignore: int = 255) -> float:
    b, n, h, w = mask_logits.shape
    total = 0.0
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                t = int(rank_target[bi, y, x])
                if t == ignore:
                    continue
                col = mask_logits[bi, :, y, x].double()
                total += float(torch.logsumexp(col, 0) - col[t])
    return total / (b * h * w)


def ref_label_weights(num_kernels: int, p: int, t: int, k: int) -> torch.Tensor:
    weights = torch.zeros(num_kernels, k)
    for i in range(num_kernels):
        for c in range(k):
            if i < p:
                weights[i, c] = 1.0 if c < t else 0.0
            else:
                weights[i, c] = 1.0 if c == t + (i - p) else 0.0
    return weights


def ref_rank_target(kernel_masks, shape) -> torch.Tensor:
    """kernel_masks: {kernel index: soft target mask}; later kernel indices overwrite."""
    target = torch.full(shape, 255, dtype=torch.int64)
    for n in sorted(kernel_masks):
        target[kernel_masks[n] > 0] = n
    return target


# ----------------------------------------------------------------------------- inputs
def box_mask(y0, y1, x0, x1, value=1.0, h=H, w=W) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = value
    return m


def logits_like(mask: torch.Tensor, strength: float = 6.0) -> torch.Tensor:
    return torch.where(mask > 0.5, strength, -strength)


def make_criterion(num_classes=K, num_thing=T, num_proposals=P, num_stages=2, rank_weight=0.1):
    return KNetCriterion(
        matcher=HungarianMatcher(cost_class=2.0, cost_mask=1.0, cost_dice=4.0),
        num_classes=num_classes,
        num_thing_classes=num_thing,
        num_proposals=num_proposals,
        weight_dict={"cls": 2.0, "mask": 1.0, "dice": 4.0, "rank": rank_weight, "seg": 1.0},
        stage_loss_weights=[1.0] * num_stages,
    )


def make_target(labels, masks, stuff_labels=(), stuff_masks=()):
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros(0, H, W),
        "stuff_labels": torch.tensor(stuff_labels, dtype=torch.int64),
        "stuff_masks": torch.stack(stuff_masks) if stuff_masks else torch.zeros(0, H, W),
    }


def random_outputs(b=1, n=N, p=P, k=K, num_stages=2, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 2).requires_grad_(requires_grad)

    return {
        "init": {"mask_logits": rnd(b, p, H, W), "seg_logits": rnd(b, k, H, W)},
        "stages": [
            {"cls_logits": rnd(b, n, k), "mask_logits": rnd(b, n, H, W)} for _ in range(num_stages)
        ],
    }


def two_things_scene():
    """GT A (class 0, top-left), GT B (class 1, bottom-right, soft border), stuff class 3."""
    gt_a = box_mask(0, 4, 0, 4)
    gt_b = box_mask(4, 8, 4, 8)
    gt_b[4, 4:] = 0.5  # soft values, as produced by bilinear downsampling
    stuff = box_mask(0, 4, 4, 8)
    return gt_a, gt_b, stuff


# ----------------------------------------------------------------------------- loss functions
def test_dice_loss_formula():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [3.0, 3.0, -3.0, -0.2]]).view(2, 2, 2)
    targets = torch.tensor([[1.0, 0.0, 0.7, 0.2], [0.0, 1.0, 0.0, 0.5]]).view(2, 2, 2)
    got = dice_loss(logits, targets)
    assert float(got) == pytest.approx(ref_dice(logits, targets), rel=1e-6)
    # not the naive 2|X∩Y| / (|X| + |Y|) form
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    naive = (1 - 2 * (p * t).sum(1) / (p.sum(1) + t.sum(1))).mean()
    assert abs(float(got) - float(naive)) > 1e-3


def test_dice_loss_perfect_and_empty():
    target = box_mask(0, 4, 0, 8)
    perfect = dice_loss(logits_like(target, 30.0)[None], target[None])
    assert float(perfect) == pytest.approx(1 - 64 / (32 + 1e-3 + 32 + 1e-3), abs=1e-6)
    empty = dice_loss(torch.zeros(0, 4, 4, requires_grad=True), torch.zeros(0, 4, 4))
    assert float(empty) == 0.0 and empty.requires_grad


def test_mask_bce_loss_formula():
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]], [[3.0, -0.5], [-3.0, 1.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.7, 0.2]], [[0.0, 1.0], [0.0, 0.5]]])
    assert float(mask_bce_loss(logits, targets)) == pytest.approx(ref_bce(logits, targets), 1e-6)
    empty = mask_bce_loss(torch.zeros(0, 4, 4, requires_grad=True), torch.zeros(0, 4, 4))
    assert float(empty) == 0.0 and empty.requires_grad


def test_weighted_focal_loss_formula():
    logits = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 0.0], [0.2, 0.2, -4.0], [2.0, 1.0, -1.0]])
    labels = torch.tensor([0, 1, 3, 2])  # 3 = background
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
    got = weighted_focal_loss(logits, labels, weights, avg_factor=2.5)
    assert float(got) == pytest.approx(ref_focal(logits, labels, weights, 2.5), rel=1e-6)
    # a background row is pushed to zero for every class
    bg = weighted_focal_loss(torch.tensor([[5.0, 5.0]]), torch.tensor([2]), torch.ones(1, 2), 1.0)
    assert float(bg) == pytest.approx(2 * 0.75 * sigmoid(5) ** 2 * -math.log(1 - sigmoid(5)))


def test_rank_loss_formula_counts_ignored_pixels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=gen)
    target = torch.randint(0, 4, (2, 3, 5), generator=gen)
    target[0, 0] = 255
    target[1, :, 2:] = 255
    got = rank_loss(logits, target)
    assert float(got) == pytest.approx(ref_rank(logits, target), rel=1e-5)
    # mean over all pixels, not over the non-ignored ones
    valid = int((target != 255).sum())
    mean_over_valid = ref_rank(logits, target) * target.numel() / valid
    assert float(got) != pytest.approx(mean_over_valid, rel=1e-3)
    all_ignored = rank_loss(logits, torch.full_like(target, 255))
    assert float(all_ignored) == 0.0


# ----------------------------------------------------------------------------- criterion
def test_loss_keys_panoptic_and_instance():
    gt_a, gt_b, stuff = two_things_scene()
    targets = [make_target([0, 1], [gt_a, gt_b], [3], [stuff])]
    losses = make_criterion(num_stages=3)(random_outputs(num_stages=3), targets)
    expected = {"loss_rpn_mask", "loss_rpn_dice", "loss_rpn_seg", "loss_rpn_rank"}
    for s in range(3):
        expected |= {f"s{s}_loss_{name}" for name in ("cls", "mask", "dice", "rank")}
    assert set(losses) == expected

    inst = make_criterion(num_classes=T, rank_weight=0.0)
    targets = [make_target([0, 1], [gt_a, gt_b])]
    losses = inst(random_outputs(n=P, k=T), targets)
    expected = {"loss_rpn_mask", "loss_rpn_dice", "loss_rpn_seg"}
    for s in range(2):
        expected |= {f"s{s}_loss_{name}" for name in ("cls", "mask", "dice")}
    assert set(losses) == expected
    assert all(bool(torch.isfinite(v)) for v in losses.values())


def test_label_weights_pattern():
    crit = make_criterion()
    torch.testing.assert_close(crit.label_weights(N, "cpu"), ref_label_weights(N, P, T, K))
    inst = make_criterion(num_classes=T)
    torch.testing.assert_close(inst.label_weights(P, "cpu"), torch.ones(P, T))


def swapped_stage_outputs():
    """Init masks: kernel 0 ~ A, kernel 1 ~ B; stage 0 masks: kernel 0 ~ B, kernel 1 ~ A.
    Stage 0 class logits are uninformative so stage 1 is matched by stage 0's masks."""
    gt_a, gt_b, stuff = two_things_scene()
    nothing = torch.zeros(H, W)
    init = torch.stack([logits_like(gt_a), logits_like(gt_b), logits_like(nothing)])[None]
    swapped = torch.stack([logits_like(gt_b), logits_like(gt_a), logits_like(nothing)])
    stuff_masks = torch.stack([logits_like(nothing), logits_like(stuff)])
    s0_masks = torch.cat([swapped, stuff_masks])[None]
    s1_masks = torch.cat([swapped.flip(0), stuff_masks])[None]
    gen = torch.Generator().manual_seed(3)
    # stage 0 classes agree with the init assignment (kernel 0: class 0, kernel 1: class 1),
    # weakly enough that stage 1's matching is still decided by stage 0's masks
    s0_cls = torch.randn(1, N, K, generator=gen) * 0.1
    s0_cls[0, 0, :T] += torch.tensor([1.0, -1.0])
    s0_cls[0, 1, :T] += torch.tensor([-1.0, 1.0])
    outputs = {
        "init": {"mask_logits": init, "seg_logits": torch.randn(1, K, H, W, generator=gen)},
        "stages": [
            {"cls_logits": s0_cls, "mask_logits": s0_masks},
            {"cls_logits": torch.randn(1, N, K, generator=gen), "mask_logits": s1_masks},
        ],
    }
    targets = [make_target([0, 1], [gt_a, gt_b], [3], [stuff])]
    return outputs, targets


def test_stage_is_matched_on_previous_stage_predictions():
    outputs, targets = swapped_stage_outputs()
    crit = make_criterion()
    init, s0 = outputs["init"], outputs["stages"][0]
    # preconditions: the two stages' predictions really give different assignments
    assert crit.match(init["mask_logits"], None, targets)[0].tolist() == [0, 1, -1]
    assert crit.match(s0["mask_logits"], s0["cls_logits"], targets)[0].tolist() == [1, 0, -1]
    losses = crit(outputs, targets)
    weights = ref_label_weights(N, P, T, K)
    stuff_label = [K, K, K, K, 3]  # stuff kernel 4 <-> class 3 (present); kernel 3 absent
    # stage 0 is matched on the initial masks: kernel 0 -> A (class 0), kernel 1 -> B (class 1)
    by_init = torch.tensor([0, 1, K] + stuff_label[P:])
    # matching on stage 0's own masks would give kernel 0 -> B, kernel 1 -> A
    by_current = torch.tensor([1, 0, K] + stuff_label[P:])
    num_pos = 3  # two things and one present stuff class
    s0_cls = outputs["stages"][0]["cls_logits"][0]
    expected = 2.0 * ref_focal(s0_cls, by_init, weights, num_pos)
    wrong = 2.0 * ref_focal(s0_cls, by_current, weights, num_pos)
    assert abs(expected - wrong) > 1e-3  # the check below can tell the two apart
    assert float(losses["s0_loss_cls"]) == pytest.approx(expected, rel=1e-5)

    # stage 1 is matched on stage 0's (swapped) masks: kernel 0 -> B, kernel 1 -> A
    s1_cls = outputs["stages"][1]["cls_logits"][0]
    expected = 2.0 * ref_focal(s1_cls, by_current, weights, num_pos)
    wrong = 2.0 * ref_focal(s1_cls, by_init, weights, num_pos)
    assert abs(expected - wrong) > 1e-3
    assert float(losses["s1_loss_cls"]) == pytest.approx(expected, rel=1e-5)

    # the mask loss of stage 0 pairs stage 0's masks with the init-based assignment
    gt_a, gt_b, stuff = two_things_scene()
    s0 = outputs["stages"][0]["mask_logits"][0]
    pred = torch.stack([s0[0], s0[1], s0[4]])
    tgt = torch.stack([gt_a, gt_b, stuff])
    assert float(losses["s0_loss_mask"]) == pytest.approx(ref_bce(pred, tgt), rel=1e-5)
    assert float(losses["s0_loss_dice"]) == pytest.approx(4.0 * ref_dice(pred, tgt), rel=1e-5)


def test_stage_matching_uses_only_thing_kernels_and_thing_columns():
    outputs, targets = swapped_stage_outputs()
    crit = make_criterion()
    gt_a, gt_b, _ = two_things_scene()
    base = crit(outputs, targets)["s1_loss_cls"]
    # Make stage 0's stuff kernels perfect matches for the thing GTs (masks and classes): if
    # they took part in stage 1's matching they would win.
    s0 = outputs["stages"][0]
    s0["mask_logits"][0, 3] = logits_like(gt_a) * 2
    s0["mask_logits"][0, 4] = logits_like(gt_b) * 2
    s0["cls_logits"][0, 3, :T] = torch.tensor([20.0, -20.0])
    s0["cls_logits"][0, 4, :T] = torch.tensor([-20.0, 20.0])
    s0["cls_logits"][0, :, T:] = 50.0
    assert float(crit(outputs, targets)["s1_loss_cls"]) == pytest.approx(float(base), rel=1e-6)


def test_stuff_kernels_fixed_pairing():
    gt_a, gt_b, stuff = two_things_scene()
    crit = make_criterion()
    # GT order of the stuff classes must not matter: kernel P + i <-> class T + i
    stuff2 = box_mask(6, 8, 0, 4)
    targets = [make_target([0], [gt_a], [3, 2], [stuff, stuff2])]
    assignments = [torch.tensor([0, -1, -1])]
    labels, positive, pos_masks = crit.kernel_targets(assignments, targets, N)
    assert labels[0].tolist() == [0, K, K, 2, 3]
    assert positive[0].tolist() == [True, False, False, True, True]
    assert len(pos_masks) == 3
    torch.testing.assert_close(pos_masks[0], gt_a)
    torch.testing.assert_close(pos_masks[1], stuff2)  # kernel 3 = class 2
    torch.testing.assert_close(pos_masks[2], stuff)  # kernel 4 = class 3

    # absent stuff: background label, negative
    targets = [make_target([0], [gt_a], [], [])]
    labels, positive, pos_masks = crit.kernel_targets(assignments, targets, N)
    assert labels[0].tolist() == [0, K, K, K, K]
    assert positive[0].tolist() == [True, False, False, False, False]


def test_stuff_positive_mask_and_cls_losses():
    """Only stuff present: the stuff kernel is positive with its mask; cls avg_factor = 1."""
    _, _, stuff = two_things_scene()
    outputs = random_outputs(seed=4)
    targets = [make_target([], [], [2], [stuff])]
    losses = make_criterion()(outputs, targets)
    s0 = outputs["stages"][0]
    pred = s0["mask_logits"][0, 3:4]
    assert float(losses["s0_loss_mask"]) == pytest.approx(ref_bce(pred, stuff[None]), rel=1e-5)
    assert float(losses["s0_loss_dice"]) == pytest.approx(
        4.0 * ref_dice(pred, stuff[None]), rel=1e-5
    )
    labels = torch.tensor([K, K, K, 2, K])
    expected = 2.0 * ref_focal(s0["cls_logits"][0], labels, ref_label_weights(N, P, T, K), 1.0)
    assert float(losses["s0_loss_cls"]) == pytest.approx(expected, rel=1e-5)
    # no thing GT: the initial head has no positive masks
    assert float(losses["loss_rpn_mask"]) == 0.0 and float(losses["loss_rpn_dice"]) == 0.0


def test_cls_avg_factor_is_number_of_positives():
    gt_a, gt_b, stuff = two_things_scene()
    outputs, targets = swapped_stage_outputs()
    # two images: 3 + 1 positives -> avg_factor 4
    outputs = {
        "init": {k: torch.cat([v, v]) for k, v in outputs["init"].items()},
        "stages": [{k: torch.cat([v, v * 0.5]) for k, v in s.items()} for s in outputs["stages"]],
    }
    targets = targets + [make_target([0], [gt_a], [], [])]
    losses = make_criterion()(outputs, targets)
    cls = outputs["stages"][0]["cls_logits"]
    weights = ref_label_weights(N, P, T, K)
    # image 1 masks are the same as image 0's, so kernel 0 (~A) matches A there as well
    labels0 = torch.tensor([0, 1, K, K, 3])
    labels1 = torch.tensor([0, K, K, K, K])
    expected = 2.0 * (
        ref_focal(cls[0], labels0, weights, 4.0) + ref_focal(cls[1], labels1, weights, 4.0)
    )
    assert float(losses["s0_loss_cls"]) == pytest.approx(expected, rel=1e-5)
    # positives of both images are paired with their own targets
    s0 = outputs["stages"][0]["mask_logits"]
    pred = torch.stack([s0[0, 0], s0[0, 1], s0[0, 4], s0[1, 0]])
    tgt = torch.stack([gt_a, gt_b, stuff, gt_a])
    assert float(losses["s0_loss_mask"]) == pytest.approx(ref_bce(pred, tgt), rel=1e-5)
    assert float(losses["s0_loss_dice"]) == pytest.approx(4.0 * ref_dice(pred, tgt), rel=1e-5)

    # no positives at all: avg_factor clamps to 1
    outputs = random_outputs(seed=5)
    losses = make_criterion()(outputs, [make_target([], [])])
    cls = outputs["stages"][1]["cls_logits"][0]
    expected = 2.0 * ref_focal(cls, torch.full((N,), K), weights, 1.0)
    assert float(losses["s1_loss_cls"]) == pytest.approx(expected, rel=1e-5)


def test_stage_loss_weights_scale_each_stage():
    outputs, targets = swapped_stage_outputs()
    plain = make_criterion()(outputs, targets)
    crit = make_criterion()
    crit.stage_loss_weights = [1.0, 0.5]
    weighted = crit(outputs, targets)
    assert set(plain) == set(weighted)
    for key, value in plain.items():
        factor = 0.5 if key.startswith("s1_") else 1.0
        assert float(weighted[key]) == pytest.approx(factor * float(value), rel=1e-6), key


def test_instance_criterion_uses_full_label_weights():
    gt_a, gt_b, _ = two_things_scene()
    outputs = random_outputs(n=P, k=T, seed=6)
    outputs["init"]["mask_logits"] = torch.stack(
        [logits_like(gt_b), logits_like(torch.zeros(H, W)), logits_like(gt_a)]
    )[None]
    losses = make_criterion(num_classes=T, rank_weight=0.0)(
        outputs, [make_target([0, 1], [gt_a, gt_b])]
    )
    labels = torch.tensor([1, T, 0])
    cls = outputs["stages"][0]["cls_logits"][0]
    expected = 2.0 * ref_focal(cls, labels, torch.ones(P, T), 2.0)
    assert float(losses["s0_loss_cls"]) == pytest.approx(expected, rel=1e-5)


def test_seg_loss_targets():
    """Background = K; stuff first; matched things overwrite; unmatched things stay as they
    were; normalised by the number of foreground pixels."""
    gt_a = box_mask(0, 4, 0, 4)
    gt_b = box_mask(2, 6, 2, 6, value=0.25)  # soft: still > 0, so it counts as foreground
    gt_c = box_mask(0, 2, 0, 8)
    gt_d = box_mask(3, 4, 6, 8)  # not matched (4 GTs, 3 proposals): stays background
    stuff = box_mask(4, 8, 0, 8)
    init = torch.stack([logits_like(gt_a), logits_like(box_mask(2, 6, 2, 6)), logits_like(gt_c)])
    gen = torch.Generator().manual_seed(7)
    seg_logits = torch.randn(1, K, H, W, generator=gen)
    outputs = random_outputs(seed=7)
    outputs["init"] = {"mask_logits": init[None], "seg_logits": seg_logits}
    targets = [make_target([1, 0, 1, 0], [gt_a, gt_b, gt_c, gt_d], [3], [stuff])]
    crit = make_criterion()
    assert crit.match(init[None], None, targets)[0].tolist() == [0, 1, 2]

    seg_target = torch.full((H, W), K, dtype=torch.int64)
    seg_target[stuff > 0] = 3
    for label, mask in ((1, gt_a), (0, gt_b), (1, gt_c)):  # kernel order
        seg_target[mask > 0] = label
    assert int((seg_target == 3).sum()) > 0 and bool((seg_target[gt_d > 0] == K).all())
    num_fg = int((seg_target < K).sum())
    logits = seg_logits[0].permute(1, 2, 0).reshape(-1, K)
    expected = ref_focal(logits, seg_target.flatten(), torch.ones(H * W, K), num_fg)
    losses = crit(outputs, targets)
    assert float(losses["loss_rpn_seg"]) == pytest.approx(expected, rel=1e-5)


def test_rank_targets_later_kernel_overwrites():
    gt_a = box_mask(0, 5, 0, 5)
    gt_b = box_mask(3, 8, 3, 8, value=0.3)
    stuff = box_mask(0, 8, 4, 8)
    outputs = random_outputs(seed=8)
    # init: kernel 2 ~ A, kernel 0 ~ B
    outputs["init"]["mask_logits"] = torch.stack(
        [logits_like(box_mask(3, 8, 3, 8)), logits_like(torch.zeros(H, W)), logits_like(gt_a)]
    )[None]
    targets = [make_target([0, 1], [gt_a, gt_b], [3], [stuff])]
    crit = make_criterion()
    assert crit.match(outputs["init"]["mask_logits"], None, targets)[0].tolist() == [1, -1, 0]
    losses = crit(outputs, targets)

    init_target = ref_rank_target({2: gt_a, 0: gt_b}, (H, W))
    assert int(init_target[4, 4]) == 2  # overlap of A and B: the later kernel (A) wins
    expected = 0.1 * ref_rank(outputs["init"]["mask_logits"], init_target[None])
    assert float(losses["loss_rpn_rank"]) == pytest.approx(expected, rel=1e-5)

    # stage 0 uses the same assignment, plus the stuff kernel 4 (class 3) over all kernels
    s0_target = ref_rank_target({2: gt_a, 0: gt_b, 4: stuff}, (H, W))
    assert int(s0_target[0, 4]) == 4 and int(s0_target[4, 0]) == 2
    expected = 0.1 * ref_rank(outputs["stages"][0]["mask_logits"], s0_target[None])
    assert float(losses["s0_loss_rank"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("case", ["no_gt", "only_stuff", "more_gt_than_kernels"])
def test_degenerate_targets_give_finite_losses_that_backprop(case):
    outputs = random_outputs(b=2, seed=9, requires_grad=True)
    _, _, stuff = two_things_scene()
    if case == "no_gt":
        targets = [make_target([], []), make_target([], [])]
    elif case == "only_stuff":
        targets = [make_target([], [], [2, 3], [stuff, 1 - stuff]), make_target([], [])]
    else:
        masks = [box_mask(i, i + 2, i, i + 3) for i in range(6)]
        targets = [make_target([i % T for i in range(6)], masks), make_target([], [])]
    losses = make_criterion()(outputs, targets)
    assert all(bool(torch.isfinite(v)) for v in losses.values()), losses
    sum(losses.values()).backward()
    leaves = [outputs["init"]["mask_logits"], outputs["init"]["seg_logits"]]
    for stage in outputs["stages"]:
        leaves += [stage["cls_logits"], stage["mask_logits"]]
    for leaf in leaves:
        assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all())
    # the class and seg losses always have negatives, so they produce real gradients
    assert float(outputs["stages"][-1]["cls_logits"].grad.abs().sum()) > 0
    assert float(outputs["init"]["seg_logits"].grad.abs().sum()) > 0
