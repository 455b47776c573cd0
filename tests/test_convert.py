"""Checkpoint conversion: released K-Net weights (MMDetection, MMSeg) and ImageNet backbones.

The released files are not downloaded here: ``references.layouts`` writes synthetic ones with
the keys and shapes of each official layout, independently of the converter. The conversion is
checked against the model built from the matching config (every key and shape, both ways) and
against mappings restated here from the published layouts (``SPOT_CHECKS``,
``expected_semantic_key``).
"""

import datetime
import pickle
import re

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone
from references.layouts import (
    GEN,
    Writer,
    head_opts,
    make_mmseg_state_dict,
    make_official_state_dict,
    resnet_opts,
    write_resnet,
)
from scripts import REPO, load_script
from torch import nn

from knet.checkpoint import KNetCheckpointer
from knet.conversion import (
    CheckpointKeyError,
    UnsupportedCheckpointError,
    check_coco_class_names,
    convert_official_knet_state_dict,
    convert_pretrained_backbone,
    describe_backbone,
    describe_official_knet_state_dict,
    load_checkpoint_file,
    model_state_shapes,
    save_detectron2_checkpoint,
)
from knet.engine import get_knet_cfg
from knet.modeling.backbone.resnet import build_knet_resnet_backbone

CONFIGS = {
    "panoptic": "configs/coco/panoptic-segmentation/knet_R50_bs16_1x.yaml",
    "instance": "configs/coco/instance-segmentation/knet_R50_bs16_1x.yaml",
}
SEM_CONFIGS = {
    "upernet": "configs/ade20k/semantic-segmentation/knet_s3_upernet_R50_bs16_80k.yaml",
    "fcn": "configs/ade20k/semantic-segmentation/knet_s3_fcn_R50_D8_bs16_80k.yaml",
    "psp": "configs/ade20k/semantic-segmentation/knet_s3_pspnet_R50_D8_bs16_80k.yaml",
    "aspp": "configs/ade20k/semantic-segmentation/knet_s3_deeplabv3_R50_D8_bs16_80k.yaml",
}
NUM_CLASSES = {"panoptic": 133, "instance": 80}
COCO_THINGS = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
COCO_STUFF = [c["name"] for c in COCO_CATEGORIES if not c["isthing"]]
# a narrow official R-50 K-Net (1/8 backbone width, 32-d kernels) and its config overrides
SMALL = dict(channels=32, ffn_channels=64, num_proposals=8, base_width=8)
SMALL_OPTS = resnet_opts(8) + head_opts(32, 64, 8)


def coco_classes(task: str) -> list[str]:
    return COCO_THINGS + (COCO_STUFF if task == "panoptic" else [])


def shapes_of(config: str, opts=()) -> dict[str, tuple]:
    return model_state_shapes(get_knet_cfg(str(REPO / config), opts))


@pytest.fixture(scope="module")
def official() -> dict[str, dict[str, torch.Tensor]]:
    """Full-size synthetic official R50 state dicts, one per task."""
    return {task: make_official_state_dict(num_classes=n) for task, n in NUM_CLASSES.items()}


@pytest.fixture(scope="module")
def coco_shapes() -> dict[str, dict[str, tuple]]:
    return {task: shapes_of(config) for task, config in CONFIGS.items()}


# Explicit pairs (official key, our key) of the released R-50 checkpoints (ZwwWayne/K-Net).
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
def test_generator_matches_published_totals(official, task, expected_mparams):
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
    sd = make_official_state_dict(f"R-{depth}", lazy=True)
    got = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("backbone.")}
    assert got == expected


# ------------------------------------------------------------------------- official K-Net
@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_conversion_maps_every_key(official, coco_shapes, task):
    sd = official[task]
    out = convert_official_knet_state_dict(sd, coco_shapes[task])
    num_tracked = sum(k.endswith("num_batches_tracked") for k in sd)
    assert num_tracked == 53  # one per BN of ResNet-50; the model's FrozenBN has none
    assert len(out) == len(sd) - num_tracked == len(coco_shapes[task])
    for old, new in SPOT_CHECKS:
        assert out[new] is sd[old], (old, new)
    # every input tensor (except the dropped buffers) ends up under exactly one new key
    assert {id(v) for v in out.values()} == {
        id(v) for k, v in sd.items() if not k.endswith("num_batches_tracked")
    }


@pytest.mark.slow
@pytest.mark.parametrize("task,suffix", [("panoptic", ".pth"), ("instance", ".pkl")])
def test_converted_weights_load_into_model(official, task, suffix, tmp_path):
    sd = official[task]
    model = build_model(get_knet_cfg(str(REPO / CONFIGS[task]), ["MODEL.DEVICE", "cpu"])).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == model_state_shapes(get_knet_cfg(str(REPO / CONFIGS[task])))
    converted = convert_official_knet_state_dict(
        {"meta": {"CLASSES": coco_classes(task)}, "state_dict": sd}, shapes
    )
    path = str(tmp_path / f"knet{suffix}")
    save_detectron2_checkpoint(converted, path, author="test")
    if suffix == ".pth":  # loadable with torch.load's safe default (torch >= 2.6)
        on_disk = torch.load(path, map_location="cpu", weights_only=True)
        assert on_disk["matching_heuristics"] is False and set(on_disk["model"]) == set(converted)

    checkpointer = KNetCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    loaded = model.state_dict()
    for old, new in SPOT_CHECKS:
        torch.testing.assert_close(loaded[new], sd[old], rtol=0, atol=0)
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())


def test_dcn_offsets_map_to_the_deformable_blocks():
    sd = make_official_state_dict("R-101-DCN", num_classes=80, lazy=True)
    assert (
        describe_backbone({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")})[0]
        == "R-101-DCN"
    )
    config = "configs/coco/instance-segmentation/knet_R101_DCN_bs16_ms3x.yaml"
    out = convert_official_knet_state_dict(sd, shapes_of(config))
    key = "backbone.bottom_up.res3.0.conv2_offset.weight"
    assert out[key] is sd["backbone.layer2.0.conv2.conv_offset.weight"]
    assert out[key].shape == (18, 128, 3, 3)
    assert sum(k.endswith("conv2_offset.weight") for k in out) == 4 + 23 + 3
    # the same weights without DCN do not fit the DCN config: the offsets are missing
    plain = {k: v for k, v in sd.items() if "conv_offset" not in k}
    with pytest.raises(
        CheckpointKeyError,
        match=r"lacks, 60 key\(s\):\n  backbone\.bottom_up\.res3\.0\.conv2_offset\.bias",
    ):
        convert_official_knet_state_dict(plain, shapes_of(config))


def test_whole_checkpoint_and_meta_are_accepted(official):
    info = describe_official_knet_state_dict(
        {"meta": {"CLASSES": coco_classes("panoptic")}, "state_dict": official["panoptic"]}
    )
    assert info.classes == tuple(coco_classes("panoptic"))
    assert info.architecture == ("panoptic", "R-50", "", 256)
    assert (info.num_classes, info.num_stages) == (133, 3)
    assert check_coco_class_names(info.classes) == []
    swapped = coco_classes("panoptic")
    swapped[80], swapped[81] = swapped[81], swapped[80]
    assert len(check_coco_class_names(swapped)) == 2
    assert "classes" in check_coco_class_names(["a", "b"])[0]


def test_unknown_key_raises_and_names_it(official, coco_shapes):
    bad = dict(official["panoptic"])
    bad["roi_head.mask_head.1.attention.attn.extra_proj.weight"] = torch.zeros(3)
    bad["backbone.layer2.0.conv4.weight"] = torch.zeros(3)
    bad["head.weight"] = torch.zeros(3)  # under no known section
    with pytest.raises(CheckpointKeyError) as err:
        convert_official_knet_state_dict(bad, coco_shapes["panoptic"])
    for key in ("roi_head.mask_head.1.attention.attn.extra_proj.weight", "layer2.0.conv4.weight"):
        assert key in str(err.value)
    assert "head.weight" in str(err.value)


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
def test_missing_key_raises(official, coco_shapes, key):
    bad = dict(official["instance"])
    del bad[key]
    with pytest.raises(CheckpointKeyError, match="model keys the checkpoint lacks"):
        convert_official_knet_state_dict(bad, coco_shapes["instance"])


def test_shape_mismatch_raises_and_names_it(official, coco_shapes):
    with pytest.raises(CheckpointKeyError) as err:  # 133 classes into the 80-class model
        convert_official_knet_state_dict(official["panoptic"], coco_shapes["instance"])
    msg = str(err.value)
    assert "shape mismatches" in msg
    assert "kernel_head.stages.2.fc_cls.weight: converted (133, 256) vs model (80, 256)" in msg


def test_num_batches_tracked_kept_where_the_model_has_it(official, coco_shapes):
    sd = dict(official["instance"])
    shapes = dict(coco_shapes["instance"])
    wanted = "backbone.bottom_up.res2.1.conv1.norm.num_batches_tracked"
    shapes[wanted] = ()
    out = convert_official_knet_state_dict(sd, shapes)
    assert out[wanted] is sd["backbone.layer1.1.bn1.num_batches_tracked"]
    assert sum(k.endswith("num_batches_tracked") for k in out) == 1
    del sd["backbone.layer1.1.bn1.num_batches_tracked"]  # optional even then
    assert wanted not in convert_official_knet_state_dict(sd, shapes)


def test_error_message_is_truncated(official, coco_shapes):
    bad = dict(official["instance"])
    for i in range(30):
        bad[f"rpn_head.unknown_{i:02d}.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as err:
        convert_official_knet_state_dict(bad, coco_shapes["instance"])
    msg = str(err.value)
    assert "30 key(s)" in msg and "and 10 more" in msg
    assert "rpn_head.unknown_00.weight" in msg and "rpn_head.unknown_29.weight" not in msg


def test_stage_count_is_read_from_the_keys():
    sd = make_official_state_dict(num_stages=2, **SMALL)
    info = describe_official_knet_state_dict(sd)
    assert (info.num_stages, info.channels, info.backbone) == (2, 32, "R-50")
    shapes = shapes_of(
        CONFIGS["panoptic"],
        SMALL_OPTS + ["MODEL.KNET.NUM_STAGES", "2", "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0, 1.0]"],
    )
    out = convert_official_knet_state_dict(sd, shapes)
    assert {k.split(".")[2] for k in out if k.startswith("kernel_head.stages.")} == {"0", "1"}
    with pytest.raises(CheckpointKeyError, match=r"kernel_head\.stages\.2\."):
        convert_official_knet_state_dict(sd, shapes_of(CONFIGS["panoptic"], SMALL_OPTS))


def test_unrecognised_checkpoints_raise_clearly(official):
    odd = {k: v for k, v in official["panoptic"].items() if not k.startswith("backbone.layer4.2")}
    with pytest.raises(UnsupportedCheckpointError, match=r"blocks per stage \(3, 4, 6, 2\)"):
        describe_official_knet_state_dict(odd)
    no_heads = {k: v for k, v in official["panoptic"].items() if k.startswith("backbone.")}
    with pytest.raises(CheckpointKeyError, match="not a K-Net checkpoint"):
        describe_official_knet_state_dict(no_heads)
    with pytest.raises(CheckpointKeyError, match="not tensors"):
        describe_official_knet_state_dict({"state_dict": {"a": 1}})


def test_checkpoint_files_are_loaded_safely_by_default(tmp_path):
    path = str(tmp_path / "with_objects.pth")
    torch.save({"meta": {"time": datetime.date(2021, 10, 16)}, "state_dict": {}}, path)
    with pytest.raises(pickle.UnpicklingError, match="allow-pickle"):
        load_checkpoint_file(path)
    assert load_checkpoint_file(path, allow_pickle=True)["meta"]["time"].year == 2021


# --------------------------------------------------------------------- ImageNet backbones
def _resnet_cfg(depth: int, stride_in_1x1: bool = False):
    opts = [
        "MODEL.RESNETS.DEPTH", str(depth),
        "MODEL.RESNETS.STRIDE_IN_1X1", str(stride_in_1x1),
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64" if depth < 50 else "256",
        "MODEL.RESNETS.OUT_FEATURES", "['res5']",
    ]  # fmt: skip
    return get_knet_cfg(opts=opts)


def _randomize_bn(net: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _torchvision_res5(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.parametrize("depth", [18, pytest.param(50, marks=pytest.mark.slow)])
def test_torchvision_resnet_matches_detectron2_backbone(depth):
    torch.manual_seed(depth)
    net = _randomize_bn(getattr(torchvision.models, f"resnet{depth}")(weights=None))
    converted, name = convert_pretrained_backbone(net.state_dict())
    assert name == f"R-{depth}"
    assert not any(k.startswith("fc.") for k in converted)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = _torchvision_res5(net, x)
    results = {}
    for stride_in_1x1 in (False, True):
        body = build_resnet_backbone(_resnet_cfg(depth, stride_in_1x1), ShapeSpec(channels=3))
        body.load_state_dict(converted, strict=False)  # FrozenBN has no batch counter
        with torch.no_grad():
            results[stride_in_1x1] = body.eval()(x)["res5"]
    torch.testing.assert_close(results[False], expected, rtol=1e-4, atol=1e-4)
    if depth >= 50:  # the stride convention matters for bottleneck blocks only
        assert (results[True] - expected).abs().max() > 1e-2


def imagenet_resnet(depth: int, deep_stem: bool = False, lazy: bool = True):
    """An ImageNet ResNet checkpoint (torchvision or MMCV ResNetV1c): backbone + classifier."""
    w = Writer(depth, lazy)
    out = write_resnet(w, "", depth, deep_stem=deep_stem)
    w.add("fc.weight", 1000, out[-1])
    w.add("fc.bias", 1000)
    return w.sd


@pytest.mark.slow
def test_r101_imagenet_weights_fit_the_dcn_config(tmp_path):
    """torchvision's R-101 initialises R-101-DCN: everything but the (zero) offset convs;
    Detectron2 loads the prefix-free file into the FPN model by suffix matching."""
    config = "configs/coco/instance-segmentation/knet_R101_DCN_bs16_ms3x.yaml"
    sd = imagenet_resnet(101)
    converted, name = convert_pretrained_backbone(sd, shapes_of(config))
    assert name == "R-101" and "res4.22.conv3.norm.running_var" in converted
    sd["layer1.0.conv4.weight"] = torch.zeros(1)
    sd["layer4.2.conv3.weight"] = torch.zeros(2048, 512, 3, 3)
    with pytest.raises(CheckpointKeyError) as err:
        convert_pretrained_backbone(sd, shapes_of(config))
    assert "layer1.0.conv4.weight" in str(err.value)
    assert "res5.2.conv3.weight: converted (2048, 512, 3, 3) vs model" in str(err.value)

    small = imagenet_resnet(50, lazy=False)
    path = str(tmp_path / "R-50.pkl")
    save_detectron2_checkpoint(
        convert_pretrained_backbone(small)[0], path, author="test", matching_heuristics=True
    )
    opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]"]
    model = build_model(get_knet_cfg(str(REPO / CONFIGS["instance"]), opts))
    DetectionCheckpointer(model).load(path)
    state = model.state_dict()
    assert torch.equal(
        state["backbone.bottom_up.res4.5.conv2.weight"], small["layer3.5.conv2.weight"]
    )
    assert torch.equal(state["backbone.bottom_up.stem.conv1.weight"], small["conv1.weight"])
    offsets = [v for k, v in state.items() if "conv2_offset" in k]
    assert len(offsets) == 2 * (4 + 6 + 3) and all(not v.any() for v in offsets)


# ---------------------------------------------------------------- semantic (MMSeg) K-Net
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
def mmseg() -> dict[str, dict[str, torch.Tensor]]:
    """Full-size (lazy) synthetic MMSeg K-Net state dicts, one per decode head."""
    return {head: make_mmseg_state_dict(head) for head in SEM_CONFIGS}


@pytest.fixture(scope="module")
def sem_shapes() -> dict[str, dict[str, tuple]]:
    """Model keys with BN batch counters (SyncBN configs)."""
    return {head: shapes_of(config) for head, config in SEM_CONFIGS.items()}


@pytest.mark.parametrize("head", list(SEM_CONFIGS))
def test_mmseg_generator_matches_published_layout(mmseg, head):
    sd = mmseg[head]
    c = 512  # MMSeg's released heads are all 512 wide
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


@pytest.mark.parametrize("head", list(SEM_CONFIGS))
def test_mmseg_conversion_maps_every_key(mmseg, sem_shapes, head):
    sd = mmseg[head]
    expected = {expected_semantic_key(k): k for k in sd}
    assert len(expected) == len(sd)
    # every key, BN batch counters included (the SyncBN model has them)
    out = convert_official_knet_state_dict({"meta": {}, "state_dict": sd}, sem_shapes[head])
    assert set(out) == set(expected) == set(sem_shapes[head])
    for new, old in expected.items():
        assert out[new] is sd[old], (old, new)
    for old, new in SEM_SPOT_CHECKS + SEM_HEAD_SPOT_CHECKS[head]:
        assert out[new] is sd[old], (old, new)


@pytest.mark.parametrize("head", list(SEM_CONFIGS))
def test_mmseg_architecture_is_read_from_the_keys(mmseg, head):
    info = describe_official_knet_state_dict(mmseg[head])
    assert info.architecture == ("semantic", "R-50-V1c", head, 512)
    assert (info.num_stages, info.num_classes) == (3, 150)
    assert head in info.summary()


def test_upernet_256_variant_is_a_separate_config(mmseg):
    """MMSeg's UPerNet checkpoint is 512 wide; the 256-channel config is only an option."""
    narrow = "configs/ade20k/semantic-segmentation/knet_s3_upernet_R50_256ch_bs16_80k.yaml"
    with pytest.raises(CheckpointKeyError, match="shape mismatches"):
        convert_official_knet_state_dict(mmseg["upernet"], shapes_of(narrow))
    sd = make_mmseg_state_dict("upernet", channels=256)
    assert describe_official_knet_state_dict(sd).channels == 256
    assert convert_official_knet_state_dict(sd, shapes_of(narrow))


def test_mmseg_unknown_keys_raise_and_name_them(mmseg, sem_shapes):
    bad = dict(mmseg["upernet"])
    extra = [
        f"{GEN}.extra_convs.0.conv.weight",
        "decode_head.kernel_update_head.1.fc_cls.weight",  # instance/panoptic only
        "decode_head.conv_seg.weight",
        "auxiliary_head.conv_cat.conv.weight",
        "roi_head.mask_head.0.fc_mask.weight",
    ]
    for key in extra:
        bad[key] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as err:
        convert_official_knet_state_dict(bad, sem_shapes["upernet"])
    assert all(key in str(err.value) for key in extra), str(err.value)
    assert "upernet" in str(err.value)
    bad = dict(mmseg["upernet"])
    bad["backbone.conv1.weight"] = torch.zeros(1)  # a 7x7 stem next to the deep stem
    with pytest.raises(CheckpointKeyError, match="'backbone.stem.0.weight' and 'backbone.conv1"):
        convert_official_knet_state_dict(bad, sem_shapes["upernet"])
    bad = dict(mmseg["psp"])
    bad[f"{GEN}.psp_modules.4.1.conv.weight"] = torch.zeros(1)  # a fifth pool scale
    with pytest.raises(CheckpointKeyError, match=r"psp_modules\.4\.1\.conv\.weight"):
        convert_official_knet_state_dict(bad, sem_shapes["psp"])


@pytest.mark.parametrize(
    "head,key",
    [
        ("upernet", f"{GEN}.fpn_bottleneck.bn.running_var"),
        ("upernet", f"{GEN}.lateral_convs.2.conv.weight"),
        ("fcn", f"{GEN}.conv_cat.conv.weight"),
        ("aspp", f"{GEN}.image_pool.1.conv.weight"),
        ("fcn", "decode_head.kernel_update_head.2.kernel_update_conv.fc_norm.bias"),
        ("upernet", "auxiliary_head.conv_seg.bias"),
        ("aspp", "backbone.stem.4.running_mean"),
    ],
)
def test_mmseg_missing_key_raises_and_names_it(mmseg, sem_shapes, head, key):
    bad = dict(mmseg[head])
    del bad[key]
    with pytest.raises(CheckpointKeyError) as err:
        convert_official_knet_state_dict(bad, sem_shapes[head])
    assert expected_semantic_key(key) in str(err.value)


def test_mmseg_missing_bn_counter_is_fine(mmseg, sem_shapes):
    sd = dict(mmseg["aspp"])
    key = f"{GEN}.aspp_modules.1.bn.num_batches_tracked"
    del sd[key]
    out = convert_official_knet_state_dict(sd, sem_shapes["aspp"])
    assert set(out) == set(sem_shapes["aspp"]) - {expected_semantic_key(key)}


def test_mmseg_without_auxiliary_head():
    sd = make_mmseg_state_dict("fcn", aux_channels=None)
    with pytest.raises(CheckpointKeyError, match="auxiliary_head"):
        convert_official_knet_state_dict(sd, shapes_of(SEM_CONFIGS["fcn"]))
    shapes = shapes_of(SEM_CONFIGS["fcn"], ["MODEL.KNET.AUX_HEAD.LOSS_WEIGHT", "0.0"])
    assert not any(k.startswith("auxiliary_head.") for k in shapes)
    assert convert_official_knet_state_dict(sd, shapes)


def test_mmseg_unsupported_variants(mmseg):
    # DepthwiseSeparableASPPHead-like (DeepLabV3+) is not one of the K-Net heads
    sd = {k: v for k, v in mmseg["fcn"].items() if not k.startswith(f"{GEN}.conv")}
    sd[f"{GEN}.c1_bottleneck.conv.weight"] = torch.zeros(48, 256, 1, 1)
    sd[f"{GEN}.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    with pytest.raises(UnsupportedCheckpointError, match="c1_bottleneck"):
        describe_official_knet_state_dict(sd)
    # a plain MMSeg segmentor (no K-Net heads)
    plain = {k: v for k, v in mmseg["fcn"].items() if not k.startswith("decode_head.")}
    plain["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    with pytest.raises(CheckpointKeyError, match="kernel_generate_head"):
        describe_official_knet_state_dict(plain)


# ---------------------------------------------------------------- ResNetV1c ImageNet weights
class _TorchvisionV1c(nn.Module):
    """torchvision ResNet with MMCV's ResNetV1c deep stem: an independent reference."""

    def __init__(self, depth: int, dilate: bool):
        super().__init__()
        torch.manual_seed(depth)
        self.net = getattr(torchvision.models, f"resnet{depth}")(
            weights=None, replace_stride_with_dilation=[False, dilate, dilate]
        )
        del self.net.conv1, self.net.bn1, self.net.fc

        def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.stem = nn.Sequential(
            *conv_bn_relu(3, 32, 2), *conv_bn_relu(32, 32, 1), *conv_bn_relu(32, 64, 1)
        )
        _randomize_bn(self)

    def state_dict_v1c(self) -> dict[str, torch.Tensor]:
        sd = {f"stem.{k}": v for k, v in self.stem.state_dict().items()}
        sd.update(self.net.state_dict())
        return sd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.maxpool(self.stem(x))
        return self.net.layer4(self.net.layer3(self.net.layer2(self.net.layer1(x))))


@pytest.mark.slow
@pytest.mark.parametrize("dilate", [False, True], ids=["R50", "R50-D8"])
def test_v1c_weights_reproduce_the_reference(dilate):
    """torchvision's ``replace_stride_with_dilation`` also gives the first block of a dilated
    stage the previous dilation, i.e. MMSeg's ``contract_dilation``: same numbers expected."""
    reference = _TorchvisionV1c(50, dilate).eval()
    config = SEM_CONFIGS["fcn" if dilate else "upernet"]
    converted, name = convert_pretrained_backbone(reference.state_dict_v1c(), shapes_of(config))
    assert name == "R-50-V1c"
    cfg = get_knet_cfg(str(REPO / config), ["MODEL.RESNETS.NORM", "BN"])
    backbone = build_knet_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    assert set(backbone.state_dict()) == set(converted)
    backbone.load_state_dict(converted)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        expected = reference(x)
        got = backbone(x)["res5"]
    assert got.shape == expected.shape == (1, 2048, *((6, 8) if dilate else (2, 2)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_v1c_imagenet_conversion_is_strict():
    sd = imagenet_resnet(50, deep_stem=True)
    del sd["stem.7.running_var"]
    sd["stem.2.weight"] = torch.zeros(1)  # ReLU: no parameters
    with pytest.raises(CheckpointKeyError) as err:
        convert_pretrained_backbone(sd, shapes_of(SEM_CONFIGS["upernet"]))
    assert "lacks, 1 key(s):\n  stem.conv3.norm.running_var" in str(err.value)
    assert "stem.2.weight" in str(err.value)


# -------------------------------------------------------------------------------------- CLIs
def test_official_cli(tmp_path, capsys):
    cli = load_script("tools/convert_official_knet.py")
    sd = make_official_state_dict(**SMALL)
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    classes = coco_classes("panoptic")
    torch.save({"meta": {"CLASSES": classes}, "state_dict": sd}, src)
    # the architecture selects the R50 panoptic config, which the narrow model does not fit
    assert cli.main([str(src), str(dst)]) == 1
    captured = capsys.readouterr()
    assert "knet_R50_bs16_1x.yaml" in captured.out
    assert "shape mismatches" in captured.err and not dst.exists()
    # ... unless the config is overridden to the small model's sizes
    assert cli.main([str(src), str(dst), "--opts", *SMALL_OPTS]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "detected: panoptic K-Net, R-50, 3 stages, 133 classes, 32-d kernels" in out
    assert "evaluate with: python train_net.py --config-file" in out
    saved = load_checkpoint_file(str(dst))
    expected = convert_official_knet_state_dict(sd, shapes_of(CONFIGS["panoptic"], SMALL_OPTS))
    assert set(saved["model"]) == set(expected) and saved["matching_heuristics"] is False
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
    # class order differing from Detectron2's COCO ids
    classes[3], classes[4] = classes[4], classes[3]
    torch.save({"meta": {"CLASSES": classes}, "state_dict": sd}, src)
    assert cli.main([str(src), str(tmp_path / "a.pth"), "--opts", *SMALL_OPTS]) == 1
    assert "class 3" in capsys.readouterr().err
    args = [str(src), str(tmp_path / "b.pth"), "--skip-class-check", "--opts", *SMALL_OPTS]
    assert cli.main(args) == 0
    # unknown key: does not fit
    sd["rpn_head.extra.weight"] = torch.zeros(1)
    torch.save(sd, src)
    assert cli.main([str(src), str(tmp_path / "c.pth"), "--opts", *SMALL_OPTS]) == 1
    assert "rpn_head.extra.weight" in capsys.readouterr().err
    # not a K-Net checkpoint; a K-Net no config describes
    torch.save({k: v for k, v in sd.items() if k.startswith("backbone.")}, src)
    assert cli.main([str(src), str(tmp_path / "d.pth")]) == 2
    assert "not a K-Net checkpoint" in capsys.readouterr().err
    torch.save(make_official_state_dict(num_classes=7, **SMALL), src)
    assert cli.main([str(src), str(tmp_path / "e.pth")]) == 2
    assert "--config-file" in capsys.readouterr().err


def test_pretrained_backbone_cli(tmp_path, capsys):
    cli = load_script("tools/convert_pretrained_backbone.py")
    sd = imagenet_resnet(18, deep_stem=True, lazy=False)
    src, dst = tmp_path / "resnet18_v1c.pth", tmp_path / "R-18-V1c.pkl"
    torch.save({"meta": {}, "state_dict": sd}, src)
    # no shipped config has an R-18-V1c: converted without a check
    assert cli.main([str(src), str(dst)]) == 0
    assert "detected: R-18-V1c" in capsys.readouterr().out
    with open(dst, "rb") as f:
        saved = pickle.load(f)
    assert saved["matching_heuristics"] is True and "R-18-V1c" in saved["__author__"]
    assert (saved["model"]["stem.conv2.weight"] == sd["stem.3.weight"].numpy()).all()
    assert not any(k.startswith("fc.") for k in saved["model"])
    # checked against a config: R-18 does not fit the R-50 UPerNet backbone
    args = [str(src), str(tmp_path / "x.pkl"), "--config-file", str(REPO / SEM_CONFIGS["upernet"])]
    assert cli.main(args) == 1
    assert "shape mismatches" in capsys.readouterr().err
    torch.save({"model": {"a.weight": torch.zeros(1)}}, src)
    assert cli.main([str(src), str(tmp_path / "y.pkl")]) == 2
