"""K-Net modules against independent plain-torch computations of the published equations.

The references (``references.knet_heads``) are written from the formulas of the official code
(kernel update, group features, post-norm attention, FFN, branches, localization FPN, sine
encoding), reading parameters by their state-dict names only, so a wiring or naming mistake in a
module shows up as a mismatch.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from references.knet_heads import (
    ref_conv_gn_relu,
    ref_sine_encoding,
    ref_update_head,
    ref_updator,
)
from torch import nn

from knet.modeling.kernel_head import (
    ConvKernelHead,
    KernelUpdateHead,
    KernelUpdator,
    KNetIterativeKernelHead,
)
from knet.modeling.pixel_decoder import KNetLocalizationFPN, PositionEmbeddingSine

Tensor = torch.Tensor
PRIOR_BIAS = -math.log(99.0)  # sigmoid(b) = 0.01


# ----------------------------------------------------------------------------------- helpers
def randomize_(module: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Overwrite every parameter (norm affines included) with N(0, scale^2) values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


def params64(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().double() for k, v in module.state_dict().items()}


def capture(module: nn.Module, store: dict[str, object], name: str):
    """Forward hook storing (inputs, output) of ``module`` under ``name``."""

    def hook(_mod, inputs, output):
        store[name] = (inputs, output)

    return module.register_forward_hook(hook)


def away_from_zero(x: Tensor, margin: float = 0.05) -> Tensor:
    """Keep mask logits away from the sigmoid(x) = 0.5 threshold (no float32 ties)."""
    return x + margin * torch.sign(x)


# ------------------------------------------------------------------------------ KernelUpdator
def test_kernel_updator_matches_formula():
    upd = randomize_(KernelUpdator(12, 10, 14).double(), seed=1)
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(7, 12, generator=gen, dtype=torch.float64) * 3
    k = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    out = upd(f, k)
    assert out.shape == (7, 14)
    torch.testing.assert_close(out, ref_updator(params64(upd), f, k), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- KernelUpdateHead
def _update_head_case(
    channels: int, updator_channels: int, num_classes: int, hard_threshold: float | None
) -> tuple[KernelUpdateHead, Tensor, Tensor, Tensor]:
    head = KernelUpdateHead(
        num_classes=num_classes,
        channels=channels,
        num_heads=4,
        dim_feedforward=48,
        updator_channels=updator_channels,
        hard_mask_threshold=hard_threshold,
    )
    # float32 module (it computes group features in float32) vs. a float64 reference
    randomize_(head, seed=3, scale=0.3).eval()
    gen = torch.Generator().manual_seed(4)
    b, n, h, w = 2, 6, 7, 9
    features = torch.randn(b, channels, h, w, generator=gen)
    kernels = torch.randn(b, n, channels, generator=gen)
    masks = away_from_zero(torch.randn(b, n, h, w, generator=gen) * 2)
    return head, features, kernels, masks


@pytest.mark.parametrize("hard_threshold", [0.5, None], ids=["hard", "softmax"])
def test_update_head_matches_reference(hard_threshold):
    head, features, kernels, masks = _update_head_case(32, 32, 5, hard_threshold)
    seen: dict[str, object] = {}
    hooks = [
        capture(head.kernel_update_conv, seen, "updator"),
        capture(head.attention_norm, seen, "attention_norm"),
        capture(head.ffn_norm, seen, "ffn_norm"),
    ]
    with torch.no_grad():
        new_kernels, new_masks, cls = head(features, kernels, masks)
    for hk in hooks:
        hk.remove()
    p = params64(head)
    ref = ref_update_head(p, features.double(), kernels.double(), masks.double(), 4, hard_threshold)
    close = dict(rtol=1e-4, atol=1e-4)

    # group features: sum of the (hard or softmax) mask-weighted transformed features
    (group_rows, kernel_rows), updated = seen["updator"]
    torch.testing.assert_close(group_rows.double().reshape(2, 6, 32), ref["group"], **close)
    torch.testing.assert_close(kernel_rows.double().reshape(2, 6, 32), kernels.double(), **close)
    # each block from its module input, then the whole chain from the stage inputs
    torch.testing.assert_close(
        updated.double(),
        ref_updator(p, group_rows.double(), kernel_rows.double(), "kernel_update_conv."),
        **close,
    )
    torch.testing.assert_close(updated.double().reshape(2, 6, 32), ref["updated"], **close)
    attended = seen["attention_norm"][1].double()
    torch.testing.assert_close(attended, ref["attended"], **close)
    post_ffn = seen["ffn_norm"][1].double()
    torch.testing.assert_close(post_ffn, ref["kernels"], **close)
    # the next stage gets the post-FFN kernels (not the mask kernels)
    torch.testing.assert_close(new_kernels.double(), ref["kernels"], **close)
    torch.testing.assert_close(cls.double(), ref["cls"], **close)
    torch.testing.assert_close(new_masks.double(), ref["masks"], rtol=1e-4, atol=1e-3)
    assert new_masks.shape == masks.shape and cls.shape == (2, 6, 5)


def test_group_features_are_a_hard_thresholded_sum():
    head, features, kernels, masks = _update_head_case(32, 32, 5, 0.5)
    seen: dict[str, object] = {}
    hook = capture(head.kernel_update_conv, seen, "updator")
    with torch.no_grad():
        head(features, kernels, masks)
        feats = head.feat_transform(features)
    hook.remove()
    group = seen["updator"][0][0].reshape(2, 6, 32)
    binary = masks > 0  # sigmoid(m) > 0.5
    for b, n in [(0, 0), (1, 3), (1, 5)]:
        expected = feats[b][:, binary[b, n]].sum(dim=1)  # plain sum over the selected pixels
        torch.testing.assert_close(group[b, n], expected, rtol=1e-5, atol=1e-4)
    # the mask values themselves do not matter, only which side of the threshold they are on
    with torch.no_grad():
        head(features, kernels, masks * 10)
    torch.testing.assert_close(seen["updator"][0][0].reshape(2, 6, 32), group)


def test_wide_kernels_are_chunked_through_a_shared_updator():
    """Official 512-channel semantic heads: 256-d updator applied to each half of the kernel."""
    head, features, kernels, masks = _update_head_case(64, 32, 0, None)
    assert not any(k.startswith(("cls_fcs", "fc_cls")) for k in head.state_dict())
    seen: dict[str, object] = {}
    hook = capture(head.kernel_update_conv, seen, "updator")
    with torch.no_grad():
        new_kernels, new_masks, cls = head(features, kernels, masks)
    hook.remove()
    assert cls is None
    p = params64(head)
    ref = ref_update_head(p, features.double(), kernels.double(), masks.double(), 4, None)
    updated = seen["updator"][1].double().reshape(2, 6, 64)
    halves = [
        ref_updator(
            p,
            ref["group"][..., s].reshape(-1, 32),
            kernels.double()[..., s].reshape(-1, 32),
            "kernel_update_conv.",
        ).reshape(2, 6, 32)
        for s in (slice(0, 32), slice(32, 64))
    ]
    torch.testing.assert_close(updated, torch.cat(halves, dim=-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_kernels.double(), ref["kernels"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_masks.double(), ref["masks"], rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------ ConvKernelHead
@pytest.mark.parametrize("num_classes", [7, 4], ids=["panoptic", "instance"])
def test_conv_kernel_head_matches_reference(num_classes):
    torch.manual_seed(0)
    head = ConvKernelHead(
        channels=64, num_proposals=10, num_classes=num_classes, num_thing_classes=4
    )
    with torch.no_grad():  # random GN affines and conv_seg bias, keep the official init scale
        for name, prm in head.named_parameters():
            if "norm" in name or name.endswith("bias"):
                prm.normal_(0.0, 0.5)
            elif "convs" in name:
                prm.normal_(0.0, 0.3)
    head = head.double().eval()
    gen = torch.Generator().manual_seed(5)
    loc_in = torch.randn(2, 64, 6, 8, generator=gen, dtype=torch.float64)
    sem_in = torch.randn(2, 64, 6, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = head(loc_in, sem_in)
        kernels, masks = head.with_stuff(out)
    p = {k: v.detach() for k, v in head.state_dict().items()}

    loc = ref_conv_gn_relu(loc_in, p, "loc_convs.0")
    seg = ref_conv_gn_relu(sem_in, p, "seg_convs.0")
    w_init = p["init_kernels.weight"][:, :, 0, 0]
    thing_masks = torch.einsum("pc,bchw->bphw", w_init, loc)  # no bias
    w_seg = p["conv_seg.weight"][:, :, 0, 0]
    seg_logits = torch.einsum("kc,bchw->bkhw", w_seg, seg) + p["conv_seg.bias"][:, None, None]
    feats = seg + loc
    binary = (torch.sigmoid(thing_masks) > 0.5).double()
    assert 0 < binary.mean() < 1
    thing_kernels = w_init[None] + torch.einsum("bphw,bchw->bpc", binary, feats)  # sum, no mean

    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["features"], feats, **close)
    torch.testing.assert_close(out["thing_masks"], thing_masks, **close)
    torch.testing.assert_close(out["seg_logits"], seg_logits, **close)
    torch.testing.assert_close(out["thing_kernels"], thing_kernels, **close)
    # panoptic: stuff kernels = conv_seg rows of the stuff classes (no bias, no obj feature),
    # stuff masks = semantic logits of those classes (bias included)
    stuff = slice(4, num_classes)
    expected_k = torch.cat([thing_kernels, w_seg[stuff][None].expand(2, -1, -1)], dim=1)
    expected_m = torch.cat([thing_masks, seg_logits[:, stuff]], dim=1)
    assert kernels.shape == (2, 10 + num_classes - 4, 64)
    torch.testing.assert_close(kernels, expected_k, **close)
    torch.testing.assert_close(masks, expected_m, **close)


# --------------------------------------------------------------------- KNetIterativeKernelHead
def test_iterative_head_passes_post_ffn_kernels_and_stride8_masks():
    torch.manual_seed(0)
    initial = ConvKernelHead(channels=64, num_proposals=6, num_classes=5, num_thing_classes=3)
    stages = [
        KernelUpdateHead(
            num_classes=5, channels=64, num_heads=4, dim_feedforward=32, updator_channels=64
        )
        for _ in range(3)
    ]
    head = KNetIterativeKernelHead(initial_head=initial, stages=stages, mask_upsample_stride=2)
    seen: dict[str, object] = {}
    hooks = [capture(initial, seen, "init")] + [
        capture(s, seen, f"s{i}") for i, s in enumerate(stages)
    ]
    loc, sem = torch.randn(2, 64, 5, 7), torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        out = head.train()(loc, sem)
    for hk in hooks:
        hk.remove()
    with torch.no_grad():
        last = head.eval()(loc, sem)
    init = seen["init"][1]
    up = lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    (features, kernels, masks), _ = seen["s0"]
    assert features is init["features"]
    w_stuff = initial.conv_seg.weight[3:].flatten(1)[None].expand(2, -1, -1)
    torch.testing.assert_close(kernels, torch.cat([init["thing_kernels"], w_stuff], dim=1))
    torch.testing.assert_close(
        masks, torch.cat([init["thing_masks"], init["seg_logits"][:, 3:]], 1)
    )
    assert masks.shape[-2:] == (5, 7)  # stride 8 between stages
    for i in range(1, 3):
        (f_i, k_i, m_i), _ = seen[f"s{i}"]
        assert f_i is init["features"]  # every stage transforms the original F
        prev_kernels, prev_masks, _ = seen[f"s{i - 1}"][1]
        assert k_i is prev_kernels and m_i is prev_masks  # post-FFN kernels, stride-8 masks
    assert len(out["stages"]) == 3 and len(last["stages"]) == 1
    for i, stage_out in enumerate(out["stages"]):
        _, stage_masks, stage_cls = seen[f"s{i}"][1]
        assert stage_out["mask_logits"].shape == (2, 8, 10, 14)
        torch.testing.assert_close(stage_out["mask_logits"], up(stage_masks))
        torch.testing.assert_close(stage_out["cls_logits"], stage_cls)
    torch.testing.assert_close(last["stages"][0], out["stages"][2])
    torch.testing.assert_close(out["init"]["mask_logits"], up(init["thing_masks"]))
    torch.testing.assert_close(out["init"]["seg_logits"], up(init["seg_logits"]))
    assert "init" not in last


# ------------------------------------------------------------------------- positional encoding
@pytest.mark.parametrize("num_feats", [128, 16])
def test_sine_position_encoding_matches_detr(num_feats):
    pe = PositionEmbeddingSine(num_feats, normalize=True)
    x = torch.zeros(2, 7, 5, 9)
    out = pe(x)
    assert out.shape == (2, 2 * num_feats, 5, 9)
    torch.testing.assert_close(
        out.double(), ref_sine_encoding(2, 5, 9, num_feats), rtol=1e-5, atol=1e-5
    )
    # channel 0 is sin of the normalised row index, channel num_feats sin of the column index
    torch.testing.assert_close(
        out[0, 0, :, 0], torch.sin(torch.arange(1, 6) / 5 * 2 * math.pi), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        out[0, num_feats, 0, :], torch.sin(torch.arange(1, 10) / 9 * 2 * math.pi), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------ localization FPN
def _fpn(channels: int = 32, positional_encoding: bool = True) -> KNetLocalizationFPN:
    shapes = {f"p{i}": ShapeSpec(channels=channels, stride=2**i) for i in range(2, 6)}
    return KNetLocalizationFPN(
        shapes, conv_dim=channels, norm="GN", positional_encoding=positional_encoding
    )


@pytest.mark.parametrize("size", [(64, 96), (32, 160)])
def test_localization_fpn_shapes(size):
    fpn = _fpn().eval()
    h, w = size
    feats = {f"p{i}": torch.randn(1, 32, h // 2**i, w // 2**i) for i in range(2, 6)}
    loc, sem = fpn(feats)
    assert loc.shape == sem.shape == (1, 32, h // 8, w // 8)
    with pytest.raises(ValueError, match="strides"):
        KNetLocalizationFPN(
            {f"p{i}": ShapeSpec(channels=32, stride=2 ** (i + 1)) for i in range(2, 6)},
            conv_dim=32,
            norm="GN",
            positional_encoding=True,
        )


@pytest.mark.parametrize("positional_encoding", [True, False])
def test_localization_fpn_matches_manual_composition(positional_encoding):
    fpn = (
        randomize_(_fpn(positional_encoding=positional_encoding), seed=6, scale=0.2).double().eval()
    )
    gen = torch.Generator().manual_seed(7)
    h, w = 64, 96
    feats = {
        f"p{i}": torch.randn(2, 32, h // 2**i, w // 2**i, generator=gen, dtype=torch.float64)
        for i in range(2, 6)
    }
    with torch.no_grad():
        loc, sem = fpn(feats)
    p = {k: v.detach() for k, v in fpn.state_dict().items()}
    up = lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    cbr = lambda x, name, stride=1: ref_conv_gn_relu(x, p, f"convs_all_levels.{name}", stride)
    p5 = feats["p5"]
    if positional_encoding:
        p5 = p5 + ref_sine_encoding(2, h // 32, w // 32, 16)  # added to P5 only
    fused = cbr(feats["p2"], "0.conv0", stride=2)
    fused = fused + cbr(feats["p3"], "1.conv0")
    fused = fused + cbr(up(cbr(feats["p4"], "2.conv0")), "2.conv1")
    fused = fused + cbr(up(cbr(up(cbr(p5, "3.conv0")), "3.conv1")), "3.conv2")
    torch.testing.assert_close(loc, ref_conv_gn_relu(fused, p, "conv_pred"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sem, ref_conv_gn_relu(fused, p, "aux_conv"), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- initialisation
def _fans(p: Tensor) -> tuple[int, int]:
    receptive = p[0][0].numel() if p.dim() > 2 else 1
    return p.shape[1] * receptive, p.shape[0] * receptive


def test_update_head_initialisation():
    torch.manual_seed(0)
    head = KernelUpdateHead(num_classes=80)  # official sizes: C 256, 8 heads, FFN 2048
    matrices = {k: v for k, v in head.named_parameters() if v.dim() > 1}
    assert "attention.in_proj_weight" in matrices and "feat_transform.weight" in matrices
    assert len(matrices) == 14  # 5 updator, 2 attention, 2 FFN, feat_transform, 2 cls, 2 mask
    for name, prm in matrices.items():
        fan_in, fan_out = _fans(prm)
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # in_proj: one 768x256 matrix
        assert prm.abs().max() <= bound, name
        assert abs(prm.std().item() / (bound / math.sqrt(3.0)) - 1) < 0.05, name
    torch.testing.assert_close(head.fc_cls.bias, torch.full((80,), PRIOR_BIAS))
    assert abs(PRIOR_BIAS + 4.595) < 1e-3
    for name in ("feat_transform.bias", "attention.in_proj_bias", "attention.out_proj.bias"):
        assert torch.all(head.get_parameter(name) == 0), name
    layer_norms = [m for m in head.modules() if isinstance(m, nn.LayerNorm)]
    assert len(layer_norms) == 9  # 4 + fc_norm in the updator, attention, FFN, cls, mask
    for ln in layer_norms:
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    # other Linear biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for name, mod in head.named_modules():
        if (
            isinstance(mod, nn.Linear)
            and mod.bias is not None
            and name not in ("fc_cls", "attention.out_proj")
        ):
            assert mod.bias.abs().max() <= 1 / math.sqrt(mod.in_features), name
            assert mod.bias.std() > 0.2 / math.sqrt(mod.in_features), name


def test_conv_kernel_head_initialisation():
    torch.manual_seed(0)
    head = ConvKernelHead(channels=256, num_proposals=100, num_classes=133, num_thing_classes=80)
    init = head.init_kernels.weight
    assert init.shape == (100, 256, 1, 1) and head.init_kernels.bias is None
    assert abs(init.std().item() - 1.0) < 0.03 and abs(init.mean().item()) < 0.03
    torch.testing.assert_close(head.conv_seg.bias, torch.full((133,), PRIOR_BIAS))
    for name in ("conv_seg.weight", "loc_convs.0.weight", "seg_convs.0.weight"):
        assert abs(head.get_parameter(name).std().item() / 0.01 - 1) < 0.1, name
    for name in ("loc_convs.0", "seg_convs.0"):
        conv = head.get_submodule(name)
        assert (
            conv.bias is None and isinstance(conv.norm, nn.GroupNorm) and conv.norm.num_groups == 32
        )
        assert torch.all(conv.norm.weight == 1) and torch.all(conv.norm.bias == 0)


def test_localization_fpn_initialisation():
    torch.manual_seed(0)
    fpn = _fpn(channels=256)
    convs = [m for m in fpn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9  # 7 branch convs + conv_pred + aux_conv
    for conv in convs:
        assert conv.bias is None and abs(conv.weight.std().item() / 0.01 - 1) < 0.05
        assert isinstance(conv.norm, nn.GroupNorm) and conv.norm.num_groups == 32
