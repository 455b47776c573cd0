"""End-to-end checks of the K-Net meta-architecture on a tiny toy-config model (CPU)."""

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from knet.engine import get_knet_cfg
from knet.modeling import HungarianMatcher, KNetCriterion
from knet.modeling.kernel_head import ConvKernelHead, KernelUpdateHead, KNetIterativeKernelHead
from knet.modeling.meta_arch import KNet
from knet.modeling.pixel_decoder import build_pixel_decoder
from knet.modeling.postprocessing import KNetPostProcessor

TOY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs/toy/knet_R18_toy_panoptic.yaml")
NUM_PROPOSALS = 8
SMALL = ["MODEL.KNET.NUM_PROPOSALS", str(NUM_PROPOSALS)]
INSTANCE_ONLY = [
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4",
    "MODEL.KNET.NUM_THING_CLASSES", "4",
    "MODEL.KNET.RANK_WEIGHT", "0.0",
    "MODEL.KNET.TEST.PANOPTIC_ON", "False",
    "MODEL.KNET.TEST.SEMANTIC_ON", "False",
]  # fmt: skip
NUM_CLASSES, NUM_THING = 7, 4  # toy config: 4 thing + 3 stuff classes


# ----------------------------------------------------------------------------- helpers
def build(opts=(), seed=0):
    torch.manual_seed(seed)
    cfg = get_knet_cfg(TOY_CONFIG, SMALL + list(opts))
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def panoptic_model():
    return build()[1]


def random_image(h, w, seed=0, dtype=torch.uint8):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
    return image if dtype == torch.uint8 else image.to(dtype)


def make_sample(h, w, things=(), stuff=(), crowd=(), seed=0, bitmasks=False):
    """A training input like the panoptic mapper's.

    things / crowd: (class, y0, y1, x0, x1) boxes; stuff: (class, y0, y1, x0, x1) regions
    painted first (things are painted over them). Pixels of nothing are 255.
    """
    image = random_image(h, w, seed)
    sem_seg = torch.full((h, w), 255, dtype=torch.int64)
    for c, y0, y1, x0, x1 in stuff:
        sem_seg[y0:y1, x0:x1] = c
    classes, masks = [], []
    for c, y0, y1, x0, x1 in things:
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
        sem_seg[mask] = c
        classes.append(c)
        masks.append(mask)
        image[:, mask] = torch.tensor([40 * c, 255 - 50 * c, 128], dtype=torch.uint8)[:, None]
    for c, y0, y1, x0, x1 in crowd:
        sem_seg[y0:y1, x0:x1] = c  # crowd: a thing class in sem_seg, but no instance
    instances = Instances((h, w))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    gt_masks = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)
    instances.gt_masks = BitMasks(gt_masks) if bitmasks else gt_masks
    return {"image": image, "instances": instances, "sem_seg": sem_seg, "height": h, "width": w}


def regular_sample(h=64, w=80, seed=0, bitmasks=False):
    return make_sample(
        h,
        w,
        things=[(0, 5, 30, 5, 35), (2, 30, 60, 40, 75), (3, 10, 25, 50, 70)],
        stuff=[(4, 0, h // 2, 0, w), (6, h // 2, h, 0, w)],
        seed=seed,
        bitmasks=bitmasks,
    )


def many_objects_sample(h=67, w=91, num=12, seed=0):
    things = [(i % NUM_THING, 5 * i, 5 * i + 9, 7 * i, 7 * i + 11) for i in range(num)]
    return make_sample(h, w, things=things, stuff=[(5, 0, h, 0, w)], seed=seed)


def expected_loss_keys(num_stages=3, rank=True):
    names = ["mask", "dice", "seg"] + (["rank"] if rank else [])
    keys = {f"loss_rpn_{n}" for n in names}
    names = ["cls", "mask", "dice"] + (["rank"] if rank else [])
    for s in range(num_stages):
        keys |= {f"s{s}_loss_{n}" for n in names}
    return keys


def train_step_checks(model, batch, rank=True):
    """Training forward: all losses finite, every trainable parameter receives a gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage():
        losses = model(batch)
    assert set(losses) == expected_loss_keys(rank=rank)
    for name, value in losses.items():
        assert value.dim() == 0 and bool(torch.isfinite(value)), (name, value)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    bad = [
        n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
    ]
    assert bad == []
    return losses


def check_panoptic(result, size):
    panoptic_seg, segments_info = result["panoptic_seg"]
    assert panoptic_seg.shape == size and panoptic_seg.dtype == torch.int32
    ids = {s["id"] for s in segments_info}
    assert set(torch.unique(panoptic_seg).tolist()) - {0} == ids
    for s in segments_info:
        assert set(s) >= {"id", "category_id", "isthing", "score", "area"}
        assert s["isthing"] == (s["category_id"] < NUM_THING)
        assert s["area"] == int((panoptic_seg == s["id"]).sum())


def check_instances(instances, size, num_thing=NUM_THING):
    assert isinstance(instances, Instances) and instances.image_size == size
    n = len(instances)
    assert n > 0
    assert instances.pred_masks.dtype == torch.bool and instances.pred_masks.shape == (n, *size)
    assert isinstance(instances.pred_boxes, Boxes) and instances.pred_boxes.tensor.shape == (n, 4)
    assert instances.scores.shape == (n,) and instances.pred_classes.shape == (n,)
    assert bool((instances.pred_classes < num_thing).all())
    assert bool((instances.scores[:-1] >= instances.scores[1:]).all())


# ----------------------------------------------------------------------------- inference
def test_eval_forward_odd_sizes_mixed_dtypes(panoptic_model):
    model = panoptic_model.eval()
    inputs = [
        {"image": random_image(200, 250, seed=1)},  # uint8, output at the input size
        {"image": random_image(199, 251, seed=2, dtype=torch.float32), "height": 150,
         "width": 188},  # float like DefaultPredictor, resized output
        {"image": random_image(97, 131, seed=3), "height": 199, "width": 263},
    ]  # fmt: skip
    sizes = [(200, 250), (150, 188), (199, 263)]
    with torch.no_grad():
        results = model(inputs)
    assert len(results) == 3
    for result, size in zip(results, sizes):
        assert set(result) == {"panoptic_seg", "instances", "sem_seg"}
        check_panoptic(result, size)
        check_instances(result["instances"], size)
        assert len(result["instances"]) <= 100  # TEST.DETECTIONS_PER_IMAGE
        assert result["sem_seg"].shape == (NUM_CLASSES, *size)
        assert bool(torch.isfinite(result["sem_seg"]).all())


@pytest.mark.parametrize(
    "flags, keys",
    [
        ((True, False, False), {"panoptic_seg"}),
        ((False, True, False), {"instances"}),
        ((False, False, True), {"sem_seg"}),
    ],
)
def test_eval_output_keys_follow_test_flags(flags, keys):
    panoptic, instance, semantic = flags
    _, model = build(
        [
            "MODEL.KNET.TEST.PANOPTIC_ON", str(panoptic),
            "MODEL.KNET.TEST.INSTANCE_ON", str(instance),
            "MODEL.KNET.TEST.SEMANTIC_ON", str(semantic),
        ]
    )  # fmt: skip
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": random_image(61, 77)}])
    assert set(result) == keys


def test_eval_with_score_threshold_above_every_score():
    """MODEL.KNET.TEST.INSTANCES_SCORE_THRESH (the demo's confidence threshold) may remove every
    instance: the result is an empty Instances, not an error."""
    _, model = build(["MODEL.KNET.TEST.INSTANCES_SCORE_THRESH", "0.999"])
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": random_image(64, 80), "height": 32, "width": 40}])
    instances = result["instances"]
    assert len(instances) == 0 and instances.image_size == (32, 40)
    assert instances.pred_masks.shape == (0, 32, 40)
    check_panoptic(result, (32, 40))


def test_float_input_gives_same_result_as_uint8(panoptic_model):
    model = panoptic_model.eval()
    image = random_image(90, 117, seed=4)
    with torch.no_grad():
        (a,) = model([{"image": image}])
        (b,) = model([{"image": image.float()}])
    assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
    assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
    assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)
    assert torch.equal(a["instances"].scores, b["instances"].scores)
    assert torch.equal(a["sem_seg"], b["sem_seg"])


def test_eval_result_does_not_depend_on_batch_padding(panoptic_model):
    """An image alone and batched with a larger one: same panoptic map and instances up to
    the padding's effect on the bilinear resize (identical when the pad size is the same)."""
    model = panoptic_model.eval()
    small = {"image": random_image(64, 96, seed=5)}
    with torch.no_grad():
        (alone,) = model([small])
        batched = model([small, {"image": random_image(60, 90, seed=6)}])[0]
    assert torch.equal(alone["panoptic_seg"][0], batched["panoptic_seg"][0])
    torch.testing.assert_close(alone["sem_seg"], batched["sem_seg"], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- training
TRAIN_CASES = {
    "regular_batch1": lambda: [regular_sample()],
    "no_annotations": lambda: [make_sample(64, 64, seed=1)],
    "only_crowd": lambda: [make_sample(64, 72, crowd=[(1, 10, 40, 10, 50)], seed=2)],
    "more_objects_than_kernels": lambda: [many_objects_sample()],
    "odd_sizes_batch3": lambda: [
        regular_sample(61, 83, seed=3, bitmasks=True),
        make_sample(70, 59, things=[(1, 3, 40, 3, 30)], stuff=[(5, 40, 70, 0, 59)], seed=4),
        make_sample(33, 97, seed=5),
    ],
    "mixed_batch5": lambda: [
        regular_sample(64, 64, seed=6),
        make_sample(48, 80, seed=7),
        many_objects_sample(72, 90, seed=8),
        make_sample(57, 57, crowd=[(0, 0, 20, 0, 20)], stuff=[(4, 20, 57, 0, 57)], seed=9),
        make_sample(66, 41, stuff=[(6, 0, 66, 0, 41)], seed=10),
    ],
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_training_losses_finite_and_all_params_get_gradients(panoptic_model, case):
    train_step_checks(panoptic_model, TRAIN_CASES[case]())


def test_crowd_pixels_are_not_stuff_targets(panoptic_model):
    model = panoptic_model
    sample = make_sample(64, 72, crowd=[(1, 10, 40, 10, 50)], stuff=[(5, 40, 64, 0, 72)])
    targets = model.prepare_targets([sample], (64, 96), (16, 24))
    (target,) = targets
    assert target["labels"].numel() == 0 and target["masks"].shape == (0, 16, 24)
    assert target["stuff_labels"].tolist() == [5]  # class 1 (crowd thing) is not stuff
    assert target["stuff_masks"].shape == (1, 16, 24)
    # the stuff target covers the bottom rows only, and the padding is empty
    assert float(target["stuff_masks"][0, :8].max()) == 0.0
    assert float(target["stuff_masks"][0, 11:16, :17].min()) == 1.0
    assert float(target["stuff_masks"][0, :, 19:].max()) == 0.0


def test_prepare_targets_downsamples_padded_masks(panoptic_model):
    sample = regular_sample(61, 83)
    (target,) = panoptic_model.prepare_targets([sample], (64, 96), (16, 24))
    masks = target["masks"]
    assert masks.shape == (3, 16, 24) and masks.dtype == torch.float32
    padded = torch.zeros(3, 64, 96)
    padded[:, :61, :83] = sample["instances"].gt_masks.float()
    expected = torch.nn.functional.interpolate(
        padded[None], size=(16, 24), mode="bilinear", align_corners=False
    )[0]
    torch.testing.assert_close(masks, expected)
    assert bool(((masks > 0) & (masks < 1)).any())  # soft targets are kept
    assert sorted(target["stuff_labels"].tolist()) == [4, 6]


@pytest.mark.slow
def test_short_training_run_reduces_loss():
    # stem, res2 and res3 frozen to keep the run short; res4-5, FPN and heads are trained
    cfg, model = build(["MODEL.BACKBONE.FREEZE_AT", "3"], seed=1)
    model.train()
    batch = [regular_sample(64, 64, seed=11), regular_sample(64, 64, seed=12)]
    batch[1]["image"] = batch[1]["image"].flip(-1)
    batch[1]["sem_seg"] = batch[1]["sem_seg"].flip(-1)
    batch[1]["instances"].gt_masks = batch[1]["instances"].gt_masks.flip(-1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    history = []
    with EventStorage():
        for _ in range(30):
            losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            history.append(float(total))
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(history)))
    assert last < 0.5 * first, history
    # the trained model's predictions on its training images form valid panoptic outputs
    model.eval()
    with torch.no_grad():
        results = model([{"image": x["image"]} for x in batch])
    for result in results:
        check_panoptic(result, (64, 64))
        assert len(result["panoptic_seg"][1]) > 0


def test_instance_only_variant_trains_and_infers():
    cfg, model = build(INSTANCE_ONLY)
    assert model.kernel_head.initial_head.num_stuff_classes == 0
    batch = [
        make_sample(64, 80, things=[(0, 5, 30, 5, 35), (3, 30, 60, 40, 75)], seed=13),
        make_sample(59, 61, seed=14),
        many_objects_sample(seed=15),
    ]
    for sample in batch:
        del sample["sem_seg"]  # the instance mapper gives no sem_seg
    train_step_checks(model, batch, rank=False)
    model.eval()
    with torch.no_grad():
        results = model([{"image": random_image(99, 121, seed=16), "height": 50, "width": 60}])
    assert set(results[0]) == {"instances"}
    check_instances(results[0]["instances"], (50, 60), num_thing=4)


def test_model_from_explicit_arguments():
    cfg = get_knet_cfg(TOY_CONFIG, SMALL)
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    pixel_decoder = build_pixel_decoder(cfg, backbone.output_shape())
    channels, stages = 64, 2
    kernel_head = KNetIterativeKernelHead(
        initial_head=ConvKernelHead(
            channels=channels,
            num_proposals=NUM_PROPOSALS,
            num_classes=NUM_CLASSES,
            num_thing_classes=NUM_THING,
        ),
        stages=[
            KernelUpdateHead(
                num_classes=NUM_CLASSES,
                channels=channels,
                num_heads=4,
                dim_feedforward=128,
                updator_channels=channels,
            )
            for _ in range(stages)
        ],
    )
    criterion = KNetCriterion(
        matcher=HungarianMatcher(),
        num_classes=NUM_CLASSES,
        num_thing_classes=NUM_THING,
        num_proposals=NUM_PROPOSALS,
        stage_loss_weights=[1.0] * stages,
    )
    model = KNet(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        kernel_head=kernel_head,
        criterion=criterion,
        size_divisibility=32,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        postprocessor=KNetPostProcessor(
            num_thing_classes=NUM_THING,
            panoptic_on=True,
            instance_on=True,
            semantic_on=False,
        ),
    )
    model.train()
    with EventStorage():
        losses = model([regular_sample(), make_sample(50, 70, seed=17)])
    assert set(losses) == expected_loss_keys(num_stages=stages)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": random_image(75, 101)}])
    assert set(result) == {"panoptic_seg", "instances"}
    check_panoptic(result, (75, 101))


def test_panoptic_without_stuff_classes_is_rejected():
    cfg = get_knet_cfg(TOY_CONFIG, SMALL)
    backbone = build_backbone(cfg)
    with pytest.raises(ValueError, match="stuff"):
        KNet(
            backbone=backbone,
            pixel_decoder=build_pixel_decoder(cfg, backbone.output_shape()),
            kernel_head=torch.nn.Identity(),
            criterion=KNetCriterion(
                matcher=HungarianMatcher(),
                num_classes=4,
                num_thing_classes=4,
                num_proposals=NUM_PROPOSALS,
            ),
            size_divisibility=32,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            postprocessor=KNetPostProcessor(
                num_thing_classes=4,
                panoptic_on=True,
                instance_on=True,
                semantic_on=False,
            ),
        )
