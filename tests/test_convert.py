"""Checkpoint conversion: official K-Net (MMDet/MMSeg) and ImageNet ResNets -> this project.

The official checkpoints are not downloaded here: ``make_official_state_dict`` writes a synthetic
one with exactly the keys and shapes of the official layout (backbone = torchvision ResNet,
MMDet FPN neck, 36 ``rpn_head`` tensors, 44 tensors per ``roi_head.mask_head`` stage), and
``make_mmseg_state_dict`` one of the semantic (MMSeg, ADE20K) layout (ResNetV1c backbone, an
UPerNet/FCN/PSP/ASPP decode head, 39 tensors per update stage, auxiliary FCN head).
"""

import datetime
import importlib
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
from knet.engine import get_knet_cfg
from knet.modeling.backbone.resnet import build_knet_resnet_backbone

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
    """Fills a state dict with seeded random tensors of given shapes.

    With ``lazy`` every tensor is a stride-0 view of one element: full-size shapes at no
    memory cost, for tests that only look at keys, shapes and tensor identity.
    """

    def __init__(self, seed: int, lazy: bool = False):
        self.sd: Dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)
        self.lazy = lazy

    def add(self, key: str, *shape: int) -> None:
        assert key not in self.sd, key
        if self.lazy:
            self.sd[key] = torch.randn(1, generator=self.gen).expand(*shape)
        else:
            self.sd[key] = torch.randn(*shape, generator=self.gen)

    def bn(self, prefix: str, n: int) -> None:
        for p in ("weight", "bias", "running_mean"):
            self.add(f"{prefix}.{p}", n)
        self.sd[f"{prefix}.running_var"] = torch.rand(n, generator=self.gen) + 0.5
        self.sd[f"{prefix}.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)

    def conv_bn(self, prefix: str, cout: int, cin: int, k: int) -> None:
        """An MMCV ConvModule with BN: conv.weight (no bias), bn.*."""
        self.add(f"{prefix}.conv.weight", cout, cin, k, k)
        self.bn(f"{prefix}.bn", cout)

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
        write_update_stage(w, f"roi_head.mask_head.{s}", c, c, ffn_channels, num_classes)
    return w.sd


def write_update_stage(
    w: "_Writer", p: str, c: int, u: int, ffn_channels: int, num_classes: int
) -> None:
    """One official ``KernelUpdateHead`` (spec 7.4; 7.5 without cls_fcs/fc_cls when
    ``num_classes`` is 0): width ``c``, kernel updator width ``u``."""
    w.add(f"{p}.attention.attn.in_proj_weight", 3 * c, c)
    w.add(f"{p}.attention.attn.in_proj_bias", 3 * c)
    w.add(f"{p}.attention.attn.out_proj.weight", c, c)
    w.add(f"{p}.attention.attn.out_proj.bias", c)
    w.add(f"{p}.attention_norm.weight", c)
    w.add(f"{p}.attention_norm.bias", c)
    ku = f"{p}.kernel_update_conv"
    for name, rows in (
        ("dynamic_layer", 2 * u),
        ("input_layer", 2 * u),
        ("input_gate", u),
        ("update_gate", u),
        ("fc_layer", u),
    ):
        w.add(f"{ku}.{name}.weight", rows, u)
        w.add(f"{ku}.{name}.bias", rows)
    for name in ("norm_in", "norm_out", "input_norm_in", "input_norm_out", "fc_norm"):
        w.add(f"{ku}.{name}.weight", u)
        w.add(f"{ku}.{name}.bias", u)
    w.add(f"{p}.feat_transform.conv.weight", c, c, 1, 1)
    w.add(f"{p}.feat_transform.conv.bias", c)
    w.add(f"{p}.ffn.layers.0.0.weight", ffn_channels, c)
    w.add(f"{p}.ffn.layers.0.0.bias", ffn_channels)
    w.add(f"{p}.ffn.layers.1.weight", c, ffn_channels)
    w.add(f"{p}.ffn.layers.1.bias", c)
    w.add(f"{p}.ffn_norm.weight", c)
    w.add(f"{p}.ffn_norm.bias", c)
    if num_classes:
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
    deep_stem = {k: v for k, v in official["panoptic"].items() if not k.startswith("backbone.")}
    deep_stem["backbone.stem.0.weight"] = torch.zeros(32, 3, 3, 3)
    with pytest.raises(UnsupportedCheckpointError, match="semantic K-Net only"):
        convert_official_knet_state_dict(deep_stem)


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


# ------------------------------------------------------------------ semantic (MMSeg) K-Net
SEM_CHANNELS = {"upernet": 256, "fcn": 512, "psp": 512, "aspp": 512}
SEM_DECODERS = {
    "upernet": "KNetUPerHead",
    "fcn": "KNetFCNHead",
    "psp": "KNetPSPHead",
    "aspp": "KNetASPPHead",
}
GEN = "decode_head.kernel_generate_head"
ALL_RES = ["res2", "res3", "res4", "res5"]


def write_resnet_v1c(w: _Writer, prefix: str, depth: int = 50, base_width: int = 64) -> List[int]:
    """MMCV ResNetV1c (deep stem, "pytorch" style); returns the stage output widths."""
    half = base_width // 2
    w.add(f"{prefix}stem.0.weight", half, 3, 3, 3)
    w.bn(f"{prefix}stem.1", half)
    w.add(f"{prefix}stem.3.weight", half, half, 3, 3)
    w.bn(f"{prefix}stem.4", half)
    w.add(f"{prefix}stem.6.weight", base_width, half, 3, 3)
    w.bn(f"{prefix}stem.7", base_width)
    bottleneck = depth >= 50
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}.get(depth) or RESNET_BLOCKS[depth]
    in_ch, stage_out = base_width, []
    for layer, num_blocks in enumerate(blocks, start=1):
        width = base_width * 2 ** (layer - 1)
        out_ch = 4 * width if bottleneck else width
        for i in range(num_blocks):
            p = f"{prefix}layer{layer}.{i}"
            block_in = in_ch if i == 0 else out_ch
            if bottleneck:
                w.add(f"{p}.conv1.weight", width, block_in, 1, 1)
                w.bn(f"{p}.bn1", width)
                w.add(f"{p}.conv2.weight", width, width, 3, 3)
                w.bn(f"{p}.bn2", width)
                w.add(f"{p}.conv3.weight", out_ch, width, 1, 1)
                w.bn(f"{p}.bn3", out_ch)
            else:
                w.add(f"{p}.conv1.weight", width, block_in, 3, 3)
                w.bn(f"{p}.bn1", width)
                w.add(f"{p}.conv2.weight", width, width, 3, 3)
                w.bn(f"{p}.bn2", width)
            if i == 0 and block_in != out_ch:
                w.add(f"{p}.downsample.0.weight", out_ch, in_ch, 1, 1)
                w.bn(f"{p}.downsample.1", out_ch)
        in_ch = out_ch
        stage_out.append(out_ch)
    return stage_out


def make_mmseg_state_dict(
    head: str,
    num_classes: int = 150,
    num_stages: int = 3,
    channels: Optional[int] = None,
    updator_channels: int = 256,
    ffn_channels: int = 2048,
    base_width: int = 64,
    aux_channels: Optional[int] = 256,
    lazy: bool = True,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """A semantic K-Net ``state_dict`` (spec 7.5) of an MMSeg ADE20K model.

    Defaults give the real shapes: ResNetV1c-50, UPerNet with 256 channels or FCN/PSP/ASPP with
    512 (the kernel updator stays 256 wide), 150 classes, 3 stages, auxiliary FCN head
    1024 -> 256 on res4 (``aux_channels=None``: no auxiliary head). Tensors are lazy (stride-0)
    unless ``lazy=False``.
    """
    w = _Writer(seed, lazy)
    ins = write_resnet_v1c(w, "backbone.", 50, base_width)
    c = channels or SEM_CHANNELS[head]
    if head == "upernet":
        for i in range(4):
            w.conv_bn(f"{GEN}.psp_modules.{i}.1", c, ins[3], 1)
        w.conv_bn(f"{GEN}.bottleneck", c, ins[3] + 4 * c, 3)
        for i in range(3):
            w.conv_bn(f"{GEN}.lateral_convs.{i}", c, ins[i], 1)
        for i in range(3):
            w.conv_bn(f"{GEN}.fpn_convs.{i}", c, c, 3)
        w.conv_bn(f"{GEN}.fpn_bottleneck", c, 4 * c, 3)
    elif head == "fcn":
        w.conv_bn(f"{GEN}.convs.0", c, ins[3], 3)
        w.conv_bn(f"{GEN}.convs.1", c, c, 3)
        w.conv_bn(f"{GEN}.conv_cat", c, ins[3] + c, 3)
    elif head == "psp":
        for i in range(4):
            w.conv_bn(f"{GEN}.psp_modules.{i}.1", c, ins[3], 1)
        w.conv_bn(f"{GEN}.bottleneck", c, ins[3] + 4 * c, 3)
    elif head == "aspp":
        w.conv_bn(f"{GEN}.image_pool.1", c, ins[3], 1)
        for i in range(4):
            w.conv_bn(f"{GEN}.aspp_modules.{i}", c, ins[3], 1 if i == 0 else 3)
        w.conv_bn(f"{GEN}.bottleneck", c, 5 * c, 3)
    w.add(f"{GEN}.conv_seg.weight", num_classes, c, 1, 1)
    w.add(f"{GEN}.conv_seg.bias", num_classes)
    u = updator_channels
    for s in range(num_stages):  # 39 tensors each: the layout of 7.4 without cls_fcs/fc_cls
        write_update_stage(w, f"decode_head.kernel_update_head.{s}", c, u, ffn_channels, 0)
    if aux_channels:
        w.conv_bn("auxiliary_head.convs.0", aux_channels, ins[2], 3)
        w.add("auxiliary_head.conv_seg.weight", num_classes, aux_channels, 1, 1)
        w.add("auxiliary_head.conv_seg.bias", num_classes)
    return w.sd


# The contract, restated independently of the converter: official key -> our key.
_SEM_STAGE_RENAMES = {
    "attention.attn.in_proj_weight": "attention.in_proj_weight",
    "attention.attn.in_proj_bias": "attention.in_proj_bias",
    "attention.attn.out_proj.weight": "attention.out_proj.weight",
    "attention.attn.out_proj.bias": "attention.out_proj.bias",
    "feat_transform.conv.weight": "feat_transform.weight",
    "feat_transform.conv.bias": "feat_transform.bias",
    "ffn.layers.0.0.weight": "ffn.0.weight",
    "ffn.layers.0.0.bias": "ffn.0.bias",
    "ffn.layers.1.weight": "ffn.3.weight",
    "ffn.layers.1.bias": "ffn.3.bias",
}
_SEM_STAGE_SAME = re.compile(
    r"^(attention_norm|ffn_norm|fc_mask|mask_fcs\.[01]|kernel_update_conv\.\w+)\.(weight|bias)$"
)
_D2_STEM = {"0": "conv1", "1": "conv1.norm", "3": "conv2", "4": "conv2.norm"}
_D2_STEM.update({"6": "conv3", "7": "conv3.norm"})


def expected_semantic_key(key: str) -> str:
    """Our name of an MMSeg K-Net key, from the documented rules (KeyError if none)."""
    if m := re.match(r"^backbone\.stem\.(\d)\.(\w+)$", key):
        return f"backbone.stem.{_D2_STEM[m.group(1)]}.{m.group(2)}"
    if m := re.match(r"^backbone\.layer(\d)\.(\d+)\.(.+)$", key):
        rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", m.group(3))
        rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
        return f"backbone.res{int(m.group(1)) + 1}.{m.group(2)}.{rest}"
    if m := re.match(rf"^{GEN}\.conv_seg\.(weight|bias)$", key):
        return f"kernel_head.conv_seg.{m.group(1)}"
    if m := re.match(rf"^{GEN}\.(.+)\.(conv|bn)\.(\w+)$", key):
        name, kind, p = m.groups()
        return f"pixel_decoder.{name}.{p}" if kind == "conv" else f"pixel_decoder.{name}.norm.{p}"
    if m := re.match(r"^decode_head\.kernel_update_head\.(\d+)\.(.+)$", key):
        s, rest = m.groups()
        if rest not in _SEM_STAGE_RENAMES and not _SEM_STAGE_SAME.match(rest):
            raise KeyError(key)
        return f"kernel_head.stages.{s}.{_SEM_STAGE_RENAMES.get(rest, rest)}"
    if m := re.match(r"^auxiliary_head\.convs\.(\d+)\.(conv|bn)\.(\w+)$", key):
        i, kind, p = m.groups()
        return f"auxiliary_head.convs.{i}.{p if kind == 'conv' else 'norm.' + p}"
    if key.startswith("auxiliary_head.conv_seg."):
        return key
    raise KeyError(key)


SEM_SPOT_CHECKS = [
    ("backbone.stem.0.weight", "backbone.stem.conv1.weight"),
    ("backbone.stem.1.running_var", "backbone.stem.conv1.norm.running_var"),
    ("backbone.stem.3.weight", "backbone.stem.conv2.weight"),
    ("backbone.stem.4.bias", "backbone.stem.conv2.norm.bias"),
    ("backbone.stem.6.weight", "backbone.stem.conv3.weight"),
    ("backbone.stem.7.weight", "backbone.stem.conv3.norm.weight"),
    ("backbone.layer1.0.downsample.0.weight", "backbone.res2.0.shortcut.weight"),
    ("backbone.layer3.5.bn2.running_mean", "backbone.res4.5.conv2.norm.running_mean"),
    ("backbone.layer4.2.conv3.weight", "backbone.res5.2.conv3.weight"),
    (f"{GEN}.conv_seg.weight", "kernel_head.conv_seg.weight"),
    (f"{GEN}.conv_seg.bias", "kernel_head.conv_seg.bias"),
    (
        "decode_head.kernel_update_head.0.attention.attn.in_proj_weight",
        "kernel_head.stages.0.attention.in_proj_weight",
    ),
    (
        "decode_head.kernel_update_head.2.feat_transform.conv.bias",
        "kernel_head.stages.2.feat_transform.bias",
    ),
    ("decode_head.kernel_update_head.1.ffn.layers.1.weight", "kernel_head.stages.1.ffn.3.weight"),
    (
        "decode_head.kernel_update_head.1.kernel_update_conv.dynamic_layer.weight",
        "kernel_head.stages.1.kernel_update_conv.dynamic_layer.weight",
    ),
    ("decode_head.kernel_update_head.2.mask_fcs.1.bias", "kernel_head.stages.2.mask_fcs.1.bias"),
    ("auxiliary_head.convs.0.conv.weight", "auxiliary_head.convs.0.weight"),
    ("auxiliary_head.convs.0.bn.running_mean", "auxiliary_head.convs.0.norm.running_mean"),
    ("auxiliary_head.conv_seg.bias", "auxiliary_head.conv_seg.bias"),
]
SEM_HEAD_SPOT_CHECKS = {
    "upernet": [
        (f"{GEN}.psp_modules.3.1.conv.weight", "pixel_decoder.psp_modules.3.1.weight"),
        (f"{GEN}.bottleneck.bn.bias", "pixel_decoder.bottleneck.norm.bias"),
        (f"{GEN}.lateral_convs.2.conv.weight", "pixel_decoder.lateral_convs.2.weight"),
        (f"{GEN}.fpn_convs.0.bn.running_var", "pixel_decoder.fpn_convs.0.norm.running_var"),
        (f"{GEN}.fpn_bottleneck.conv.weight", "pixel_decoder.fpn_bottleneck.weight"),
    ],
    "fcn": [
        (f"{GEN}.convs.0.conv.weight", "pixel_decoder.convs.0.weight"),
        (f"{GEN}.convs.1.bn.weight", "pixel_decoder.convs.1.norm.weight"),
        (f"{GEN}.conv_cat.conv.weight", "pixel_decoder.conv_cat.weight"),
    ],
    "psp": [
        (
            f"{GEN}.psp_modules.0.1.bn.running_mean",
            "pixel_decoder.psp_modules.0.1.norm.running_mean",
        ),
        (f"{GEN}.bottleneck.conv.weight", "pixel_decoder.bottleneck.weight"),
    ],
    "aspp": [
        (f"{GEN}.image_pool.1.conv.weight", "pixel_decoder.image_pool.1.weight"),
        (f"{GEN}.aspp_modules.0.conv.weight", "pixel_decoder.aspp_modules.0.weight"),
        (f"{GEN}.aspp_modules.3.bn.bias", "pixel_decoder.aspp_modules.3.norm.bias"),
        (f"{GEN}.bottleneck.bn.weight", "pixel_decoder.bottleneck.norm.weight"),
    ],
}
SEM_DECODER_CONVS = {"upernet": 12, "fcn": 3, "psp": 5, "aspp": 6}  # ConvModules per head


@pytest.fixture(scope="module")
def mmseg() -> Dict[str, Dict[str, torch.Tensor]]:
    """Full-size (lazy) synthetic MMSeg K-Net state dicts, one per decode head."""
    return {head: make_mmseg_state_dict(head) for head in SEM_CHANNELS}


@pytest.mark.parametrize("head", list(SEM_CHANNELS))
def test_mmseg_generator_matches_spec(mmseg, head):
    sd = mmseg[head]
    c = SEM_CHANNELS[head]
    for s in range(3):
        stage = {
            k: v for k, v in sd.items() if k.startswith(f"decode_head.kernel_update_head.{s}.")
        }
        assert len(stage) == 39
    p = "decode_head.kernel_update_head.0."
    assert sd[p + "attention.attn.in_proj_weight"].shape == (3 * c, c)
    assert sd[p + "feat_transform.conv.weight"].shape == (c, c, 1, 1)
    assert sd[p + "ffn.layers.0.0.weight"].shape == (2048, c)
    assert sd[p + "kernel_update_conv.dynamic_layer.weight"].shape == (512, 256)
    assert sd[p + "kernel_update_conv.fc_layer.weight"].shape == (256, 256)
    assert sd[f"{GEN}.conv_seg.weight"].shape == (150, c, 1, 1)
    assert sd["auxiliary_head.convs.0.conv.weight"].shape == (256, 1024, 3, 3)
    generate = {k for k in sd if k.startswith(GEN + ".") and ".conv_seg." not in k}
    assert len(generate) == 6 * SEM_DECODER_CONVS[head]  # conv.weight + 5 BN entries each
    # ResNetV1c-50 = torchvision ResNet-50 with the 7x7 stem conv replaced by 3 3x3 convs
    with torch.device("meta"):
        tv = torchvision.models.resnet50()
    expected = {f"backbone.{k}": tuple(v.shape) for k, v in tv.state_dict().items()}
    expected = {k: v for k, v in expected.items() if ".layer" in k}
    got = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("backbone.layer")}
    assert got == expected
    assert sum(k.startswith("backbone.stem.") for k in sd) == 3 + 3 * 5


@pytest.mark.parametrize("head", list(SEM_CHANNELS))
def test_mmseg_conversion_maps_every_key(mmseg, head):
    sd = mmseg[head]
    expected = {expected_semantic_key(k): k for k in sd}
    assert len(expected) == len(sd)
    # every key, num_batches_tracked included when the model has those buffers
    out = convert_official_knet_state_dict(sd, target_keys=expected)
    assert set(out) == set(expected)
    for new, old in expected.items():
        assert out[new] is sd[old], (old, new)
    for old, new in SEM_SPOT_CHECKS + SEM_HEAD_SPOT_CHECKS[head]:
        assert out[new] is sd[old], (old, new)
    assert not any("bottom_up" in k or "fc_cls" in k or "cls_fcs" in k for k in out)
    # without target keys the BN buffers are dropped (FrozenBN has none), nothing else
    out = convert_official_knet_state_dict({"meta": {}, "state_dict": sd})
    assert set(out) == {k for k in expected if not k.endswith("num_batches_tracked")}
    assert all(tuple(out[k].shape) == tuple(sd[expected[k]].shape) for k in out)


@pytest.mark.parametrize("head", list(SEM_CHANNELS))
def test_mmseg_head_type_and_options(mmseg, head):
    info = describe_official_knet_state_dict(mmseg[head])
    c = SEM_CHANNELS[head]
    assert info.is_semantic and info.head_type == head
    assert (info.depth, info.deep_stem, info.num_stages, info.num_classes) == (50, True, 3, 150)
    assert (info.channels, info.updator_channels, info.ffn_channels) == (c, 256, 2048)
    assert (info.num_cls_fcs, info.num_mask_fcs) == (0, 1)
    assert (info.aux_in_channels, info.aux_in_feature, info.aux_channels) == (1024, "res4", 256)
    assert head in info.summary() and SEM_DECODERS[head] in info.summary()
    assert ("-D8" in info.summary()) == (head != "upernet")

    opts = info.detectron2_options()
    pairs = dict(zip(opts[::2], opts[1::2]))
    assert pairs["MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME"] == SEM_DECODERS[head]
    assert pairs["MODEL.SEM_SEG_HEAD.CONVS_DIM"] == pairs["MODEL.KNET.HIDDEN_DIM"] == str(c)
    assert pairs["MODEL.SEM_SEG_HEAD.NUM_CLASSES"] == "150"
    assert pairs["MODEL.KNET.UPDATOR_DIM"] == "256"
    cfg = get_knet_cfg(opts=opts)  # every option is a valid key with a valid value
    r = cfg.MODEL.RESNETS
    assert (cfg.MODEL.BACKBONE.NAME, r.STEM_TYPE, r.STRIDE_IN_1X1) == (
        "build_knet_resnet_backbone", "deeplab", False
    )  # fmt: skip
    assert (r.RES4_DILATION, r.RES5_DILATION) == ((1, 1) if head == "upernet" else (2, 4))
    assert cfg.MODEL.KNET.AUX_HEAD.LOSS_WEIGHT > 0 and cfg.MODEL.KNET.AUX_HEAD.IN_FEATURE == "res4"
    if head == "fcn":
        assert (cfg.MODEL.KNET.DECODE_HEAD.NUM_CONVS, cfg.MODEL.KNET.DECODE_HEAD.CONCAT_INPUT) == (
            2, True
        )  # fmt: skip
    in_features = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
    assert in_features == (ALL_RES if head == "upernet" else ["res5"])
    assert set(r.OUT_FEATURES) == set(in_features) | {"res4"}


@pytest.mark.parametrize("head", ["upernet", "aspp"])
def test_mmseg_backbone_keys_match_the_semantic_backbone(mmseg, head):
    """With the reported options, the converted ``backbone.*`` keys are the model's exactly."""
    info = describe_official_knet_state_dict(mmseg[head])
    cfg = get_knet_cfg(opts=info.detectron2_options() + ["MODEL.RESNETS.NORM", "BN"])
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_knet_resnet_backbone(cfg, ShapeSpec(channels=3))
    reference = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    converted = convert_official_knet_state_dict(mmseg[head], target_keys=reference.keys())
    converted = {k: v for k, v in converted.items() if k.startswith("backbone.")}
    diff = compare_state_dicts(converted, reference)
    assert diff.ok, diff.format()
    strides = {k: v.stride for k, v in backbone.output_shape().items()}
    assert strides["res5"] == (32 if head == "upernet" else 8)


@pytest.mark.parametrize("head", list(SEM_CHANNELS))
def test_mmseg_decode_heads_match_converted_keys(mmseg, head):
    """The decode and auxiliary heads built with the reported options take the converted keys."""
    decode_heads = pytest.importorskip("knet.modeling.pixel_decoder.decode_heads")
    from knet.modeling.pixel_decoder import build_pixel_decoder

    info = describe_official_knet_state_dict(mmseg[head])
    cfg = get_knet_cfg(opts=info.detectron2_options() + ["MODEL.SEM_SEG_HEAD.NORM", "BN"])
    res2 = 256
    shapes = {f: ShapeSpec(channels=res2 * 2**i, stride=4) for i, f in enumerate(ALL_RES)}
    with torch.device("meta"):  # keys and shapes only
        decoder = build_pixel_decoder(cfg, shapes)
        aux = decode_heads.build_auxiliary_head(cfg, shapes)
    reference = {f"pixel_decoder.{k}": v for k, v in decoder.state_dict().items()}
    reference.update({f"auxiliary_head.{k}": v for k, v in aux.state_dict().items()})
    converted = convert_official_knet_state_dict(mmseg[head], target_keys=reference.keys())
    converted = {k: v for k, v in converted.items() if k.startswith(("pixel_", "auxiliary_"))}
    diff = compare_state_dicts(converted, reference)
    assert diff.ok, diff.format()


def test_mmseg_unknown_keys_raise_and_name_them(mmseg):
    bad = dict(mmseg["upernet"])
    extra = [
        f"{GEN}.extra_convs.0.conv.weight",
        "decode_head.kernel_update_head.1.fc_cls.weight",  # instance/panoptic only
        "decode_head.conv_seg.weight",
        "auxiliary_head.conv_cat.conv.weight",
        "backbone.conv1.weight",  # a 7x7 stem next to the deep stem
        "roi_head.mask_head.0.fc_mask.weight",
    ]
    for key in extra:
        bad[key] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as err:
        convert_official_knet_state_dict(bad)
    assert all(key in str(err.value) for key in extra), str(err.value)
    assert "upernet" in str(err.value)
    bad = dict(mmseg["psp"])
    bad[f"{GEN}.psp_modules.4.1.conv.weight"] = torch.zeros(1)  # a fifth pool scale
    with pytest.raises(CheckpointKeyError, match=r"psp_modules\.4\.1\.conv\.weight"):
        convert_official_knet_state_dict(bad)


@pytest.mark.parametrize(
    "head,key",
    [
        ("upernet", f"{GEN}.fpn_bottleneck.bn.running_var"),
        ("upernet", f"{GEN}.lateral_convs.2.conv.weight"),
        ("upernet", f"{GEN}.psp_modules.0.1.bn.weight"),
        ("fcn", f"{GEN}.conv_cat.conv.weight"),
        ("fcn", f"{GEN}.convs.1.bn.bias"),
        ("psp", f"{GEN}.bottleneck.conv.weight"),
        ("aspp", f"{GEN}.aspp_modules.2.bn.running_mean"),
        ("aspp", f"{GEN}.image_pool.1.conv.weight"),
        ("aspp", f"{GEN}.conv_seg.bias"),
        ("fcn", "decode_head.kernel_update_head.2.kernel_update_conv.fc_norm.bias"),
        ("psp", "decode_head.kernel_update_head.0.ffn.layers.1.bias"),
        ("upernet", "auxiliary_head.conv_seg.bias"),
        ("upernet", "auxiliary_head.convs.0.bn.weight"),
        ("aspp", "backbone.stem.4.running_mean"),
        ("fcn", "backbone.layer4.2.bn3.weight"),
    ],
)
def test_mmseg_missing_key_raises_and_names_it(mmseg, head, key):
    bad = dict(mmseg[head])
    del bad[key]
    with pytest.raises(CheckpointKeyError) as err:
        convert_official_knet_state_dict(bad)
    assert key in str(err.value)


def test_mmseg_missing_bn_buffer_is_fine(mmseg):
    sd = dict(mmseg["aspp"])
    key = f"{GEN}.aspp_modules.1.bn.num_batches_tracked"
    del sd[key]
    targets = [expected_semantic_key(k) for k in mmseg["aspp"]]
    out = convert_official_knet_state_dict(sd, target_keys=targets)
    assert set(out) == set(targets) - {expected_semantic_key(key)}


def test_mmseg_variants():
    # no auxiliary head
    sd = make_mmseg_state_dict("fcn", aux_channels=None)
    info = describe_official_knet_state_dict(sd)
    assert info.aux_in_channels == 0 and "no auxiliary head" in info.summary()
    opts = info.detectron2_options()
    assert opts[opts.index("MODEL.KNET.AUX_HEAD.LOSS_WEIGHT") + 1] == "0.0"
    assert not any(k.startswith("auxiliary_head.") for k in convert_official_knet_state_dict(sd))
    # FCN without concat_input, two stages
    sd = make_mmseg_state_dict("fcn", num_stages=2)
    sd = {k: v for k, v in sd.items() if ".conv_cat." not in k}
    sd = {k: v for k, v in sd.items() if not k.startswith("decode_head.kernel_update_head.2.")}
    info = describe_official_knet_state_dict(sd)
    assert (info.fcn_num_convs, info.fcn_concat_input, info.num_stages) == (2, False, 2)
    opts = info.detectron2_options()
    assert opts[opts.index("MODEL.KNET.DECODE_HEAD.CONCAT_INPUT") + 1] == "False"
    assert len(convert_official_knet_state_dict(sd)) > 0


def test_mmseg_unsupported_variants(mmseg):
    sd = {k: v for k, v in mmseg["upernet"].items() if not k.startswith("backbone.")}
    sd["backbone.patch_embed.projection.weight"] = torch.zeros(96, 3, 4, 4)
    with pytest.raises(UnsupportedCheckpointError, match="Swin"):
        convert_official_knet_state_dict(sd)
    # DepthwiseSeparableASPPHead (DeepLabV3+) is not one of the K-Net heads
    sd = {k: v for k, v in mmseg["fcn"].items() if not k.startswith(f"{GEN}.conv")}
    sd[f"{GEN}.c1_bottleneck.conv.weight"] = torch.zeros(48, 256, 1, 1)
    sd[f"{GEN}.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    with pytest.raises(UnsupportedCheckpointError, match="c1_bottleneck"):
        convert_official_knet_state_dict(sd)
    # a plain MMSeg segmentor (no K-Net heads)
    plain = {k: v for k, v in mmseg["fcn"].items() if not k.startswith("decode_head.")}
    plain["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    with pytest.raises(CheckpointKeyError, match="kernel_generate_head"):
        convert_official_knet_state_dict(plain)


def test_official_cli_semantic_small_file(tmp_path, capsys):
    cli = _import_tool("convert_official_knet")
    sd = make_mmseg_state_dict(
        "upernet",
        num_classes=5,
        channels=32,
        updator_channels=16,
        ffn_channels=64,
        base_width=8,
        aux_channels=16,
        lazy=False,
    )
    src, dst = tmp_path / "mmseg.pth", tmp_path / "converted.pth"
    torch.save({"meta": {"CLASSES": ("a", "b", "c", "d", "e")}, "state_dict": sd}, src)
    assert cli.main([str(src), str(dst)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "semantic, ResNetV1c-50, upernet decode head (KNetUPerHead)" in out
    assert "5 classes, 32 channels (kernel updator 16)" in out
    assert "auxiliary FCN head 128 -> 16 on res4" in out
    assert "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME KNetUPerHead" in out
    saved = load_checkpoint_file(str(dst))
    assert "MMSegmentation" in saved["__author__"]
    expected = convert_official_knet_state_dict(sd)
    assert set(saved["model"]) == set(expected)
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
    sd[f"{GEN}.fpn_convs.3.conv.weight"] = torch.zeros(1)
    torch.save(sd, src)
    assert cli.main([str(src), str(tmp_path / "bad.pth")]) == 2
    assert "fpn_convs.3.conv.weight" in capsys.readouterr().err


# ---------------------------------------------------------------- ResNetV1c ImageNet weights
def _v1c_cfg(depth: int, norm: str = "BN", res4_dilation: int = 1, res5_dilation: int = 1):
    opts = [
        "MODEL.RESNETS.DEPTH", str(depth),
        "MODEL.RESNETS.NORM", norm,
        "MODEL.RESNETS.STEM_TYPE", "deeplab",
        "MODEL.RESNETS.STRIDE_IN_1X1", "False",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64" if depth < 50 else "256",
        "MODEL.RESNETS.RES4_DILATION", str(res4_dilation),
        "MODEL.RESNETS.RES5_DILATION", str(res5_dilation),
        "MODEL.RESNETS.OUT_FEATURES", str(ALL_RES),
        "MODEL.BACKBONE.FREEZE_AT", "0",
    ]  # fmt: skip
    return get_knet_cfg(opts=opts)


def make_v1c_imagenet_state_dict(depth: int = 50, lazy: bool = True) -> Dict[str, torch.Tensor]:
    """An MMCV ImageNet ResNetV1c checkpoint: deep stem, layer1-4 and the classifier."""
    w = _Writer(depth, lazy)
    out = write_resnet_v1c(w, "", depth)
    w.add("fc.weight", 1000, out[-1])
    w.add("fc.bias", 1000)
    return w.sd


@pytest.mark.parametrize("depth,norm", [(50, "BN"), (50, "FrozenBN"), (18, "BN")])
def test_v1c_imagenet_keys_match_the_semantic_backbone(depth, norm):
    backbone = build_knet_resnet_backbone(_v1c_cfg(depth, norm), ShapeSpec(channels=3))
    sd = make_v1c_imagenet_state_dict(depth)
    for prefix, wrap in (("", ""), ("backbone.", "backbone."), (None, "backbone.bottom_up.")):
        reference = {wrap + k: v for k, v in backbone.state_dict().items()}
        kwargs = {} if prefix is None else {"prefix": prefix}
        converted = convert_torchvision_resnet_state_dict(
            {"state_dict": sd}, target_keys=reference.keys(), **kwargs
        )
        assert set(converted) == set(reference)  # no missing, no unexpected key
        diff = compare_state_dicts(converted, reference)
        assert diff.ok, diff.format()
    assert converted["backbone.bottom_up.stem.conv3.weight"] is sd["stem.6.weight"]
    assert ("stem.conv1.norm.num_batches_tracked" in backbone.state_dict()) == (norm == "BN")


def test_v1c_imagenet_conversion_is_strict():
    sd = make_v1c_imagenet_state_dict(50)
    del sd["stem.7.running_var"]
    sd["stem.2.weight"] = torch.zeros(1)  # ReLU: no parameters
    with pytest.raises(CheckpointKeyError) as err:
        convert_torchvision_resnet_state_dict(sd)
    assert "stem.7.running_var" in str(err.value) and "stem.2.weight" in str(err.value)


class _TorchvisionV1c(nn.Module):
    """torchvision ResNet with MMCV's ResNetV1c deep stem: an independent reference."""

    def __init__(self, depth: int, dilate: bool):
        super().__init__()
        torch.manual_seed(depth)
        self.net = getattr(torchvision.models, f"resnet{depth}")(
            weights=None, replace_stride_with_dilation=[False, dilate, dilate]
        )
        del self.net.conv1, self.net.bn1, self.net.fc

        def conv_bn_relu(cin: int, cout: int, stride: int) -> List[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.stem = nn.Sequential(
            *conv_bn_relu(3, 32, 2), *conv_bn_relu(32, 32, 1), *conv_bn_relu(32, 64, 1)
        )
        for m in self.modules():  # non-trivial BN statistics and affine parameters
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def state_dict_v1c(self) -> Dict[str, torch.Tensor]:
        sd = {f"stem.{k}": v for k, v in self.stem.state_dict().items()}
        sd.update({k: v for k, v in self.net.state_dict().items()})
        return sd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.maxpool(self.stem(x))
        return self.net.layer4(self.net.layer3(self.net.layer2(self.net.layer1(x))))


@pytest.mark.parametrize("dilate", [False, True], ids=["R50", "R50-D8"])
def test_v1c_weights_reproduce_the_reference(dilate):
    """torchvision's ``replace_stride_with_dilation`` also gives the first block of a dilated
    stage the previous dilation, i.e. MMSeg's ``contract_dilation``: same numbers expected."""
    reference = _TorchvisionV1c(50, dilate).eval()
    sd = reference.state_dict_v1c()
    assert {k.split(".")[0] for k in sd} == {"stem", "layer1", "layer2", "layer3", "layer4"}
    cfg = _v1c_cfg(50, "BN", *((2, 4) if dilate else (1, 1)))
    backbone = build_knet_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    converted = convert_torchvision_resnet_state_dict(sd, prefix="")
    incompatible = backbone.load_state_dict(converted, strict=False)
    assert not incompatible.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in incompatible.missing_keys)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        expected = reference(x)
        got = backbone(x)["res5"]
    assert got.shape == expected.shape == (1, 2048, *((6, 8) if dilate else (2, 2)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_torchvision_cli_v1c_no_fpn(tmp_path):
    cli = _import_tool("convert_torchvision_resnet")
    sd = make_v1c_imagenet_state_dict(18, lazy=False)
    src, dst = tmp_path / "resnet18_v1c.pth", tmp_path / "R-18-V1c.pth"
    torch.save({"meta": {}, "state_dict": sd}, src)
    assert cli.main([str(src), str(dst), "--no-fpn"]) == 0
    saved = torch.load(dst, map_location="cpu", weights_only=True)
    assert "V1c" in saved["__author__"]
    backbone = build_knet_resnet_backbone(_v1c_cfg(18, "FrozenBN"), ShapeSpec(channels=3))
    assert set(saved["model"]) == {f"backbone.{k}" for k in backbone.state_dict()}
    assert torch.equal(saved["model"]["backbone.stem.conv2.weight"], sd["stem.3.weight"])
    with pytest.raises(SystemExit):  # --prefix and --no-fpn exclude each other
        cli.main([str(src), str(dst), "--no-fpn", "--prefix", "x."])
