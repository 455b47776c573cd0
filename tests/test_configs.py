"""Every config under configs/ merges and builds; bad configs fail with clear errors."""

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from knet.engine import get_knet_cfg

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
TOY_CONFIG = str(ROOT / "configs/toy/knet_R18_toy_panoptic.yaml")
COCO_PANOPTIC = [c for c in CONFIGS if "panoptic-segmentation/knet_" in c]
COCO_INSTANCE = [c for c in CONFIGS if "instance-segmentation/knet_" in c]
BLOCKS_IN_RES4 = {18: 2, 34: 6, 50: 6, 101: 23}


def load(config, opts=()):
    return get_knet_cfg(str(ROOT / config), ["MODEL.DEVICE", "cpu", *opts])


def test_configs_are_found():
    assert len(COCO_PANOPTIC) == 4 and len(COCO_INSTANCE) == 4
    assert "configs/toy/knet_R18_toy_panoptic.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_config_merges_and_builds(config):
    cfg = load(config)
    k = cfg.MODEL.KNET
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert cfg.MODEL.META_ARCHITECTURE == "KNet"
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.kernel_head
    initial = head.initial_head
    assert initial.init_kernels.weight.shape[:2] == (k.NUM_PROPOSALS, k.HIDDEN_DIM)
    assert initial.conv_seg.out_channels == num_classes
    assert initial.num_stuff_classes == num_classes - k.NUM_THING_CLASSES
    assert len(head.stages) == k.NUM_STAGES
    for stage in head.stages:
        assert stage.fc_cls.out_features == num_classes
        assert stage.attention.embed_dim == k.HIDDEN_DIM
        assert stage.attention.num_heads == k.NHEADS
        assert stage.ffn[0].out_features == k.DIM_FEEDFORWARD
    assert model.num_thing_classes == model.criterion.num_thing_classes == k.NUM_THING_CLASSES
    assert model.criterion.stage_loss_weights == list(k.STAGE_LOSS_WEIGHTS)
    assert model.panoptic_on == k.TEST.PANOPTIC_ON
    assert model.instance_on == k.TEST.INSTANCE_ON
    assert model.semantic_on == k.TEST.SEMANTIC_ON
    assert model.device == torch.device("cpu")

    bottom_up = model.backbone.bottom_up
    assert len(bottom_up.res4) == BLOCKS_IN_RES4[cfg.MODEL.RESNETS.DEPTH]
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
    assert k.NUM_PROPOSALS == 100 and k.NUM_STAGES == 3 and k.HIDDEN_DIM == 256
    assert k.RANK_WEIGHT == (0.1 if panoptic else 0.0)
    assert k.TEST.PANOPTIC_ON == panoptic and k.TEST.INSTANCE_ON
    assert (k.CLASS_WEIGHT, k.MASK_WEIGHT, k.DICE_WEIGHT) == (2.0, 1.0, 4.0)
    assert (k.COST_CLASS, k.COST_MASK, k.COST_DICE) == (2.0, 1.0, 4.0)
    assert (k.TEST.INSTANCE_SCORE_THRESH, k.TEST.OVERLAP_THRESHOLD) == (0.3, 0.6)
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    assert solver.OPTIMIZER == "ADAMW" and solver.BASE_LR == 1e-4
    assert solver.WEIGHT_DECAY == solver.WEIGHT_DECAY_NORM == solver.WEIGHT_DECAY_BIAS == 0.05
    assert solver.BACKBONE_MULTIPLIER == 0.25 and solver.IMS_PER_BATCH == 16
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
    depth = 101 if "R101" in config else 50
    assert cfg.MODEL.RESNETS.DEPTH == depth and f"R-{depth}.pkl" in cfg.MODEL.WEIGHTS
    if "ms3x" in config:
        assert solver.MAX_ITER == 264000 and tuple(solver.STEPS) == (198000, 242000)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 800)
        assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
    else:
        assert solver.MAX_ITER == 88000 and tuple(solver.STEPS) == (58600, 80600)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,)
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333


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


def test_convs_dim_must_equal_hidden_dim():
    with pytest.raises(ValueError, match="CONVS_DIM"):
        build_toy(["MODEL.SEM_SEG_HEAD.CONVS_DIM", "32"])


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
