"""Released K-Net models with Swin and deformable ResNet backbones, end to end on CPU.

A synthetic checkpoint in each official layout (MMDetection Swin-L panoptic, MMDetection
R-101-DCN with non-zero offsets, MMSeg Swin-T UPerNet), narrowed but with the real key pattern,
is converted with ``tools/convert_official_knet.py``, loaded into the model its config builds,
and compared with the official computation: the backbone features with an independent
functional re-implementation of MMDetection's Swin / ResNet + MMCV's DCNv1
(``references.resnet``, ``references.swin``), to 1e-5 relative in float32 and 1e-10 in float64;
the final outputs (panoptic map and segments, instances, semantic probabilities) with the same
model run on the reference features, which must give identical results.
"""

import pytest
import torch
from detectron2.modeling import build_model
from references.layouts import (
    head_opts,
    make_mmseg_state_dict,
    make_official_state_dict,
    resnet_opts,
    swin_opts,
    tame,
)
from references.resnet import mmdet_resnet_forward
from references.swin import mmdet_swin_forward
from scripts import REPO, load_script

from knet.checkpoint import KNetCheckpointer
from knet.conversion import load_checkpoint_file
from knet.engine import get_knet_cfg

PANOPTIC = "configs/coco/panoptic-segmentation"
FEATURES = ("res2", "res3", "res4", "res5")
SWIN_L = (16, (2, 2, 18, 2), (1, 2, 4, 8))  # Swin-L's depths, 1/12 of its width
SWIN_T = (16, (2, 2, 6, 2), (1, 2, 4, 8))  # Swin-T's depths, 1/6 of its width
NARROW_HEADS = dict(channels=32, ffn_channels=64, num_proposals=8)
CPU = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
# panoptic models: also output instances, and keep every thing kernel (non-empty outputs)
ALL_OUTPUTS = [
    "MODEL.KNET.TEST.INSTANCE_ON", "True", "MODEL.KNET.TEST.PANOPTIC_THING_SCORE_THRESH", "0.0",
]  # fmt: skip


def convert_and_load(checkpoint: dict, config: str, opts: list[str], tmp_path) -> torch.nn.Module:
    """Convert with the documented command, then load the file into the config's model."""
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save(checkpoint, src)
    cli = load_script("tools/convert_official_knet.py")
    assert cli.main([str(src), str(dst), "--config-file", str(REPO / config), "--opts", *opts]) == 0
    model = build_model(get_knet_cfg(str(REPO / config), opts)).eval()
    checkpointer = KNetCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(dst)))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    return model


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def check_backbone(model, reference_forward, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our backbone body vs the reference in float32 (1e-5 relative) and float64 (1e-10);
    returns the float64 reference features."""
    body = getattr(model.backbone, "bottom_up", model.backbone)
    results = {}
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        model.to(dtype)
        with torch.no_grad():
            x = model.preprocess_image([{"image": image.to(dtype)}]).tensor
            ours = body(x)
            reference = reference_forward(x)
        for name, expected in zip(FEATURES, reference):
            assert ours[name].shape == expected.shape
            assert relative_error(ours[name], expected) < tolerance, (name, dtype)
        results = dict(zip(FEATURES, reference))
    return results


def outputs_on(model, image: torch.Tensor, features=None) -> dict:
    """The model's outputs (float64), with the backbone body replaced by ``features``."""
    body = getattr(model.backbone, "bottom_up", model.backbone)
    if features is not None:
        body.forward = lambda x: features
    try:
        with torch.no_grad():
            return model([{"image": image.double()}])[0]
    finally:
        body.__dict__.pop("forward", None)


def assert_same_coco_outputs(ours: dict, official: dict) -> None:
    seg, segments = ours["panoptic_seg"]
    ref_seg, ref_segments = official["panoptic_seg"]
    assert len(segments) > 0  # non-trivial
    assert torch.equal(seg, ref_seg) and segments == ref_segments
    inst, ref_inst = ours["instances"], official["instances"]
    assert len(inst) > 0
    assert torch.equal(inst.pred_classes, ref_inst.pred_classes)
    assert torch.equal(inst.pred_masks, ref_inst.pred_masks)
    torch.testing.assert_close(inst.scores, ref_inst.scores, rtol=1e-9, atol=1e-12)


def test_swin_l_panoptic_checkpoint(tmp_path):
    official = tame(make_official_state_dict("Swin-L", swin_dims=SWIN_L, **NARROW_HEADS))
    opts = swin_opts(SWIN_L) + head_opts(32, 64, 8) + ALL_OUTPUTS + CPU
    model = convert_and_load(official, f"{PANOPTIC}/knet_swin_L_bs32_ms3x.yaml", opts, tmp_path)
    image = torch.randint(0, 256, (3, 117, 150), generator=torch.Generator().manual_seed(1))

    def reference(x):
        return mmdet_swin_forward(official, x, SWIN_L[0], SWIN_L[1], SWIN_L[2])

    features = check_backbone(model, reference, image)
    assert_same_coco_outputs(outputs_on(model, image), outputs_on(model, image, features))


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_r101_dcn_checkpoint(task, tmp_path):
    num_classes = 133 if task == "panoptic" else 80
    official = make_official_state_dict(
        "R-101-DCN", num_classes=num_classes, base_width=8, seed=0, **NARROW_HEADS
    )
    official = tame(official)
    offsets = [v for k, v in official.items() if "conv_offset" in k]
    assert len(offsets) == 2 * (4 + 23 + 3) and all(v.abs().min() > 0 for v in offsets)
    opts = resnet_opts(8) + head_opts(32, 64, 8) + CPU
    if task == "panoptic":
        opts += ALL_OUTPUTS
    config = f"configs/coco/{task}-segmentation/knet_R101_DCN_bs16_ms3x.yaml"
    model = convert_and_load(official, config, opts, tmp_path)
    image = torch.randint(0, 256, (3, 97, 131), generator=torch.Generator().manual_seed(2))
    features = check_backbone(model, lambda x: mmdet_resnet_forward(official, x), image)
    # the offsets move the samples: the same weights without deformation give other features
    plain = {k: v for k, v in official.items() if "conv_offset" not in k}
    with torch.no_grad():
        x = model.preprocess_image([{"image": image.double()}]).tensor
        undeformed = mmdet_resnet_forward(plain, x)
    assert relative_error(undeformed[-1], features["res5"]) > 1e-2
    ours, reference = outputs_on(model, image), outputs_on(model, image, features)
    if task == "panoptic":
        assert_same_coco_outputs(ours, reference)
    else:
        assert set(ours) == {"instances"} and len(ours["instances"]) == 100
        assert torch.equal(ours["instances"].pred_masks, reference["instances"].pred_masks)
        assert torch.equal(ours["instances"].pred_classes, reference["instances"].pred_classes)


def test_mmseg_swin_t_upernet_checkpoint(tmp_path):
    official = make_mmseg_state_dict(
        "upernet", "Swin-T", num_classes=11, channels=32, updator_channels=16, ffn_channels=64,
        aux_channels=16, swin_dims=SWIN_T, lazy=False, seed=5,
    )  # fmt: skip
    official = tame(official)
    opts = swin_opts(SWIN_T) + [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "11", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "MODEL.SEM_SEG_HEAD.NORM", "BN",
        "MODEL.KNET.UPDATOR_DIM", "16", "MODEL.KNET.DIM_FEEDFORWARD", "64",
        "MODEL.KNET.NHEADS", "4", "MODEL.KNET.AUX_HEAD.CHANNELS", "16",
    ] + CPU  # fmt: skip
    config = "configs/ade20k/semantic-segmentation/knet_s3_upernet_swin_T_bs16_80k.yaml"
    model = convert_and_load(
        {"meta": {"CLASSES": [str(i) for i in range(11)]}, "state_dict": official},
        config,
        opts,
        tmp_path,
    )
    image = torch.randint(0, 256, (3, 75, 99), generator=torch.Generator().manual_seed(3))

    def reference(x):
        return mmdet_swin_forward(official, x, SWIN_T[0], SWIN_T[1], SWIN_T[2])

    features = check_backbone(model, reference, image)
    ours, expected = outputs_on(model, image)["sem_seg"], outputs_on(model, image, features)
    torch.testing.assert_close(ours, expected["sem_seg"], rtol=1e-9, atol=1e-12)
    assert ours.shape == (11, 75, 99)
    # the auxiliary head reads stage 3 of Swin (MMSeg in_index=2)
    with torch.no_grad():
        aux = model.auxiliary_head(features)
    assert aux.shape[-2:] == features["res4"].shape[-2:]


def test_converted_file_loads_safely(tmp_path):
    """The converted file holds only tensors and plain containers (``weights_only`` load)."""
    official = make_official_state_dict(
        "R-101-DCN", num_classes=80, base_width=8, lazy=True, **NARROW_HEADS
    )
    opts = resnet_opts(8) + head_opts(32, 64, 8) + CPU
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save(official, src)
    cli = load_script("tools/convert_official_knet.py")
    config = str(REPO / "configs/coco/instance-segmentation/knet_R101_DCN_bs16_ms3x.yaml")
    assert cli.main([str(src), str(dst), "--config-file", config, "--opts", *opts]) == 0
    saved = load_checkpoint_file(str(dst))
    key = "backbone.bottom_up.res4.22.conv2_offset.bias"
    assert torch.equal(saved["model"][key], official["backbone.layer3.22.conv2.conv_offset.bias"])
