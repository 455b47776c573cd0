"""Checkpoint conversion: official K-Net (MMDetection) and torchvision ResNet -> this project.

The official checkpoints are not downloaded here: ``make_official_state_dict`` writes a synthetic
one with exactly the keys and shapes of the official layout (backbone = torchvision ResNet,
MMDet FPN neck, 36 ``rpn_head`` tensors, 44 tensors per ``roi_head.mask_head`` stage).
"""

import datetime
import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.layers import DeformConv, ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone
from torch import nn

from knet import add_knet_config
from knet.checkpoint import (
    CheckpointKeyError,
    UnsupportedCheckpointError,
    check_coco_class_names,
    compare_state_dicts,
    convert_official_knet_state_dict,
    convert_torchvision_resnet_state_dict,
    describe_official_knet_state_dict,
    load_checkpoint_file,
    save_detectron2_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "panoptic": REPO / "configs/coco/panoptic-segmentation/knet_R50_bs16_1x.yaml",
    "instance": REPO / "configs/coco/instance-segmentation/knet_R50_bs16_1x.yaml",
}
NUM_CLASSES = {"panoptic": 133, "instance": 80}
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

COCO_THINGS = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
COCO_STUFF = [c["name"] for c in COCO_CATEGORIES if not c["isthing"]]


# ------------------------------------------------------------------ synthetic official weights
class _Writer:
    """Fills a state dict with seeded random tensors of given shapes."""

    def __init__(self, seed: int):
        self.sd: Dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, key: str, *shape: int) -> None:
        assert key not in self.sd, key
        self.sd[key] = torch.randn(*shape, generator=self.gen)

    def bn(self, prefix: str, n: int) -> None:
        for p in ("weight", "bias", "running_mean"):
            self.add(f"{prefix}.{p}", n)
        self.sd[f"{prefix}.running_var"] = torch.rand(n, generator=self.gen) + 0.5
        self.sd[f"{prefix}.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)

    def conv_gn(self, prefix: str, cout: int, cin: int, k: int) -> None:
        """An MMCV ConvModule with GN: conv.weight (no bias), gn.{weight,bias}."""
        self.add(f"{prefix}.conv.weight", cout, cin, k, k)
        self.add(f"{prefix}.gn.weight", cout)
        self.add(f"{prefix}.gn.bias", cout)


def make_official_state_dict(
    depth: int = 50,
    num_classes: int = 133,
    num_stages: int = 3,
    dcn: bool = False,
    channels: int = 256,
    ffn_channels: int = 2048,
    num_proposals: int = 100,
    base_width: int = 64,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """An official K-Net ``state_dict`` (spec sections 7.1-7.4) filled with random values.

    With the defaults every shape is the real one (R50, C = 256); smaller ``channels``,
    ``ffn_channels``, ``num_proposals`` and ``base_width`` give a tiny file with the same keys.
    """
    w = _Writer(seed)
    # 7.1 torchvision-style ResNet (MMDet "pytorch" style); DCNv1 on the 3x3 convs of layer2-4.
    w.add("backbone.conv1.weight", base_width, 3, 7, 7)
    w.bn("backbone.bn1", base_width)
    in_ch = base_width
    stage_out = []
    for layer, num_blocks in enumerate(RESNET_BLOCKS[depth], start=1):
        width = base_width * 2 ** (layer - 1)
        out_ch = 4 * width
        for i in range(num_blocks):
            p = f"backbone.layer{layer}.{i}"
            w.add(f"{p}.conv1.weight", width, in_ch if i == 0 else out_ch, 1, 1)
            w.bn(f"{p}.bn1", width)
            w.add(f"{p}.conv2.weight", width, width, 3, 3)
            if dcn and layer > 1:
                w.add(f"{p}.conv2.conv_offset.weight", 18, width, 3, 3)
                w.add(f"{p}.conv2.conv_offset.bias", 18)
            w.bn(f"{p}.bn2", width)
            w.add(f"{p}.conv3.weight", out_ch, width, 1, 1)
            w.bn(f"{p}.bn3", out_ch)
            if i == 0:
                w.add(f"{p}.downsample.0.weight", out_ch, in_ch, 1, 1)
                w.bn(f"{p}.downsample.1", out_ch)
        in_ch = out_ch
        stage_out.append(out_ch)
    # 7.2 neck
    for i, cin in enumerate(stage_out):
        w.add(f"neck.lateral_convs.{i}.conv.weight", channels, cin, 1, 1)
        w.add(f"neck.lateral_convs.{i}.conv.bias", channels)
        w.add(f"neck.fpn_convs.{i}.conv.weight", channels, channels, 3, 3)
        w.add(f"neck.fpn_convs.{i}.conv.bias", channels)
    # 7.3 rpn_head (36 tensors)
    c = channels
    fpn = "rpn_head.localization_fpn"
    w.conv_gn(f"{fpn}.convs_all_levels.0.conv0", c, c, 3)
    w.conv_gn(f"{fpn}.convs_all_levels.1.conv0", c, c, 3)
    for j in range(2):
        w.conv_gn(f"{fpn}.convs_all_levels.2.conv{j}", c, c, 3)
    for j in range(3):
        w.conv_gn(f"{fpn}.convs_all_levels.3.conv{j}", c, c, 3)
    w.conv_gn(f"{fpn}.conv_pred", c, c, 1)
    w.conv_gn(f"{fpn}.aux_convs.0", c, c, 1)
    w.add("rpn_head.init_kernels.weight", num_proposals, c, 1, 1)
    w.add("rpn_head.conv_seg.weight", num_classes, c, 1, 1)
    w.add("rpn_head.conv_seg.bias", num_classes)
    w.conv_gn("rpn_head.loc_convs.0", c, c, 1)
    w.conv_gn("rpn_head.seg_convs.0", c, c, 1)
    # 7.4 roi_head.mask_head.{s} (44 tensors each)
    for s in range(num_stages):
        p = f"roi_head.mask_head.{s}"
        w.add(f"{p}.attention.attn.in_proj_weight", 3 * c, c)
        w.add(f"{p}.attention.attn.in_proj_bias", 3 * c)
        w.add(f"{p}.attention.attn.out_proj.weight", c, c)
        w.add(f"{p}.attention.attn.out_proj.bias", c)
        w.add(f"{p}.attention_norm.weight", c)
        w.add(f"{p}.attention_norm.bias", c)
        ku = f"{p}.kernel_update_conv"
        for name, rows in (
            ("dynamic_layer", 2 * c),
            ("input_layer", 2 * c),
            ("input_gate", c),
            ("update_gate", c),
        ):
            w.add(f"{ku}.{name}.weight", rows, c)
            w.add(f"{ku}.{name}.bias", rows)
        for name in ("norm_in", "norm_out", "input_norm_in", "input_norm_out"):
            w.add(f"{ku}.{name}.weight", c)
            w.add(f"{ku}.{name}.bias", c)
        w.add(f"{ku}.fc_layer.weight", c, c)
        w.add(f"{ku}.fc_layer.bias", c)
        w.add(f"{ku}.fc_norm.weight", c)
        w.add(f"{ku}.fc_norm.bias", c)
        w.add(f"{p}.feat_transform.conv.weight", c, c, 1, 1)
        w.add(f"{p}.feat_transform.conv.bias", c)
        w.add(f"{p}.ffn.layers.0.0.weight", ffn_channels, c)
        w.add(f"{p}.ffn.layers.0.0.bias", ffn_channels)
        w.add(f"{p}.ffn.layers.1.weight", c, ffn_channels)
        w.add(f"{p}.ffn.layers.1.bias", c)
        w.add(f"{p}.ffn_norm.weight", c)
        w.add(f"{p}.ffn_norm.bias", c)
        w.add(f"{p}.cls_fcs.0.weight", c, c)
        w.add(f"{p}.cls_fcs.1.weight", c)
        w.add(f"{p}.cls_fcs.1.bias", c)
        w.add(f"{p}.fc_cls.weight", num_classes, c)
        w.add(f"{p}.fc_cls.bias", num_classes)
        w.add(f"{p}.mask_fcs.0.weight", c, c)
        w.add(f"{p}.mask_fcs.1.weight", c)
        w.add(f"{p}.mask_fcs.1.bias", c)
        w.add(f"{p}.fc_mask.weight", c, c)
        w.add(f"{p}.fc_mask.bias", c)
    return w.sd


def coco_classes(task: str) -> Tuple[str, ...]:
    return tuple(COCO_THINGS + (COCO_STUFF if task == "panoptic" else []))


@pytest.fixture(scope="module")
def official() -> Dict[str, Dict[str, torch.Tensor]]:
    """Full-size synthetic official R50 state dicts, one per task."""
    return {task: make_official_state_dict(num_classes=n) for task, n in NUM_CLASSES.items()}


def knet_cfg(task: str, opts: Optional[list] = None):
    cfg = get_cfg()
    add_knet_config(cfg)
    cfg.merge_from_file(str(CONFIGS[task]))
    cfg.merge_from_list(list(opts or []))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


# Explicit pairs from the spec tables: (official key, our key).
SPOT_CHECKS = [
    ("backbone.conv1.weight", "backbone.bottom_up.stem.conv1.weight"),
    ("backbone.bn1.running_var", "backbone.bottom_up.stem.conv1.norm.running_var"),
    ("backbone.layer1.0.downsample.0.weight", "backbone.bottom_up.res2.0.shortcut.weight"),
    ("backbone.layer1.0.downsample.1.bias", "backbone.bottom_up.res2.0.shortcut.norm.bias"),
    ("backbone.layer3.5.bn2.running_mean", "backbone.bottom_up.res4.5.conv2.norm.running_mean"),
    ("backbone.layer4.2.conv3.weight", "backbone.bottom_up.res5.2.conv3.weight"),
    ("neck.lateral_convs.0.conv.weight", "backbone.fpn_lateral2.weight"),
    ("neck.lateral_convs.3.conv.bias", "backbone.fpn_lateral5.bias"),
    ("neck.fpn_convs.2.conv.weight", "backbone.fpn_output4.weight"),
    (
        "rpn_head.localization_fpn.convs_all_levels.0.conv0.conv.weight",
        "pixel_decoder.convs_all_levels.0.conv0.weight",
    ),
    (
        "rpn_head.localization_fpn.convs_all_levels.3.conv2.gn.bias",
        "pixel_decoder.convs_all_levels.3.conv2.norm.bias",
    ),
    ("rpn_head.localization_fpn.conv_pred.gn.weight", "pixel_decoder.conv_pred.norm.weight"),
    ("rpn_head.localization_fpn.aux_convs.0.conv.weight", "pixel_decoder.aux_conv.weight"),
    ("rpn_head.loc_convs.0.conv.weight", "kernel_head.initial_head.loc_convs.0.weight"),
    ("rpn_head.seg_convs.0.gn.bias", "kernel_head.initial_head.seg_convs.0.norm.bias"),
    ("rpn_head.init_kernels.weight", "kernel_head.initial_head.init_kernels.weight"),
    ("rpn_head.conv_seg.bias", "kernel_head.initial_head.conv_seg.bias"),
    (
        "roi_head.mask_head.0.attention.attn.in_proj_weight",
        "kernel_head.stages.0.attention.in_proj_weight",
    ),
    (
        "roi_head.mask_head.2.attention.attn.out_proj.bias",
        "kernel_head.stages.2.attention.out_proj.bias",
    ),
    (
        "roi_head.mask_head.1.feat_transform.conv.weight",
        "kernel_head.stages.1.feat_transform.weight",
    ),
    ("roi_head.mask_head.1.ffn.layers.0.0.weight", "kernel_head.stages.1.ffn.0.weight"),
    ("roi_head.mask_head.2.ffn.layers.1.bias", "kernel_head.stages.2.ffn.3.bias"),
    (
        "roi_head.mask_head.0.kernel_update_conv.input_norm_out.weight",
        "kernel_head.stages.0.kernel_update_conv.input_norm_out.weight",
    ),
    ("roi_head.mask_head.2.cls_fcs.1.bias", "kernel_head.stages.2.cls_fcs.1.bias"),
    ("roi_head.mask_head.2.fc_cls.weight", "kernel_head.stages.2.fc_cls.weight"),
    ("roi_head.mask_head.0.mask_fcs.0.weight", "kernel_head.stages.0.mask_fcs.0.weight"),
    ("roi_head.mask_head.1.fc_mask.bias", "kernel_head.stages.1.fc_mask.bias"),
]


# ----------------------------------------------------------------------------- generator
@pytest.mark.parametrize("task,expected_mparams", [("instance", 13.97), ("panoptic", 14.03)])
def test_generator_matches_spec_totals(official, task, expected_mparams):
    sd = official[task]
    head = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    assert len(head) == 184
    assert sum(k.startswith("rpn_head.") for k in head) == 36
    for s in range(3):
        assert sum(k.startswith(f"roi_head.mask_head.{s}.") for k in head) == 44
    assert round(sum(v.numel() for v in head.values()) / 1e6, 2) == expected_mparams


@pytest.mark.parametrize("depth", [50, 101])
def test_generator_backbone_matches_torchvision(depth):
    with torch.device("meta"):
        tv = getattr(torchvision.models, f"resnet{depth}")()
    expected = {f"backbone.{k}": tuple(v.shape) for k, v in tv.state_dict().items()}
    expected = {k: v for k, v in expected.items() if not k.startswith("backbone.fc.")}
    sd = make_official_state_dict(depth=depth, channels=32, ffn_channels=32, num_proposals=4)
    got = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("backbone.")}
    assert got == expected


# ------------------------------------------------------------------------- official K-Net
@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_conversion_maps_every_key(official, task):
    sd = official[task]
    out = convert_official_knet_state_dict(sd)
    num_tracked = sum(k.endswith("num_batches_tracked") for k in sd)
    assert num_tracked == 53  # one per BN of ResNet-50
    assert len(out) == len(sd) - num_tracked
    assert not any(k.endswith("num_batches_tracked") for k in out)
    for old, new in SPOT_CHECKS:
        assert out[new] is sd[old], (old, new)
    # every input tensor (except the dropped buffers) ends up under exactly one new key
    assert {id(v) for v in out.values()} == {
        id(v) for k, v in sd.items() if not k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize("task,suffix", [("panoptic", ".pth"), ("instance", ".pkl")])
def test_converted_weights_load_into_model(official, task, suffix, tmp_path):
    sd = official[task]
    model = build_model(knet_cfg(task)).eval()
    converted = convert_official_knet_state_dict(
        {"meta": {"CLASSES": coco_classes(task)}, "state_dict": sd},
        target_keys=model.state_dict().keys(),
    )
    diff = compare_state_dicts(converted, model.state_dict())
    assert diff.ok, diff.format()

    path = str(tmp_path / f"knet{suffix}")
    save_detectron2_checkpoint(converted, path, author="test")
    if suffix == ".pth":  # loadable with torch.load's safe default (torch >= 2.6)
        on_disk = torch.load(path, map_location="cpu", weights_only=True)
        assert on_disk["matching_heuristics"] is False and set(on_disk["model"]) == set(converted)

    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    DetectionCheckpointer(model).load(path)
    loaded = model.state_dict()
    for old, new in SPOT_CHECKS:
        torch.testing.assert_close(loaded[new], sd[old], rtol=0, atol=0)
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())


def test_r101_dcn_backbone_keys_match_detectron2():
    sd = make_official_state_dict(
        depth=101, dcn=True, num_classes=80, channels=32, ffn_channels=32, num_proposals=4
    )
    info = describe_official_knet_state_dict(sd)
    assert (info.depth, info.num_stages, info.num_classes) == (101, 3, 80)
    assert info.deform_layers == (2, 3, 4)
    cfg = knet_cfg("instance", info.detectron2_options())
    assert cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE == [False, True, True, True]
    bottom_up = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    reference = {f"backbone.bottom_up.{k}": v for k, v in bottom_up.state_dict().items()}
    converted = convert_official_knet_state_dict(sd)
    converted = {k: v for k, v in converted.items() if k.startswith("backbone.bottom_up.")}
    diff = compare_state_dicts(converted, reference)
    assert diff.ok, diff.format()
    assert (
        converted["backbone.bottom_up.res3.0.conv2_offset.weight"]
        is (sd["backbone.layer2.0.conv2.conv_offset.weight"])
    )
    assert sum(k.endswith("conv2_offset.weight") for k in converted) == 4 + 23 + 3


def test_deform_conv_offsets_are_dy_dx_per_tap():
    """Official (MMCV) DCNv1 offsets are ordered (dy, dx) per tap; Detectron2 must agree."""
    torch.manual_seed(0)
    conv = DeformConv(4, 5, kernel_size=3, padding=1, bias=False)
    x = torch.randn(1, 4, 9, 11)
    reference = F.conv2d(x, conv.weight, padding=1)
    offset = torch.zeros(1, 18, 9, 11)
    offset[:, 0::2] = 1.0  # dy = +1 on every tap: sample one row further down
    out = conv(x, offset)
    torch.testing.assert_close(out[:, :, :-1], reference[:, :, 1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, :, :, :-1], reference[:, :, :, 1:], atol=1e-2)


def test_whole_checkpoint_and_meta_are_accepted(official):
    sd = official["panoptic"]
    info = describe_official_knet_state_dict(
        {"meta": {"CLASSES": coco_classes("panoptic")}, "state_dict": sd}
    )
    assert info.classes == coco_classes("panoptic")
    assert (info.depth, info.num_proposals, info.channels) == (50, 100, 256)
    assert (info.num_cls_fcs, info.num_mask_fcs) == (1, 1)
    assert check_coco_class_names(info.classes) == []
    swapped = list(coco_classes("panoptic"))
    swapped[80], swapped[81] = swapped[81], swapped[80]
    assert len(check_coco_class_names(swapped)) == 2


def test_unknown_key_raises_and_names_it(official):
    bad = dict(official["panoptic"])
    bad["roi_head.mask_head.1.attention.attn.extra_proj.weight"] = torch.zeros(3)
    bad["backbone.layer2.0.conv4.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointKeyError) as err:
        convert_official_knet_state_dict(bad)
    assert "roi_head.mask_head.1.attention.attn.extra_proj.weight" in str(err.value)
    assert "backbone.layer2.0.conv4.weight" in str(err.value)


@pytest.mark.parametrize(
    "key",
    [
        "roi_head.mask_head.1.fc_mask.bias",
        "rpn_head.localization_fpn.convs_all_levels.3.conv1.gn.weight",
        "neck.fpn_convs.3.conv.bias",
        "backbone.layer3.5.bn2.running_var",
        "backbone.layer2.0.downsample.0.weight",
    ],
)
def test_missing_key_raises_and_names_it(official, key):
    bad = dict(official["instance"])
    del bad[key]
    with pytest.raises(CheckpointKeyError) as err:
        convert_official_knet_state_dict(bad)
    assert key in str(err.value)


def test_missing_num_batches_tracked_is_fine_and_kept_when_wanted(official):
    sd = dict(official["instance"])
    del sd["backbone.layer1.0.bn1.num_batches_tracked"]
    out = convert_official_knet_state_dict(sd)
    wanted = "backbone.bottom_up.res2.1.conv1.norm.num_batches_tracked"
    out = convert_official_knet_state_dict(sd, target_keys=list(out) + [wanted])
    assert out[wanted] is sd["backbone.layer1.1.bn1.num_batches_tracked"]
    assert sum(k.endswith("num_batches_tracked") for k in out) == 1


def test_error_message_is_truncated(official):
    bad = dict(official["instance"])
    for i in range(30):
        bad[f"rpn_head.unknown_{i:02d}.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as err:
        convert_official_knet_state_dict(bad)
    msg = str(err.value)
    assert "30 key(s)" in msg and "and 10 more" in msg
    assert "rpn_head.unknown_00.weight" in msg and "rpn_head.unknown_29.weight" not in msg


def test_stage_count_is_read_from_the_keys():
    sd = make_official_state_dict(num_stages=2, channels=32, ffn_channels=64, num_proposals=8)
    out = convert_official_knet_state_dict(sd)
    assert {k.split(".")[2] for k in out if k.startswith("kernel_head.stages.")} == {"0", "1"}
    del sd["roi_head.mask_head.0.fc_cls.weight"]
    with pytest.raises(CheckpointKeyError, match="roi_head.mask_head.0.fc_cls.weight"):
        convert_official_knet_state_dict(sd)


def test_unsupported_variants_raise_clearly(official):
    swin = {k: v for k, v in official["panoptic"].items() if not k.startswith("backbone.")}
    swin["backbone.patch_embed.projection.weight"] = torch.zeros(192, 3, 4, 4)
    swin["backbone.stages.0.blocks.0.attn.w_msa.qkv.weight"] = torch.zeros(576, 192)
    with pytest.raises(UnsupportedCheckpointError, match="Swin.*not supported yet"):
        convert_official_knet_state_dict(swin)
    semantic = {"decode_head.kernel_update_head.0.fc_mask.weight": torch.zeros(256, 256)}
    with pytest.raises(UnsupportedCheckpointError, match="Semantic"):
        convert_official_knet_state_dict(semantic)


def test_checkpoint_files_are_loaded_safely_by_default(tmp_path):
    path = str(tmp_path / "with_objects.pth")
    torch.save({"meta": {"time": datetime.date(2021, 10, 16)}, "state_dict": {}}, path)
    with pytest.raises(pickle.UnpicklingError, match="allow-pickle"):
        load_checkpoint_file(path)
    assert load_checkpoint_file(path, allow_pickle=True)["meta"]["time"].year == 2021


# ------------------------------------------------------------------------ torchvision ResNet
def _resnet_cfg(depth: int, stride_in_1x1: bool = False):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = stride_in_1x1
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    return cfg


class _Wrapper(nn.Module):
    """``backbone.bottom_up`` (Detectron2 ResNet), named as in the K-Net meta-architecture."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.bottom_up = build_resnet_backbone(cfg, ShapeSpec(channels=3))


def _torchvision_resnet(depth: int) -> nn.Module:
    torch.manual_seed(depth)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    for m in net.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _torchvision_res5(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_matches_detectron2_backbone(depth):
    net = _torchvision_resnet(depth)
    converted = convert_torchvision_resnet_state_dict(net.state_dict())
    assert not any(".fc." in k or k.endswith("num_batches_tracked") for k in converted)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = _torchvision_res5(net, x)
    results = {}
    for stride_in_1x1 in (False, True):
        model = _Wrapper(_resnet_cfg(depth, stride_in_1x1)).eval()
        incompatible = model.load_state_dict(converted, strict=True)
        assert not incompatible.missing_keys and not incompatible.unexpected_keys
        with torch.no_grad():
            results[stride_in_1x1] = model.backbone.bottom_up(x)["res5"]
    torch.testing.assert_close(results[False], expected, rtol=1e-4, atol=1e-4)
    if depth >= 50:  # the stride convention matters for bottleneck blocks only
        assert (results[True] - expected).abs().max() > 1e-2


def test_torchvision_conversion_is_strict():
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["layer1.0.conv4.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match="layer1.0.conv4.weight"):
        convert_torchvision_resnet_state_dict(sd)
    del sd["layer1.0.conv4.weight"]
    del sd["layer4.1.bn2.bias"]
    with pytest.raises(CheckpointKeyError, match="layer4.1.bn2.bias"):
        convert_torchvision_resnet_state_dict(sd)


# -------------------------------------------------------------------------------------- CLIs
def _import_tool(name: str):
    """Import a script of tools/ as a module (its ``main(argv)`` returns the exit status)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_official_cli_round_trip_on_small_file(tmp_path):
    sd = make_official_state_dict(channels=32, ffn_channels=64, num_proposals=8, base_width=8)
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save({"meta": {"CLASSES": coco_classes("panoptic")}, "state_dict": sd}, src)

    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/convert_official_knet.py"), str(src), str(dst)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO / "projects")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ResNet-50, 3 stages, 133 classes, 8 proposals, 32 channels" in proc.stdout
    out = torch.load(dst, map_location="cpu", weights_only=True)
    expected = convert_official_knet_state_dict(sd)
    assert set(out["model"]) == set(expected)
    assert all(torch.equal(out["model"][k], v) for k, v in expected.items())
    assert out["matching_heuristics"] is False and out["__author__"]


def test_official_cli_failures(tmp_path, capsys):
    cli = _import_tool("convert_official_knet")
    sd = make_official_state_dict(channels=32, ffn_channels=64, num_proposals=8, base_width=8)
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    classes = list(coco_classes("panoptic"))
    torch.save({"meta": {"CLASSES": classes}, "state_dict": sd}, src)
    # the small model does not fit the R50 config: exit 1, nothing written
    config = ["--config-file", str(CONFIGS["panoptic"])]
    assert cli.main([str(src), str(dst), *config]) == 1
    assert "shape mismatches" in capsys.readouterr().err and not dst.exists()
    # ... unless the config is overridden to the small model's sizes
    opts = ["MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.RESNETS.STEM_OUT_CHANNELS", "8"]
    opts += ["MODEL.RESNETS.WIDTH_PER_GROUP", "8"]
    opts += ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32"]
    opts += ["MODEL.KNET.HIDDEN_DIM", "32", "MODEL.KNET.UPDATOR_DIM", "32"]
    opts += ["MODEL.KNET.DIM_FEEDFORWARD", "64", "MODEL.KNET.NUM_PROPOSALS", "8"]
    assert cli.main([str(src), str(dst), *config, "--opts", *opts]) == 0, capsys.readouterr().err
    assert "verified" in capsys.readouterr().out and dst.exists()
    # class order differing from Detectron2's COCO ids
    classes[3], classes[4] = classes[4], classes[3]
    torch.save({"meta": {"CLASSES": classes}, "state_dict": sd}, src)
    assert cli.main([str(src), str(tmp_path / "a.pth")]) == 1
    assert "class 3" in capsys.readouterr().err
    assert cli.main([str(src), str(tmp_path / "b.pth"), "--skip-class-check"]) == 0
    # unknown key
    sd["rpn_head.extra.weight"] = torch.zeros(1)
    torch.save(sd, src)
    assert cli.main([str(src), str(tmp_path / "c.pth")]) == 2
    assert "rpn_head.extra.weight" in capsys.readouterr().err


def test_official_cli_with_config_full_size(official, tmp_path):
    cli = _import_tool("convert_official_knet")
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    checkpoint = {"meta": {"CLASSES": coco_classes("instance")}, "state_dict": official["instance"]}
    torch.save(checkpoint, src)
    assert cli.main([str(src), str(dst), "--config-file", str(CONFIGS["instance"])]) == 0
    out = load_checkpoint_file(str(dst))["model"]
    key = "roi_head.mask_head.2.fc_cls.bias"
    assert torch.equal(out["kernel_head.stages.2.fc_cls.bias"], official["instance"][key])


def test_torchvision_cli(tmp_path):
    cli = _import_tool("convert_torchvision_resnet")
    net = _torchvision_resnet(18)
    src, dst = tmp_path / "resnet18.pth", tmp_path / "R-18.pth"
    torch.save(net.state_dict(), src)
    assert cli.main([str(src), str(dst)]) == 0
    out = torch.load(dst, map_location="cpu", weights_only=True)["model"]
    assert torch.equal(out["backbone.bottom_up.res5.1.conv2.weight"], net.layer4[1].conv2.weight)
    assert torch.equal(out["backbone.bottom_up.stem.conv1.norm.running_var"], net.bn1.running_var)
    assert len(out) == len(convert_torchvision_resnet_state_dict(net.state_dict()))
