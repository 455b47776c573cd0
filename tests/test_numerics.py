"""Divergence is reported as divergence: a non-finite output, matching cost or loss term raises
``FloatingPointError`` naming the iteration and the first non-finite tensor, in both criteria and
through the model; finite inputs give fp32 losses whatever the outputs' precision."""

import re
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from knet.engine import get_knet_cfg
from knet.modeling.criterion import KNetCriterion, KNetSemanticCriterion
from knet.modeling.criterion.matcher import HungarianMatcher
from knet.modeling.criterion.numerics import at_least_fp32, check_finite, finite_flag, named_tensors

ROOT = Path(__file__).resolve().parents[1]
# 3 thing kernels, 2 thing + 2 stuff classes (5 kernels), 8x8 masks, 2 update stages
P, T, K, H, W = 3, 2, 4, 8, 8
N = P + (K - T)
BAD_VALUES = [float("nan"), float("inf"), float("-inf")]
PANOPTIC_OUTPUTS = [
    "init.mask_logits",
    "init.seg_logits",
    "stages[0].cls_logits",
    "stages[0].mask_logits",
    "stages[1].cls_logits",
    "stages[1].mask_logits",
]
SEMANTIC_OUTPUTS = ["init.seg_logits", "stages[0].seg_logits", "stages[2].seg_logits"]


# ----------------------------------------------------------------------------- inputs
def panoptic_criterion(class_weight=2.0):
    return KNetCriterion(
        matcher=HungarianMatcher(),
        num_classes=K,
        num_thing_classes=T,
        num_proposals=P,
        weight_dict={"cls": class_weight},
        stage_loss_weights=[1.0, 1.0],
    )


def panoptic_outputs(seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 2

    return {
        "init": {"mask_logits": rnd(1, P, H, W), "seg_logits": rnd(1, K, H, W)},
        "stages": [{"cls_logits": rnd(1, N, K), "mask_logits": rnd(1, N, H, W)} for _ in "ab"],
    }


def panoptic_targets():
    masks = torch.zeros(2, H, W)
    masks[0, :4, :4] = 1
    masks[1, 4:, 4:] = 1
    stuff = torch.zeros(1, H, W)
    stuff[0, :4, 4:] = 1
    return [
        {
            "labels": torch.tensor([0, 1]),
            "masks": masks,
            "stuff_labels": torch.tensor([3]),
            "stuff_masks": stuff,
        }
    ]


def semantic_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(2, 4, 4, 4, generator=gen) for _ in range(5)]
    outputs = {
        "init": {"seg_logits": logits[0]},
        "stages": [{"seg_logits": x} for x in logits[1:4]],
    }
    labels = torch.randint(0, 4, (2, 8, 8), generator=gen)
    return outputs, labels, logits[4]


def tensor_at(outputs, name):
    """The tensor of ``outputs`` at a ``named_tensors`` path."""
    return dict(named_tensors(outputs))[name]


def poison(tensor, value, index=5):
    with torch.no_grad():
        tensor.view(-1)[index] = value


def run_at_iteration(fn, iteration=41):
    with EventStorage(start_iter=iteration):
        return fn()


def expect(kind, name, iteration=41):
    """Regex of the error message part naming ``kind`` ``name`` at ``iteration``."""
    return re.escape(f"at iteration {iteration}: {kind} '{name}' contains NaN or inf")


# ----------------------------------------------------------------------------- helpers
def test_named_tensors_paths_in_order():
    assert [n for n, _ in named_tensors(panoptic_outputs())] == PANOPTIC_OUTPUTS
    assert named_tensors({"a": None, "b": [torch.ones(1)]}) == [("b[0]", torch.ones(1))]


def test_check_finite_reports_the_first_non_finite_in_order():
    a, b, c = torch.ones(3), torch.ones(2, 2), torch.ones(4)
    check_finite(("output", [("a", a), ("b", b)]), ("loss term", [("c", c), ("none", None)]))
    b[1, 1], c[0] = float("inf"), float("nan")
    with pytest.raises(FloatingPointError, match=r"output 'b' contains NaN or inf"):
        check_finite(("output", [("a", a), ("b", b)]), ("loss term", [("c", c)]))
    with pytest.raises(FloatingPointError, match=r"loss term 'c'"):
        check_finite(("output", [("a", a)]), ("loss term", [("c", c)]))
    check_finite(("output", [("empty", torch.empty(0))]))  # nothing to check


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_flag_finds_one_bad_value_anywhere(dtype):
    t = torch.randn(1_000_003).to(dtype)  # long enough for the vectorised reduction paths
    assert bool(finite_flag(t))
    for index in (0, 777_777, 1_000_002):
        for value in BAD_VALUES:
            bad = t.clone()
            bad[index] = value
            assert not bool(finite_flag(bad)), (index, value)
    extremes = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min], dtype=dtype)
    assert bool(finite_flag(extremes))
    assert bool(finite_flag(torch.arange(5)))  # integers are finite


def test_message_names_the_iteration_or_its_absence():
    nan = [("x", torch.tensor([float("nan")]))]
    with pytest.raises(FloatingPointError, match=r"\(no event storage active\): output 'x'"):
        check_finite(("output", nan))
    with pytest.raises(FloatingPointError, match=expect("output", "x", 7)):
        run_at_iteration(lambda: check_finite(("output", nan)), iteration=7)


def test_at_least_fp32_promotes_half_types_only():
    tree = {
        "h": torch.ones(2, dtype=torch.float16),
        "b": [torch.ones(2, dtype=torch.bfloat16)],
        "d": torch.ones(2, dtype=torch.float64),
        "i": torch.ones(2, dtype=torch.int64),
        "none": None,
    }
    out = at_least_fp32(tree)
    assert out["h"].dtype == out["b"][0].dtype == torch.float32
    assert out["d"].dtype == torch.float64 and out["i"].dtype == torch.int64
    assert out["none"] is None


# ----------------------------------------------------------------------------- set criterion
@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", PANOPTIC_OUTPUTS)
def test_non_finite_output_of_each_stage_is_named(name, value):
    outputs = panoptic_outputs()
    poison(tensor_at(outputs, name), value)
    with pytest.raises(FloatingPointError, match=expect("output", name)):
        run_at_iteration(lambda: panoptic_criterion()(outputs, panoptic_targets()))


def test_the_earliest_non_finite_output_is_reported():
    outputs = panoptic_outputs()
    poison(tensor_at(outputs, "stages[1].mask_logits"), float("nan"))
    poison(tensor_at(outputs, "stages[0].cls_logits"), float("inf"))
    with pytest.raises(FloatingPointError, match=expect("output", "stages[0].cls_logits")):
        run_at_iteration(lambda: panoptic_criterion()(outputs, panoptic_targets()))


def test_non_finite_loss_term_is_named():
    # finite outputs, an infinite loss weight: the loss check names the term
    with pytest.raises(FloatingPointError, match=expect("loss term", "s0_loss_cls")):
        run_at_iteration(
            lambda: panoptic_criterion(float("inf"))(panoptic_outputs(), panoptic_targets())
        )


def test_non_finite_matching_cost_is_divergence_not_scipy_error():
    logits = torch.randn(P, H, W)
    logits[0, 0, 0] = float("nan")
    gt = panoptic_targets()[0]
    # scipy alone raises "ValueError: matrix contains invalid numeric entries" here
    with pytest.raises(FloatingPointError, match=expect("matching cost", "stage 1, image 0")):
        run_at_iteration(lambda: HungarianMatcher()(logits, gt["masks"], name="stage 1, image 0"))
    # finite predictions, a non-finite target: the criterion's matching names the predictions
    targets = panoptic_targets()
    targets[0]["masks"][1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=expect("matching cost", "init, image 0")):
        run_at_iteration(lambda: panoptic_criterion()(panoptic_outputs(), targets))


def test_finite_losses_are_fp32_whatever_the_output_precision():
    outputs = panoptic_outputs()
    reference = panoptic_criterion()(outputs, panoptic_targets())
    half = {
        "init": {k: v.bfloat16() for k, v in outputs["init"].items()},
        "stages": [{k: v.bfloat16() for k, v in s.items()} for s in outputs["stages"]],
    }
    # the bf16-rounded values promoted to fp32 give exactly the losses of autocast bf16 outputs
    expected = panoptic_criterion()(at_least_fp32(half), panoptic_targets())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = panoptic_criterion()(half, panoptic_targets())
    assert got.keys() == reference.keys()
    for key in got:
        assert got[key].dtype == torch.float32, key
        assert torch.equal(got[key], expected[key]), key
        assert float(got[key]) == pytest.approx(float(reference[key]), rel=0.05, abs=1e-3), key


# ----------------------------------------------------------------------------- semantic criterion
@pytest.mark.parametrize("name", SEMANTIC_OUTPUTS + ["aux_logits"])
def test_semantic_non_finite_output_is_named(name):
    outputs, labels, aux = semantic_inputs()
    poison(aux if name == "aux_logits" else tensor_at(outputs, name), float("nan"))
    criterion = KNetSemanticCriterion(stage_loss_weights=[1.0] * 3)
    with pytest.raises(FloatingPointError, match=expect("output", name)):
        run_at_iteration(lambda: criterion(outputs, labels, aux))


def test_semantic_non_finite_loss_term_is_named_and_finite_losses_are_fp32():
    outputs, labels, aux = semantic_inputs()
    criterion = KNetSemanticCriterion(init_weight=float("inf"), stage_loss_weights=[1.0] * 3)
    with pytest.raises(FloatingPointError, match=expect("loss term", "loss_init_ce")):
        run_at_iteration(lambda: criterion(outputs, labels, aux))
    criterion = KNetSemanticCriterion(stage_loss_weights=[1.0] * 3)
    half = {
        "init": {"seg_logits": outputs["init"]["seg_logits"].bfloat16()},
        "stages": [{"seg_logits": s["seg_logits"].bfloat16()} for s in outputs["stages"]],
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = criterion(half, labels, aux.bfloat16())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------- through the model
def _panoptic_sample(h=64, w=80):
    masks = torch.zeros(1, h, w, dtype=torch.bool)
    masks[0, 10:40, 20:60] = True
    instances = Instances((h, w))
    instances.gt_classes = torch.tensor([1])
    instances.gt_masks = masks
    sem_seg = torch.full((h, w), 4, dtype=torch.int64)
    sem_seg[masks[0]] = 1
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    return {"image": image, "instances": instances, "sem_seg": sem_seg}


@pytest.mark.parametrize("name", ["stages[1].cls_logits", "stages[2].mask_logits"])
def test_model_training_reports_the_diverged_stage(name):
    torch.manual_seed(0)
    cfg = get_knet_cfg(str(ROOT / "configs/toy/knet_R18_toy_panoptic.yaml"))
    cfg.MODEL.KNET.NUM_PROPOSALS = 4
    model = build_model(cfg).train()

    def diverge(module, inputs, out):
        poison(tensor_at(out, name), float("nan"), index=0)
        return out

    model.kernel_head.register_forward_hook(diverge)
    with pytest.raises(FloatingPointError, match=expect("output", name, 1234)):
        run_at_iteration(lambda: model([_panoptic_sample()]), iteration=1234)
