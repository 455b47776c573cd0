"""Every config under configs/ merges and builds; bad configs fail with clear errors."""

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from knet.engine import get_knet_cfg
from knet.modeling import SemanticKNet
from knet.modeling.backbone.deform_conv import DeformBottleneckBlock

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
TOY_CONFIG = str(ROOT / "configs/toy/knet_R18_toy_panoptic.yaml")
COCO_PANOPTIC = [c for c in CONFIGS if "panoptic-segmentation/knet_" in c]
COCO_INSTANCE = [c for c in CONFIGS if "instance-segmentation/knet_" in c]
ADE20K = [c for c in CONFIGS if "ade20k/semantic-segmentation/knet_" in c]
SEMANTIC = [c for c in CONFIGS if "ade20k" in c or c.endswith("_semantic.yaml")]
MASK_CONFIGS = [c for c in CONFIGS if c not in SEMANTIC]  # instance / panoptic K-Net
BLOCKS_IN_RES4 = {18: 2, 34: 6, 50: 6, 101: 23}


def full_size_slow(configs):
    """The configs, those of full-size models (ResNet-50/101, Swin) marked ``slow``."""
    return [c if "R18" in c else pytest.param(c, marks=pytest.mark.slow) for c in configs]


def load(config, opts=()):
    cfg = get_knet_cfg(str(ROOT / config), ["MODEL.DEVICE", "cpu", *opts])
    # the templates of configs/custom take their class counts from the data (-1): build them
    # with COCO's, as train_net.py would for COCO-like data
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == -1:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133
    if cfg.MODEL.KNET.NUM_THING_CLASSES == -1:
        cfg.MODEL.KNET.NUM_THING_CLASSES = 80
    return cfg


def test_configs_are_found():
    assert (len(COCO_PANOPTIC), len(COCO_INSTANCE), len(ADE20K)) == (6, 5, 8)
    assert "configs/toy/knet_upernet_R18_toy_semantic.yaml" in SEMANTIC
    assert "configs/toy/knet_R18_toy_panoptic.yaml" in CONFIGS


@pytest.mark.parametrize("config", full_size_slow(MASK_CONFIGS))
def test_config_merges_and_builds(config):
    cfg = load(config)
    k = cfg.MODEL.KNET
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert cfg.MODEL.META_ARCHITECTURE in ("KNet", "VideoKNet", "VideoKNetClip")
    torch.manual_seed(0)
    model = build_model(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "VideoKNet":  # the image model + kernel link + embedding
        assert model.kernel_link.attention.embed_dim == cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        assert model.association_head.track_embed.out_features == k.VIDEO.EMBED_DIM
    if cfg.MODEL.META_ARCHITECTURE == "VideoKNetClip":  # the image model + the clip head
        n = k.VIDEO.CLIP_STAGES
        classes = [num_classes] * n + [0] * (k.NUM_STAGES - n)  # per-frame stages: no classes
        assert [s.num_classes for s in model.clip_head.stages] == classes
        assert model.topk == k.VIDEO.CLIP_TOPK
    head = model.kernel_head
    initial = head.initial_head
    assert initial.init_kernels.weight.shape[:2] == (
        k.NUM_PROPOSALS,
        cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
    )
    assert initial.conv_seg.out_channels == num_classes
    assert initial.num_stuff_classes == num_classes - k.NUM_THING_CLASSES
    assert len(head.stages) == k.NUM_STAGES
    for stage in head.stages:
        assert stage.fc_cls.out_features == num_classes
        assert stage.attention.embed_dim == cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        assert stage.attention.num_heads == k.NHEADS
        assert stage.ffn[0].out_features == k.DIM_FEEDFORWARD
    assert model.criterion.num_thing_classes == k.NUM_THING_CLASSES
    assert model.criterion.stage_loss_weights == list(k.STAGE_LOSS_WEIGHTS)
    assert model.postprocessor.panoptic_on == k.TEST.PANOPTIC_ON
    assert model.postprocessor.instance_on == k.TEST.INSTANCE_ON
    assert model.postprocessor.semantic_on == k.TEST.SEMANTIC_ON
    assert model.device == torch.device("cpu")

    bottom_up = model.backbone.bottom_up
    if "swin" in cfg.MODEL.BACKBONE.NAME:
        assert [len(stage.blocks) for stage in bottom_up.layers] == list(cfg.MODEL.SWIN.DEPTHS)
        assert all(p.requires_grad for p in model.parameters())
        return
    assert len(bottom_up.res4) == BLOCKS_IN_RES4[cfg.MODEL.RESNETS.DEPTH]
    deformable = [isinstance(b, DeformBottleneckBlock) for b in bottom_up.res3]
    assert deformable == [cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE[1]] * len(bottom_up.res3)
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if freeze_at >= 1:
        assert all(not p.requires_grad for p in bottom_up.stem.parameters())
    if freeze_at >= 2:
        assert all(not p.requires_grad for p in bottom_up.res2.parameters())
    else:
        assert frozen == []
    assert all(p.requires_grad for p in bottom_up.res3.parameters())
    assert all(n.startswith("backbone.bottom_up.") for n in frozen)


@pytest.mark.parametrize("config", COCO_PANOPTIC + COCO_INSTANCE)
def test_coco_configs_follow_official_recipe(config):
    cfg = load(config)
    k, solver = cfg.MODEL.KNET, cfg.SOLVER
    panoptic = config in COCO_PANOPTIC
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == (133 if panoptic else 80)
    assert k.NUM_THING_CLASSES == 80
    assert k.NUM_PROPOSALS == 100 and k.NUM_STAGES == 3 and cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == 256
    assert k.RANK_WEIGHT == (0.1 if panoptic else 0.0)
    assert k.TEST.PANOPTIC_ON == panoptic and k.TEST.INSTANCE_ON
    assert (k.CLASS_WEIGHT, k.MASK_WEIGHT, k.DICE_WEIGHT) == (2.0, 1.0, 4.0)
    assert (k.COST_CLASS, k.COST_MASK, k.COST_DICE) == (2.0, 1.0, 4.0)
    assert (k.TEST.PANOPTIC_THING_SCORE_THRESH, k.TEST.OVERLAP_THRESHOLD) == (0.3, 0.6)
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    assert solver.OPTIMIZER == "ADAMW" and solver.BASE_LR == 1e-4
    assert solver.WEIGHT_DECAY == solver.WEIGHT_DECAY_NORM == solver.WEIGHT_DECAY_BIAS == 0.05
    swin = "swin" in config
    assert solver.BACKBONE_MULTIPLIER == 0.25 and solver.IMS_PER_BATCH == (32 if swin else 16)
    assert solver.WEIGHT_DECAY_EMBED == 0.05
    clip = solver.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 1.0
    assert clip.NORM_TYPE == 2.0
    assert (solver.WARMUP_ITERS, solver.WARMUP_FACTOR, solver.WARMUP_METHOD) == (
        1000,
        0.001,
        "linear",
    )
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    if swin:  # Swin-L, window 7, ImageNet-22k; batch 32: half the iterations of 36 epochs
        s = cfg.MODEL.SWIN
        assert (s.EMBED_DIM, list(s.DEPTHS), list(s.NUM_HEADS)) == (
            192,
            [2, 2, 18, 2],
            [6, 12, 24, 48],
        )
        assert (s.WINDOW_SIZE, s.DROP_PATH_RATE, s.APE, s.PATCH_NORM) == (7, 0.2, False, True)
        assert cfg.MODEL.WEIGHTS == "pretrained/swin_large_patch4_window7_224_22k.pkl"
        assert solver.MAX_ITER == 132000 and tuple(solver.STEPS) == (99000, 121000)
    else:
        depth = 101 if "R101" in config else 50
        assert cfg.MODEL.RESNETS.DEPTH == depth and f"R-{depth}" in cfg.MODEL.WEIGHTS
        dcn = [False, True, True, True] if "DCN" in config else [False] * 4
        assert cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE == dcn
        assert not cfg.MODEL.RESNETS.DEFORM_MODULATED and cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS == 1
    if swin:
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 800)
    elif "ms3x" in config:
        assert solver.MAX_ITER == 264000 and tuple(solver.STEPS) == (198000, 242000)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 800)
        assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
    else:
        assert solver.MAX_ITER == 88000 and tuple(solver.STEPS) == (58600, 80600)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,)
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", ["configs/coco/panoptic-segmentation/knet_R50_bs16_1x.yaml",
               "configs/coco/instance-segmentation/knet_R50_bs16_1x.yaml"]
)  # fmt: skip
def test_coco_model_runs_inference(config):
    torch.manual_seed(0)
    model = build_model(load(config)).eval()
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)
    with torch.no_grad():
        (result,) = model([{"image": image}])
    panoptic = config in COCO_PANOPTIC
    assert ("panoptic_seg" in result) == panoptic and "instances" in result
    assert result["instances"].pred_masks.shape[1:] == (70, 90)
    if panoptic:
        assert result["panoptic_seg"][0].shape == (70, 90)
        assert result["sem_seg"].shape == (133, 70, 90)


# ----------------------------------------------------------------------------- semantic
D8_HEADS = {"fcn": "KNetFCNHead", "pspnet": "KNetPSPHead", "deeplabv3": "KNetASPPHead"}


@pytest.mark.parametrize("config", full_size_slow(SEMANTIC))
def test_semantic_config_merges_builds_and_infers(config):
    cfg = load(config)
    k = cfg.MODEL.KNET
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    head = model.kernel_head
    assert isinstance(model, SemanticKNet) and k.KERNEL_HEAD_NAME == "KNetSemanticKernelHead"
    assert head.conv_seg.weight.shape == (num_classes, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, 1, 1)
    assert len(head.stages) == k.NUM_STAGES == 3
    for stage in head.stages:
        assert not hasattr(stage, "fc_cls") and stage.hard_mask_threshold is None
        assert stage.attention.embed_dim == cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        assert stage.kernel_update_conv.fc_layer.in_features == k.UPDATOR_DIM
    aux = model.auxiliary_head
    assert aux.conv_seg.out_channels == num_classes
    assert aux.conv_seg.in_channels == k.AUX_HEAD.CHANNELS
    assert model.criterion.aux_weight == k.AUX_HEAD.LOSS_WEIGHT == 0.4
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == []
    if cfg.MODEL.BACKBONE.NAME == "build_knet_resnet_backbone":  # the deep (ResNetV1c) stem
        assert model.backbone.stem.conv1.weight.shape[:2] == (32, 3)
    image = torch.randint(0, 256, (3, 67, 93), dtype=torch.uint8)
    with torch.no_grad():
        (result,) = model([{"image": image}])
    assert list(result) == ["sem_seg"] and result["sem_seg"].shape == (num_classes, 67, 93)


@pytest.mark.parametrize("config", ADE20K)
def test_ade20k_configs_follow_official_recipe(config):
    cfg = load(config)
    k, solver, inp = cfg.MODEL.KNET, cfg.SOLVER, cfg.INPUT
    swin = "swin" in config
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
    assert cfg.MODEL.BACKBONE.NAME == (
        "build_knet_swin_backbone" if swin else "build_knet_resnet_backbone"
    )
    assert cfg.MODEL.RESNETS.STEM_TYPE == "deeplab" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.RESNETS.NORM == cfg.MODEL.SEM_SEG_HEAD.NORM == "SyncBN"
    assert k.DECODE_HEAD.DROPOUT == 0.1 and k.UPDATOR_DIM == 256 and not k.XAVIER_INIT_STAGES
    assert (k.AUX_HEAD.IN_FEATURE, k.AUX_HEAD.CHANNELS, k.AUX_HEAD.LOSS_WEIGHT) == (
        "res4",
        256,
        0.4,
    )
    assert not k.SEM_SEG_LOSS_AVG_NON_IGNORE
    head = config.split("knet_s3_")[1].split("_")[0]
    if head == "upernet":
        assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == "KNetUPerHead"
        assert cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == (256 if "256ch" in config else 512)
        assert (cfg.MODEL.RESNETS.RES4_DILATION, cfg.MODEL.RESNETS.RES5_DILATION) == (1, 1)
    else:
        assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == D8_HEADS[head]
        assert cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == 512
        assert (cfg.MODEL.RESNETS.RES4_DILATION, cfg.MODEL.RESNETS.RES5_DILATION) == (2, 4)
        assert cfg.MODEL.RESNETS.CONTRACT_DILATION
        assert list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES) == ["res5"]
    if swin:  # MMSeg's Swin recipe: no decay on norms and position tables
        assert solver.OPTIMIZER == "ADAMW" and solver.BASE_LR == 6e-5
        assert solver.WEIGHT_DECAY == solver.WEIGHT_DECAY_BIAS == 5e-4
        assert solver.WEIGHT_DECAY_NORM == solver.WEIGHT_DECAY_EMBED == 0.0
        large = "swin_L" in config
        s = cfg.MODEL.SWIN
        assert (s.EMBED_DIM, list(s.DEPTHS)) == (
            (192, [2, 2, 18, 2]) if large else (96, [2, 2, 6, 2])
        )
        assert s.WINDOW_SIZE == 7 and not s.APE
        assert s.DROP_PATH_RATE == (0.4 if "640" in config else 0.3)
    else:
        assert solver.OPTIMIZER == "ADAMW" and solver.BASE_LR == 1e-4
        assert solver.WEIGHT_DECAY == solver.WEIGHT_DECAY_NORM == solver.WEIGHT_DECAY_BIAS == 5e-4
    assert solver.BACKBONE_MULTIPLIER == 1.0 and solver.IMS_PER_BATCH == 16
    assert solver.MAX_ITER == 80000 and tuple(solver.STEPS) == (60000, 72000)
    assert (solver.WARMUP_ITERS, solver.WARMUP_FACTOR) == (1000, 0.001)
    clip = solver.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 1.0
    assert inp.DATASET_MAPPER_NAME == "knet_semantic" and inp.COLOR_AUG_SSD
    crop = 640 if "640" in config else 512
    assert inp.CROP.ENABLED and tuple(inp.CROP.SIZE) == (crop, crop)
    assert inp.CROP.SINGLE_CATEGORY_MAX_AREA == 0.75
    assert tuple(inp.MIN_SIZE_TRAIN) == (crop // 2, crop * 2)
    assert inp.MIN_SIZE_TRAIN_SAMPLING == "range"
    assert (inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST) == (crop, 2048)
    assert cfg.DATASETS.TRAIN == ("ade20k_sem_seg_train",)
    assert cfg.DATASETS.TEST == ("ade20k_sem_seg_val",)


@pytest.mark.parametrize("head", sorted(D8_HEADS))
def test_d8_backbone_dilations(head):
    cfg = load(f"configs/ade20k/semantic-segmentation/knet_s3_{head}_R50_D8_bs16_80k.yaml")
    backbone = build_model(cfg).backbone
    assert backbone.output_shape()["res5"].stride == 8
    assert [b.conv2.dilation[0] for b in backbone.res4] == [1, 2, 2, 2, 2, 2]
    assert [b.conv2.dilation[0] for b in backbone.res5] == [2, 4, 4]


# ----------------------------------------------------------------------------- bad configs
def build_toy(opts):
    return build_model(get_knet_cfg(TOY_CONFIG, ["MODEL.KNET.NUM_PROPOSALS", "4", *opts]))


def test_stage_loss_weights_length_mismatch():
    with pytest.raises(ValueError, match="STAGE_LOSS_WEIGHTS"):
        build_toy(["MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0, 1.0]"])
    with pytest.raises(ValueError, match="NUM_STAGES"):
        build_toy(["MODEL.KNET.NUM_STAGES", "2"])


@pytest.mark.parametrize("num_thing", ["8", "0"])
def test_num_thing_classes_out_of_range(num_thing):
    with pytest.raises(ValueError, match="NUM_THING_CLASSES"):
        build_toy(["MODEL.KNET.NUM_THING_CLASSES", num_thing])


def test_panoptic_output_needs_stuff_classes():
    opts = ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4", "MODEL.KNET.NUM_THING_CLASSES", "4"]
    with pytest.raises(ValueError, match="stuff"):
        build_toy(opts + ["MODEL.KNET.TEST.PANOPTIC_ON", "True"])
    model = build_toy(opts + ["MODEL.KNET.TEST.PANOPTIC_ON", "False"])
    assert model.kernel_head.initial_head.num_stuff_classes == 0


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f'_BASE_: "{TOY_CONFIG}"\nMODEL:\n  KNET:\n    NUM_PROPOSAL: 10\n', encoding="utf-8"
    )
    with pytest.raises(KeyError, match="NUM_PROPOSAL"):
        get_knet_cfg(str(bad))
    # command-line overrides go through yacs' merge_from_list, which asserts instead
    with pytest.raises(AssertionError, match="Non-existent key"):
        get_knet_cfg(TOY_CONFIG, ["MODEL.KNET.NUM_PROPOSAL", "10"])


def test_known_override_is_applied():
    cfg = get_knet_cfg(TOY_CONFIG, ["MODEL.KNET.NUM_PROPOSALS", "5", "MODEL.KNET.NUM_STAGES", "1",
                                    "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]"])  # fmt: skip
    model = build_model(cfg)
    assert model.kernel_head.initial_head.init_kernels.weight.shape[0] == 5
    assert len(model.kernel_head.stages) == 1


@pytest.mark.parametrize(
    "former, current, value",
    [
        ("INSTANCE_SCORE_THRESH", "PANOPTIC_THING_SCORE_THRESH", 0.45),
        ("SCORE_THRESH", "INSTANCES_SCORE_THRESH", 0.25),
    ],
)
def test_renamed_threshold_keys_still_work(former, current, value, caplog):
    from knet.modeling.postprocessing import KNetPostProcessor

    option = {"PANOPTIC_THING_SCORE_THRESH": "thing_score_thresh"}.get(
        current, "instances_score_thresh"
    )
    default = get_knet_cfg(TOY_CONFIG)
    assert getattr(KNetPostProcessor(default), option) == default.MODEL.KNET.TEST[current]
    cfg = get_knet_cfg(TOY_CONFIG, [f"MODEL.KNET.TEST.{former}", str(value)])
    with caplog.at_level("WARNING"):
        processor = KNetPostProcessor(cfg)
    assert getattr(processor, option) == pytest.approx(value)
    assert f"MODEL.KNET.TEST.{former} is deprecated" in caplog.text and current in caplog.text
