"""Decode heads used as semantic K-Net pixel decoders, and the auxiliary FCN head.

The numeric tests recompute each head's MMSeg 0.x ``_forward_feature`` equations in plain
``torch.nn.functional`` from the module's state_dict (``references.mmseg``), so they check the
equations, not the module against itself.
"""

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from references.mmseg import ref_aspp, ref_fcn, ref_psp, ref_uper
from torch import nn

from knet.engine import get_knet_cfg
from knet.modeling.auxiliary_head import AuxiliaryFCNHead, build_auxiliary_head
from knet.modeling.pixel_decoder import (
    KNetASPPHead,
    KNetFCNHead,
    KNetPSPHead,
    KNetUPerHead,
    build_pixel_decoder,
)

UPER_SHAPES = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=12, stride=8),
    "res4": ShapeSpec(channels=16, stride=16),
    "res5": ShapeSpec(channels=20, stride=32),
}
UPER_SIZES = {"res2": (33, 47), "res3": (17, 24), "res4": (9, 12), "res5": (5, 6)}
SINGLE_SHAPE = {"res4": ShapeSpec(channels=12, stride=8), "res5": ShapeSpec(channels=24, stride=8)}
SINGLE_SIZE = (9, 13)


def make_cfg(name: str, in_features: Sequence[str], conv_dim: int = 16, norm: str = "BN"):
    cfg = get_knet_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = name
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = list(in_features)
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = conv_dim
    cfg.MODEL.SEM_SEG_HEAD.NORM = norm
    return cfg


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def random_features(shapes: dict[str, ShapeSpec], sizes: dict, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(batch, v.channels, *sizes[k], generator=g, dtype=torch.float64)
        for k, v in shapes.items()
    }


def run_eval(model: nn.Module, feats: dict[str, torch.Tensor]):
    randomize_norms(model)
    model.double().eval()
    with torch.no_grad():
        out = model.forward_features(feats)
    return out, {k: v.detach() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ numeric equivalence
def test_uper_matches_reference():
    cfg = make_cfg("KNetUPerHead", ["res2", "res3", "res4", "res5"])
    model = build_pixel_decoder(cfg, UPER_SHAPES)
    feats = random_features(UPER_SHAPES, UPER_SIZES)
    out, sd = run_eval(model, feats)
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0].shape == (2, 16, 33, 47) and out[0].dtype == torch.float64
    xs = [feats[k] for k in ("res2", "res3", "res4", "res5")]
    torch.testing.assert_close(out[0], ref_uper(sd, xs, (1, 2, 3, 6)))


@pytest.mark.parametrize("norm", ["BN", ""])
@pytest.mark.parametrize("num_convs,concat_input", [(2, True), (1, False), (3, True)])
def test_fcn_matches_reference(norm: str, num_convs: int, concat_input: bool):
    cfg = make_cfg("KNetFCNHead", ["res5"], norm=norm)
    cfg.MODEL.KNET.DECODE_HEAD.NUM_CONVS = num_convs
    cfg.MODEL.KNET.DECODE_HEAD.CONCAT_INPUT = concat_input
    model = build_pixel_decoder(cfg, SINGLE_SHAPE)
    assert (model.conv_cat is None) != concat_input
    feats = random_features(SINGLE_SHAPE, {k: SINGLE_SIZE for k in SINGLE_SHAPE})
    out, sd = run_eval(model, feats)
    assert len(out) == 1 and out[0].shape == (2, 16, *SINGLE_SIZE)
    torch.testing.assert_close(out[0], ref_fcn(sd, feats["res5"], num_convs, concat_input))


@pytest.mark.parametrize("scales", [(1, 2, 3, 6), (2, 4)])
def test_psp_matches_reference(scales):
    cfg = make_cfg("KNetPSPHead", ["res5"])
    cfg.MODEL.KNET.DECODE_HEAD.POOL_SCALES = list(scales)
    model = build_pixel_decoder(cfg, SINGLE_SHAPE)
    feats = random_features(SINGLE_SHAPE, {k: SINGLE_SIZE for k in SINGLE_SHAPE})
    out, sd = run_eval(model, feats)
    assert len(out) == 1 and out[0].shape == (2, 16, *SINGLE_SIZE)
    torch.testing.assert_close(out[0], ref_psp(sd, feats["res5"], scales))


@pytest.mark.parametrize("dilations", [(1, 2, 3), (1, 12, 24, 36)])
def test_aspp_matches_reference(dilations):
    cfg = make_cfg("KNetASPPHead", ["res5"])
    cfg.MODEL.KNET.DECODE_HEAD.DILATIONS = list(dilations)
    model = build_pixel_decoder(cfg, SINGLE_SHAPE)
    feats = random_features(SINGLE_SHAPE, {k: SINGLE_SIZE for k in SINGLE_SHAPE})
    out, sd = run_eval(model, feats)
    assert len(out) == 1 and out[0].shape == (2, 16, *SINGLE_SIZE)
    torch.testing.assert_close(out[0], ref_aspp(sd, feats["res5"], dilations))


def test_aux_head_matches_reference():
    cfg = make_cfg("KNetUPerHead", ["res2", "res3", "res4", "res5"])
    cfg.MODEL.KNET.AUX_HEAD.LOSS_WEIGHT = 0.4
    cfg.MODEL.KNET.AUX_HEAD.CHANNELS = 8
    cfg.MODEL.KNET.AUX_HEAD.NUM_CONVS = 2
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    head = build_auxiliary_head(cfg, UPER_SHAPES)
    assert isinstance(head, AuxiliaryFCNHead)
    feats = random_features(UPER_SHAPES, UPER_SIZES)
    randomize_norms(head)
    head.double().eval()
    with torch.no_grad():
        # non-zero classifier bias so that it is checked too
        head.conv_seg.bias.copy_(torch.linspace(-1, 1, 7, dtype=torch.float64))
        logits = head(feats)
    assert logits.shape == (2, 7, 9, 12) and logits.dtype == torch.float64
    sd = head.state_dict()
    ref = F.conv2d(ref_fcn(sd, feats["res4"], 2, False), sd["conv_seg.weight"], sd["conv_seg.bias"])
    torch.testing.assert_close(logits, ref)


# ------------------------------------------------------------------ state_dict layout
def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _r50_shapes(names: Sequence[str]) -> dict[str, ShapeSpec]:
    full = {
        "res2": ShapeSpec(channels=256, stride=4),
        "res3": ShapeSpec(channels=512, stride=8),
        "res4": ShapeSpec(channels=1024, stride=16),
        "res5": ShapeSpec(channels=2048, stride=32),
    }
    return {k: full[k] for k in names}


def test_uper_state_dict_keys():
    cfg = make_cfg("KNetUPerHead", ["res2", "res3", "res4", "res5"], conv_dim=256, norm="SyncBN")
    with torch.device("meta"):  # shapes only: skip allocating and initialising the weights
        shapes = _shapes(build_pixel_decoder(cfg, _r50_shapes(["res2", "res3", "res4", "res5"])))
    expected = {
        "psp_modules.0.1.weight": (256, 2048, 1, 1),
        "psp_modules.3.1.norm.running_var": (256,),
        "psp_modules.3.1.norm.num_batches_tracked": (),
        "bottleneck.weight": (256, 3072, 3, 3),
        "bottleneck.norm.weight": (256,),
        "lateral_convs.0.weight": (256, 256, 1, 1),
        "lateral_convs.2.weight": (256, 1024, 1, 1),
        "lateral_convs.2.norm.bias": (256,),
        "fpn_convs.0.weight": (256, 256, 3, 3),
        "fpn_convs.2.norm.running_mean": (256,),
        "fpn_bottleneck.weight": (256, 1024, 3, 3),
    }
    for k, v in expected.items():
        assert shapes[k] == v, k
    assert "psp_modules.4.1.weight" not in shapes and "lateral_convs.3.weight" not in shapes
    assert "fpn_convs.3.weight" not in shapes
    # 6 tensors per conv_module (weight + 5 norm entries); 4 ppm + bottleneck + 3 + 3 + 1
    assert len(shapes) == 6 * 12
    assert not any(k.endswith(".bias") and ".norm." not in k for k in shapes)


def test_aspp_state_dict_keys():
    cfg = make_cfg("KNetASPPHead", ["res5"], conv_dim=512)
    with torch.device("meta"):
        shapes = _shapes(build_pixel_decoder(cfg, _r50_shapes(["res5"])))
    expected = {
        "image_pool.1.weight": (512, 2048, 1, 1),
        "image_pool.1.norm.running_mean": (512,),
        "aspp_modules.0.weight": (512, 2048, 1, 1),
        "aspp_modules.1.weight": (512, 2048, 3, 3),
        "aspp_modules.3.weight": (512, 2048, 3, 3),
        "aspp_modules.3.norm.weight": (512,),
        "bottleneck.weight": (512, 2560, 3, 3),
    }
    for k, v in expected.items():
        assert shapes[k] == v, k
    assert len(shapes) == 6 * 6


def test_fcn_and_psp_state_dict_keys():
    cfg = make_cfg("KNetFCNHead", ["res5"], conv_dim=512)
    with torch.device("meta"):
        fcn = _shapes(build_pixel_decoder(cfg, _r50_shapes(["res5"])))
        cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "KNetPSPHead"
        psp = _shapes(build_pixel_decoder(cfg, _r50_shapes(["res5"])))
    assert fcn["convs.0.weight"] == (512, 2048, 3, 3)
    assert fcn["convs.1.weight"] == (512, 512, 3, 3)
    assert fcn["convs.1.norm.running_var"] == (512,)
    assert fcn["conv_cat.weight"] == (512, 2560, 3, 3)
    assert len(fcn) == 6 * 3
    assert psp["psp_modules.0.1.weight"] == (512, 2048, 1, 1)
    assert psp["psp_modules.3.1.norm.bias"] == (512,)
    assert psp["bottleneck.weight"] == (512, 4096, 3, 3)
    assert len(psp) == 6 * 5


def test_aux_state_dict_keys():
    cfg = make_cfg("KNetFCNHead", ["res5"])
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 150
    cfg.MODEL.KNET.AUX_HEAD.LOSS_WEIGHT = 0.4
    with torch.device("meta"):
        shapes = _shapes(build_auxiliary_head(cfg, _r50_shapes(["res2", "res3", "res4", "res5"])))
    assert shapes == {
        "convs.0.weight": (256, 1024, 3, 3),
        "convs.0.norm.weight": (256,),
        "convs.0.norm.bias": (256,),
        "convs.0.norm.running_mean": (256,),
        "convs.0.norm.running_var": (256,),
        "convs.0.norm.num_batches_tracked": (),
        "conv_seg.weight": (150, 256, 1, 1),
        "conv_seg.bias": (150,),
    }


# ------------------------------------------------------------------ init
def test_init_matches_mmcv_conv_module():
    torch.manual_seed(0)
    shapes = {"res5": ShapeSpec(channels=64, stride=8)}
    cfg = make_cfg("KNetASPPHead", ["res5"], conv_dim=64)
    cfg.MODEL.KNET.DECODE_HEAD.DILATIONS = [1, 2]
    model = build_pixel_decoder(cfg, shapes)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    for conv in convs:
        out_c, _, kh, kw = conv.weight.shape
        expected = math.sqrt(2.0 / (out_c * kh * kw))  # Kaiming normal, fan_out, ReLU
        assert abs(conv.weight.std().item() / expected - 1) < 0.06
        assert abs(conv.weight.mean().item()) < 0.1 * expected
        assert conv.bias is None  # a norm follows
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)

    cfg.MODEL.SEM_SEG_HEAD.NORM = ""
    no_norm = build_pixel_decoder(cfg, shapes)
    assert all(torch.all(m.bias == 0) for m in no_norm.modules() if isinstance(m, nn.Conv2d))

    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 150
    cfg.MODEL.KNET.AUX_HEAD.LOSS_WEIGHT = 0.4
    cfg.MODEL.KNET.AUX_HEAD.IN_FEATURE = "res5"
    cfg.MODEL.KNET.AUX_HEAD.CHANNELS = 64
    aux = build_auxiliary_head(cfg, shapes)
    assert abs(aux.conv_seg.weight.std().item() / 0.01 - 1) < 0.05
    assert torch.all(aux.conv_seg.bias == 0)
    assert abs(aux.convs[0].weight.std().item() / math.sqrt(2.0 / (64 * 9)) - 1) < 0.06
    assert isinstance(aux.dropout, nn.Dropout2d) and aux.dropout.p == pytest.approx(0.1)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", ["KNetUPerHead", "KNetFCNHead", "KNetPSPHead", "KNetASPPHead"])
def test_gradient_reaches_every_parameter(name: str):
    torch.manual_seed(0)
    if name == "KNetUPerHead":
        cfg, shapes, sizes = make_cfg(name, list(UPER_SHAPES)), UPER_SHAPES, UPER_SIZES
    else:
        cfg, shapes = make_cfg(name, ["res5"]), SINGLE_SHAPE
        sizes = {k: SINGLE_SIZE for k in shapes}
        cfg.MODEL.KNET.DECODE_HEAD.DILATIONS = [1, 2, 3]
    model = build_pixel_decoder(cfg, shapes).train()
    # batch 3: BN over a 1x1 pooled map needs > 1 value per channel, and with 2 values its
    # output would barely depend on its input
    feats = {k: v.float() for k, v in random_features(shapes, sizes, batch=3).items()}
    (out,) = model.forward_features(feats)
    (out * torch.randn_like(out)).sum().backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
        assert p.grad.abs().sum() > 0, k


def test_aux_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    cfg = make_cfg("KNetUPerHead", list(UPER_SHAPES))
    cfg.MODEL.KNET.AUX_HEAD.LOSS_WEIGHT = 0.4
    cfg.MODEL.KNET.AUX_HEAD.CHANNELS = 8
    head = build_auxiliary_head(cfg, UPER_SHAPES).train()
    feats = {k: v.float() for k, v in random_features(UPER_SHAPES, UPER_SIZES).items()}
    logits = head(feats)
    assert logits.shape == (2, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 9, 12)
    F.cross_entropy(logits, torch.randint(0, logits.shape[1], (2, 9, 12))).backward()
    for k, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, k


# ------------------------------------------------------------------ building and errors
@pytest.mark.parametrize(
    "name,cls,in_features",
    [
        ("KNetUPerHead", KNetUPerHead, ["res5", "res3", "res2", "res4"]),
        ("KNetFCNHead", KNetFCNHead, ["res5"]),
        ("KNetPSPHead", KNetPSPHead, ["res5"]),
        ("KNetASPPHead", KNetASPPHead, ["res5"]),
    ],
)
def test_registry_lookup(name: str, cls: type, in_features: list[str]):
    model = build_pixel_decoder(make_cfg(name, in_features), UPER_SHAPES)
    assert type(model) is cls
    assert model.out_channels == 16
    if name == "KNetUPerHead":
        # levels are used finest first whatever the config order
        assert model.in_features == ["res2", "res3", "res4", "res5"]
        assert model.output_stride == 4
    else:
        assert model.in_features == ["res5"] and model.output_stride == 32


@pytest.mark.parametrize("name", ["KNetUPerHead", "KNetFCNHead", "KNetPSPHead", "KNetASPPHead"])
def test_missing_input_feature_is_named(name: str):
    cfg = make_cfg(name, ["res2", "res3", "res4", "p6"] if name == "KNetUPerHead" else ["p6"])
    with pytest.raises(ValueError, match=r"\['p6'\].*available: \['res2', 'res3'"):
        build_pixel_decoder(cfg, UPER_SHAPES)


@pytest.mark.parametrize("name", ["KNetFCNHead", "KNetPSPHead", "KNetASPPHead"])
def test_single_input_heads_reject_several_features(name: str):
    with pytest.raises(ValueError, match=f"{name} expects exactly one input feature"):
        build_pixel_decoder(make_cfg(name, ["res4", "res5"]), UPER_SHAPES)


def test_uper_rejects_a_single_feature():
    with pytest.raises(ValueError, match="at least two input features"):
        build_pixel_decoder(make_cfg("KNetUPerHead", ["res5"]), UPER_SHAPES)


def test_build_auxiliary_head():
    cfg = make_cfg("KNetUPerHead", list(UPER_SHAPES))
    cfg.MODEL.KNET.AUX_HEAD.LOSS_WEIGHT = 0.0
    assert build_auxiliary_head(cfg, UPER_SHAPES) is None
    cfg.MODEL.KNET.AUX_HEAD.LOSS_WEIGHT = 0.4
    cfg.MODEL.KNET.AUX_HEAD.CHANNELS = 8
    head = build_auxiliary_head(cfg, UPER_SHAPES)
    assert isinstance(head, AuxiliaryFCNHead) and head.in_features == ["res4"]
    assert head.conv_cat is None and len(head.convs) == 1
    cfg.MODEL.KNET.AUX_HEAD.IN_FEATURE = "res6"
    with pytest.raises(ValueError, match=r"AuxiliaryFCNHead.*\['res6'\].*available"):
        build_auxiliary_head(cfg, UPER_SHAPES)
