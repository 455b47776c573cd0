"""The semantic K-Net ResNet backbone: deep stem, dilated stages, strides and key names."""

from collections.abc import Sequence

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from references.resnet import resnet_v1c_stem

from knet.engine import get_knet_cfg
from knet.modeling.backbone.resnet import build_knet_resnet_backbone, stage_dilations

ALL_FEATURES = ["res2", "res3", "res4", "res5"]
ODD_INPUT = (1, 3, 97, 131)


def make_backbone(
    depth: int = 50,
    stem: str = "deeplab",
    res4_dilation: int = 1,
    res5_dilation: int = 1,
    freeze_at: int = 0,
    norm: str = "BN",
    extra: Sequence[str] = (),
) -> ResNet:
    opts = [
        "MODEL.BACKBONE.NAME", "build_knet_resnet_backbone",
        "MODEL.BACKBONE.FREEZE_AT", str(freeze_at),
        "MODEL.RESNETS.DEPTH", str(depth),
        "MODEL.RESNETS.NORM", norm,
        "MODEL.RESNETS.STEM_TYPE", stem,
        "MODEL.RESNETS.STRIDE_IN_1X1", "False",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64" if depth < 50 else "256",
        "MODEL.RESNETS.RES4_DILATION", str(res4_dilation),
        "MODEL.RESNETS.RES5_DILATION", str(res5_dilation),
        "MODEL.RESNETS.OUT_FEATURES", str(ALL_FEATURES),
        "MODEL.DEVICE", "cpu",
        *extra,
    ]  # fmt: skip
    torch.manual_seed(0)
    return build_backbone(get_knet_cfg(opts=opts)).eval()


def _run(backbone: ResNet, shape=ODD_INPUT) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return backbone(torch.randn(*shape))


def _expected_size(size: int, strides: list[int]) -> int:
    """Spatial size after convs/pools with padding k // 2 and the given strides."""
    for s in strides:
        size = (size - 1) // s + 1
    return size


def _blocks(backbone: ResNet, stage: str) -> list:
    return list(getattr(backbone, stage).children())


@pytest.mark.parametrize(
    "dilations,strides",
    [((2, 4), {"res2": 4, "res3": 8, "res4": 8, "res5": 8}),
     ((1, 1), {"res2": 4, "res3": 8, "res4": 16, "res5": 32})],
    ids=["R50-D8", "R50"],
)  # fmt: skip
def test_r50_deep_stem_output_shapes_and_strides(dilations, strides):
    backbone = make_backbone(50, "deeplab", *dilations)
    shapes = backbone.output_shape()
    channels = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        k: (channels[k], strides[k]) for k in ALL_FEATURES
    }
    outputs = _run(backbone)
    for name, out in outputs.items():
        # stem: s2 conv, s2 pool; then one stride-2 conv per downsampling stage
        num_downsample = {4: 0, 8: 1, 16: 2, 32: 3}[strides[name]]
        hw = [_expected_size(n, [2, 2] + [2] * num_downsample) for n in ODD_INPUT[2:]]
        assert tuple(out.shape) == (1, channels[name], *hw), name


def test_r18_plain_shapes_and_blocks():
    backbone = make_backbone(18, "basic")
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (64, 4), "res3": (128, 8), "res4": (256, 16), "res5": (512, 32)
    }  # fmt: skip
    outputs = _run(backbone, (1, 3, 64, 96))
    assert tuple(outputs["res5"].shape) == (1, 512, 2, 3)
    assert all(isinstance(b, BasicBlock) for s in ALL_FEATURES for b in _blocks(backbone, s))
    assert [len(_blocks(backbone, s)) for s in ALL_FEATURES] == [2, 2, 2, 2]
    assert backbone.res2[0].shortcut is None and backbone.res3[0].shortcut is not None


def test_r18_rejects_dilation():
    with pytest.raises(ValueError, match="BasicBlock.*RES4_DILATION"):
        make_backbone(18, "basic", res5_dilation=2)


def test_unknown_stem_type_is_rejected():
    with pytest.raises(ValueError, match="STEM_TYPE"):
        make_backbone(50, "resnext")


def test_stage_dilations():
    assert stage_dilations(6, 2, True) == [1, 2, 2, 2, 2, 2]
    assert stage_dilations(3, 4, True) == [2, 4, 4]
    assert stage_dilations(3, 4, False) == [4, 4, 4]
    assert stage_dilations(3, 1, True) == [1, 1, 1]


@pytest.mark.parametrize("contract", [True, False])
def test_d8_per_block_dilations_and_strides(contract):
    extra = ["MODEL.RESNETS.CONTRACT_DILATION", str(contract)]
    backbone = make_backbone(50, "deeplab", 2, 4, extra=extra)
    dil = {s: [b.conv2.dilation[0] for b in _blocks(backbone, s)] for s in ALL_FEATURES}
    pad = {s: [b.conv2.padding[0] for b in _blocks(backbone, s)] for s in ALL_FEATURES}
    stride = {
        s: [(b.conv1.stride[0], b.conv2.stride[0]) for b in _blocks(backbone, s)]
        for s in ALL_FEATURES
    }
    assert dil == {
        "res2": [1, 1, 1],
        "res3": [1, 1, 1, 1],
        "res4": [1 if contract else 2] + [2] * 5,
        "res5": [2 if contract else 4] + [4] * 2,
    }
    assert pad == dil  # 3x3 convs keep the size
    # STRIDE_IN_1X1=False: the stride sits on the 3x3 conv; only res3 downsamples
    assert stride["res3"] == [(1, 2)] + [(1, 1)] * 3
    assert all(s == (1, 1) for name in ("res2", "res4", "res5") for s in stride[name])
    for name in ALL_FEATURES:  # projection shortcut in the first block of every stage
        blocks = _blocks(backbone, name)
        assert all(isinstance(b, BottleneckBlock) for b in blocks)
        assert blocks[0].shortcut is not None and blocks[0].shortcut.norm is not None
        assert all(b.shortcut is None for b in blocks[1:])
    assert backbone.res3[0].shortcut.stride == (2, 2)
    assert backbone.res4[0].shortcut.stride == (1, 1)


def test_plain_r50_strides():
    backbone = make_backbone(50, "deeplab")
    for name in ("res3", "res4", "res5"):
        first, *rest = _blocks(backbone, name)
        assert (first.conv2.stride, first.shortcut.stride) == ((2, 2), (2, 2))
        assert all(b.conv2.stride == (1, 1) for b in rest)
        assert all(b.conv2.dilation == (1, 1) for b in [first, *rest])


def test_deep_stem_matches_functional_reference():
    backbone = make_backbone(50, "deeplab")
    stem = backbone.stem
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for conv in (stem.conv1, stem.conv2, stem.conv3):
            conv.norm.weight.uniform_(0.5, 1.5)
            conv.norm.bias.normal_(0.0, 0.1)
            conv.norm.running_mean.normal_(0.0, 0.1)
            conv.norm.running_var.uniform_(0.5, 1.5)
    assert [tuple(c.weight.shape) for c in (stem.conv1, stem.conv2, stem.conv3)] == [
        (32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3)
    ]  # fmt: skip
    assert all(c.bias is None and c.norm.eps == 1e-5 for c in (stem.conv1, stem.conv2, stem.conv3))
    x = torch.randn(*ODD_INPUT)
    ref = resnet_v1c_stem(backbone.state_dict(), x)
    with torch.no_grad():
        out = stem(x)
    assert stem.stride == 4 and tuple(out.shape) == (1, 64, 25, 33)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_nothing_frozen_at_freeze_at_0():
    backbone = make_backbone(50, "deeplab", 2, 4, freeze_at=0)
    assert all(p.requires_grad for p in backbone.parameters())
    frozen = make_backbone(50, "deeplab", freeze_at=2)
    trainable = {n.split(".")[0] for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"res3", "res4", "res5"}


def test_state_dict_key_names():
    keys = list(make_backbone(50, "deeplab").state_dict())
    assert keys[:4] == [
        "stem.conv1.weight",
        "stem.conv1.norm.weight",
        "stem.conv1.norm.bias",
        "stem.conv1.norm.running_mean",
    ]
    prefixes = [k.rsplit(".", 1)[0] for k in keys]
    order = ["stem.conv1", "stem.conv2", "stem.conv3", "res2.0.conv1", "res2.0.conv1.norm"]
    positions = [prefixes.index(p) for p in order]
    assert positions == sorted(positions)
    assert "res2.0.shortcut.weight" in keys and "res2.0.shortcut.norm.running_var" in keys
    assert "res5.2.conv3.norm.num_batches_tracked" in keys
    assert {k.split(".")[0] for k in keys} == {"stem", "res2", "res3", "res4", "res5"}
    basic = make_backbone(50, "basic").state_dict()
    assert "stem.conv1.weight" in basic and not any(k.startswith("stem.conv2") for k in basic)


def test_direct_call_matches_registry():
    cfg = get_knet_cfg(opts=["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    backbone = build_knet_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, ResNet) and backbone.output_shape()["res4"].stride == 16
