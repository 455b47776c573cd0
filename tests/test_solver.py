"""K-Net optimizer: backbone-body lr multiplier, weight decay, global gradient-norm clipping."""

import copy
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from knet.engine import get_knet_cfg
from knet.engine.solver import build_optimizer

TOY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs/toy/knet_R18_toy_panoptic.yaml")
SMALL = ["MODEL.KNET.NUM_PROPOSALS", "4", "SOLVER.BACKBONE_MULTIPLIER", "0.25"]
NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


# ----------------------------------------------------------------------------- helpers
def build(opts=()):
    cfg = get_knet_cfg(TOY_CONFIG, SMALL + list(opts))
    torch.manual_seed(0)
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def toy():
    return build()


def group_of(optimizer):
    """id(param) -> list of the param groups that hold it."""
    groups = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            groups.setdefault(id(p), []).append(group)
    return groups


def norm_param_ids(model):
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, NORM_TYPES)
        for p in m.parameters(recurse=False)
    }


def reference_optimizer(optimizer, model_src, model_dst, kind):
    """An unclipped optimizer of ``kind`` on ``model_dst`` with the same groups (by name)."""
    name_of = {id(p): n for n, p in model_src.named_parameters()}
    dst = dict(model_dst.named_parameters())
    groups = [
        {
            "params": [dst[name_of[id(p)]] for p in g["params"]],
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for g in optimizer.param_groups
    ]
    if kind == "ADAMW":
        return torch.optim.AdamW(groups, lr=1.0)
    return torch.optim.SGD(groups, lr=1.0, momentum=0.9)


def synthetic_backward(model, scale, seed):
    """loss = scale * sum_p (<c_p, p> + |p|^2) over trainable p, with fixed random c_p."""
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = 0.0
    for _, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        if p.requires_grad:
            coef = torch.randn(p.shape, generator=gen)
            loss = loss + scale * ((coef * p).sum() + (p * p).sum())
    loss.backward()


def global_grad_norm(model):
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


def assert_same_params(a, b, atol=1e-7, rtol=1e-5):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=rtol, msg=name)


def max_param_difference(a, b):
    return max(float((pa - pb).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------- param groups
def test_optimizer_type_and_hyperparameters(toy):
    cfg, model = toy
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8


def test_every_parameter_in_exactly_one_group(toy):
    cfg, model = toy
    groups = group_of(build_optimizer(cfg, model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(groups) == len(trainable)
    assert all(len(groups[id(p)]) == 1 for p in trainable)


def test_frozen_parameters_are_not_optimized():
    cfg, model = build(["MODEL.BACKBONE.FREEZE_AT", "2"])
    groups = group_of(build_optimizer(cfg, model))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(id(p) not in groups for p in frozen)
    assert all(len(groups[id(p)]) == 1 for p in model.parameters() if p.requires_grad)


def test_backbone_body_lr_multiplier(toy):
    cfg, model = toy
    base_lr = cfg.SOLVER.BASE_LR
    groups = group_of(build_optimizer(cfg, model))
    seen = {"body": 0, "fpn": 0, "heads": 0}
    for name, p in model.named_parameters():
        lr = groups[id(p)][0]["lr"]
        if name.startswith("backbone.bottom_up."):
            seen["body"] += 1
            assert lr == pytest.approx(base_lr * 0.25), name
        else:
            seen["fpn" if name.startswith("backbone.fpn_") else "heads"] += 1
            assert lr == pytest.approx(base_lr), name
    assert all(v > 0 for v in seen.values())


@pytest.mark.parametrize("optimizer_name", ["ADAMW", "SGD"])
@pytest.mark.parametrize("clip", [True, False])
def test_backbone_multiplier_for_every_optimizer_setting(optimizer_name, clip):
    cfg, model = build(
        ["SOLVER.OPTIMIZER", optimizer_name, "SOLVER.CLIP_GRADIENTS.ENABLED", str(clip)]
    )
    groups = group_of(build_optimizer(cfg, model))
    for name, p in model.named_parameters():
        multiplier = 0.25 if name.startswith("backbone.bottom_up.") else 1.0
        assert groups[id(p)][0]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * multiplier), name


def test_weight_decay_on_every_parameter(toy):
    cfg, model = toy
    assert cfg.SOLVER.WEIGHT_DECAY == 0.05
    for group in build_optimizer(cfg, model).param_groups:
        assert group["weight_decay"] == pytest.approx(0.05)


def test_weight_decay_follows_norm_and_bias_settings():
    """Detectron2 semantics: norm weights take WEIGHT_DECAY_NORM, every bias (norm biases
    included) WEIGHT_DECAY_BIAS, everything else WEIGHT_DECAY."""
    cfg, model = build(["SOLVER.WEIGHT_DECAY_NORM", "0.0", "SOLVER.WEIGHT_DECAY_BIAS", "0.01"])
    groups = group_of(build_optimizer(cfg, model))
    norms = norm_param_ids(model)
    assert norms
    for name, p in model.named_parameters():
        wd = groups[id(p)][0]["weight_decay"]
        if name.endswith(".bias"):
            assert wd == pytest.approx(0.01), name
        elif id(p) in norms:
            assert wd == 0.0, name
        else:
            assert wd == pytest.approx(0.05), name


def test_unsupported_settings_raise():
    cfg, model = build(["SOLVER.OPTIMIZER", "LAMB"])
    with pytest.raises(ValueError, match="OPTIMIZER"):
        build_optimizer(cfg, model)
    cfg, model = build(["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "bogus"])
    with pytest.raises(ValueError, match="bogus"):
        build_optimizer(cfg, model)


def test_value_clipping_uses_detectron2_per_parameter_clip():
    cfg, model = build(
        ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5"]
    )
    opt = build_optimizer(cfg, model)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    before = [p.detach().clone() for p in params]
    opt.step()
    # clipped to 0.5 before the step: the gradients themselves are clipped in place
    assert all(float(p.grad.abs().max()) <= 0.5 for p in params)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


# ----------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("kind, scales", [("ADAMW", [1e4, 1e-4]), ("SGD", [1e4])])
def test_full_model_clipping_equals_manual_global_clip(toy, kind, scales):
    """optimizer.step() of the built optimizer == clip_grad_norm_(all params, CLIP_VALUE) and
    an unclipped optimizer's step; an unclipped step is visibly different."""
    cfg, model = build(["SOLVER.OPTIMIZER", kind])
    # keep it cheap: train the stem, res2, the FPN and the heads (frozen params are skipped)
    for name, p in model.named_parameters():
        if name.startswith(("backbone.bottom_up.res3", "backbone.bottom_up.res4",
                            "backbone.bottom_up.res5")):  # fmt: skip
            p.requires_grad_(False)
    clip_value = cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE
    manual, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    opt = build_optimizer(cfg, model)
    opt_manual = reference_optimizer(opt, model, manual, kind)
    opt_unclipped = reference_optimizer(opt, model, unclipped, kind)
    norms = []
    for step, scale in enumerate(scales):
        for m in (model, manual, unclipped):
            synthetic_backward(m, scale, seed=step)
        norms.append(global_grad_norm(model))
        torch.nn.utils.clip_grad_norm_(manual.parameters(), clip_value)
        opt.step()
        opt_manual.step()
        opt_unclipped.step()
        # gradients of the built optimizer's model were clipped in place
        assert global_grad_norm(model) == pytest.approx(min(norms[-1], clip_value), rel=2e-3)
    assert norms[0] > 1e3 * clip_value
    if len(norms) > 1:
        assert norms[1] < clip_value  # not clipped
    assert_same_params(model, manual)
    assert max_param_difference(model, unclipped) > 1e-4


def test_clipping_disabled_leaves_gradients_alone():
    cfg, model = build(["SOLVER.CLIP_GRADIENTS.ENABLED", "False"])
    opt = build_optimizer(cfg, model)
    synthetic_backward(model, 1e4, seed=0)
    before = global_grad_norm(model)
    opt.step()
    assert global_grad_norm(model) == pytest.approx(before, rel=1e-6)
