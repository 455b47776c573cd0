"""Video K-Net's model: converted official weights against the official computation, the
association losses against loop implementations, training and frame-by-frame inference.

The released video checkpoints cannot be downloaded here: ``references.layouts`` writes synthetic
ones in the official layout (narrowed widths, the real key pattern), converted by the project's
converter and compared in float64 with ``references.video_knet`` (tolerance 1e-10 relative; 1e-5
in float32).
"""

import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList, Instances
from references.layouts import (
    head_opts,
    make_official_state_dict,
    make_video_knet_state_dict,
    resnet_opts,
)
from references.video_knet import (
    ref_association_embedding,
    ref_group_features,
    ref_hard_mined_l2,
    ref_kernel_fusion,
    ref_kernel_link,
    ref_multi_positive_cross_entropy,
)
from scripts import REPO

from knet.conversion import CheckpointKeyError, convert_official_knet_state_dict
from knet.conversion.official import describe_official_knet_state_dict, model_state_shapes
from knet.engine import get_knet_cfg
from knet.export import ExportedKNet, KNetExportModule, export_onnx, export_torchscript
from knet.modeling.criterion.association import (
    association_losses,
    association_targets,
    hard_mined_l2,
    multi_positive_cross_entropy,
)
from knet.modeling.postprocessing import detectron2_outputs

KITTI = str(REPO / "configs/video/video_knet_R50_kitti_step.yaml")
SMALL = dict(channels=32, ffn_channels=64, num_proposals=8, base_width=8)
OPTS = resnet_opts(8) + head_opts(32, 64, 8) + ["MODEL.KNET.VIDEO.EMBED_DIM", "32"]
OPTS += ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]


def video_cfg(*opts: str):
    return get_knet_cfg(KITTI, OPTS + list(opts))


@pytest.fixture(scope="module")
def official_video():
    return make_video_knet_state_dict(num_classes=19, link_ffn_channels=64, **SMALL)


@pytest.fixture(scope="module")
def converted_model(official_video):
    cfg = video_cfg()
    converted = convert_official_knet_state_dict(official_video, model_state_shapes(cfg))
    model = build_model(cfg).double().eval()
    incompatible = model.load_state_dict({k: v.double() for k, v in converted.items()}, False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return model


def test_video_checkpoint_detected_and_unused_links_dropped(official_video):
    info = describe_official_knet_state_dict(official_video)
    assert info.task == "video panoptic" and info.num_classes == 19 and info.num_stages == 3
    converted = convert_official_knet_state_dict(official_video, model_state_shapes(video_cfg()))
    link_keys = sorted(k for k in converted if k.startswith("kernel_link."))
    assert len(link_keys) == 12  # one stage's attention (4), two norms (4), FFN (4)
    assert len([k for k in converted if k.startswith("association_head.")]) == 11
    assert not any("previous" in k or "link_ffn" in k for k in converted)
    stage2 = "roi_head.mask_head.2."
    assert (
        converted["kernel_link.ffn.2.weight"] is official_video[stage2 + "link_ffn.layers.1.weight"]
    )


def test_converted_link_and_embedding_equal_the_official_forward(converted_model, official_video):
    """KL and KAE of the converted model vs the official computation from the official keys."""
    g = torch.Generator().manual_seed(0)
    kernels = torch.randn(1, 27, 32, generator=g, dtype=torch.float64)  # 8 things + 19 stuff
    previous = torch.randn(1, 27, 32, generator=g, dtype=torch.float64)
    state = {k: v.double() for k, v in official_video.items()}
    with torch.no_grad():
        linked = converted_model.kernel_link(kernels, previous)[0]
        embedded = converted_model.association_head(linked[:8])
    expected = ref_kernel_link(state, "roi_head.mask_head.2.", kernels[0], previous[0], 8)
    expected_embedding = ref_association_embedding(state, expected[:8])
    for got, ref in ((linked, expected), (embedded, expected_embedding)):
        assert ((got - ref).abs().max() / ref.abs().max()) < 1e-10
    model32 = copy.deepcopy(converted_model).float()
    with torch.no_grad():
        linked32 = model32.kernel_link(kernels.float(), previous.float())[0]
    assert ((linked32.double() - expected).abs().max() / expected.abs().max()) < 1e-5


def test_converted_kernel_fusion_equals_the_official_forward():
    """Kernel fusion (the official update_dynamic_cov): converted into the last stage, its
    output equals the official computation from the official keys; stages 0 and 1's copies are
    dropped."""
    official = make_video_knet_state_dict(
        num_classes=19, link_ffn_channels=64, fusion=True, **SMALL
    )
    cfg = video_cfg("MODEL.KNET.VIDEO.KERNEL_FUSION", "True")
    converted = convert_official_knet_state_dict(official, model_state_shapes(cfg))
    assert len([k for k in converted if ".fusion." in k]) == 20 + 12
    model = build_model(cfg).double().eval()
    model.load_state_dict({k: v.double() for k, v in converted.items()})
    g = torch.Generator().manual_seed(0)
    group, kernels, previous = (
        torch.randn(1, 27, 32, generator=g, dtype=torch.float64) for _ in range(3)
    )
    with torch.no_grad():
        fused = model.kernel_head.stages[2].fusion(group, kernels, previous)[0]
    state = {k: v.double() for k, v in official.items()}
    expected = ref_kernel_fusion(state, "roi_head.mask_head.2.", group[0], kernels[0], previous[0])
    assert ((fused - expected).abs().max() / expected.abs().max()) < 1e-10


def test_converted_update_link_equals_the_official_forward():
    """The "update" tracking link of the Swin configs (``*_track`` modules): the previous
    kernels updated with the last stage's group features (its input masks, its feat_transform),
    then linked; equal to the official computation from the official keys, in training (the
    reference frame's kernels) and at inference (the memory)."""
    official = make_video_knet_state_dict(
        num_classes=19, link_ffn_channels=64, link_type="update", **SMALL
    )
    cfg = video_cfg("MODEL.KNET.VIDEO.LINK_TYPE", "update")
    converted = convert_official_knet_state_dict(official, model_state_shapes(cfg))
    assert len([k for k in converted if k.startswith("kernel_link.")]) == 20 + 12
    model = build_model(cfg).double().eval()
    model.load_state_dict({k: v.double() for k, v in converted.items()})
    g = torch.Generator().manual_seed(0)
    kernels, previous = (torch.randn(1, 27, 32, generator=g, dtype=torch.float64) for _ in "kp")
    features = torch.randn(1, 32, 5, 6, generator=g, dtype=torch.float64)
    masks = torch.randn(1, 27, 5, 6, generator=g, dtype=torch.float64)
    outputs = {"kernels": kernels, "features": features, "last_input_masks": masks}
    with torch.no_grad():
        linked = model.track_kernels(outputs, previous)[0]
    state = {k: v.double() for k, v in official.items()}
    stage = "roi_head.mask_head.2."
    group = ref_group_features(state, stage, features[0], masks[0])
    expected = ref_kernel_fusion(state, stage, group, kernels[0], previous[0], suffix="_track")
    assert ((linked - expected).abs().max() / expected.abs().max()) < 1e-10
    assert "last_input_masks" in model.extra_predictions  # inference keeps what it reads
    torch.manual_seed(0)
    video = build_model(video_cfg("MODEL.KNET.VIDEO.LINK_TYPE", "update", *EVAL_OPTS)).eval()
    with torch.no_grad():
        outputs = [
            video([{**f, "video_id": "a", "frame_index": i}])[0] for i, f in enumerate(frames(2))
        ]
    assert all("panoptic_seg" in o for o in outputs) and video.memory is not None
    with pytest.raises(ValueError, match="LINK_TYPE"):
        build_model(video_cfg("MODEL.KNET.VIDEO.LINK_TYPE", "attention"))


def test_kernel_fusion_reads_the_previous_frame_in_training_and_inference():
    torch.manual_seed(0)
    cfg = video_cfg("MODEL.KNET.VIDEO.KERNEL_FUSION", "True", *EVAL_OPTS)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    x = frame_input(g, [1, 2, 3])
    x["reference"] = frame_input(g, [2, 1])
    sum(model([x]).values()).backward()
    fusion = model.kernel_head.stages[-1].fusion
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())
    model.eval()
    image = build_model(video_cfg(*EVAL_OPTS, "MODEL.META_ARCHITECTURE", "KNet")).eval()
    keys = image.state_dict().keys()
    image.load_state_dict({k: v for k, v in model.state_dict().items() if k in keys})
    first, second = frames(2)
    with torch.no_grad():
        video_first = model([{**first, "video_id": "a", "frame_index": 0}])[0]
        model([{**second, "video_id": "a", "frame_index": 1}])  # reads frame a0's kernels
        fused = model.predict(model.preprocess_image([second]).tensor)  # memory: frame a1's
        again = model([{**second, "video_id": "b", "frame_index": 0}])[0]  # no previous frame
        plain = image.predict(image.preprocess_image([second]).tensor)
        expected_first, expected = image([first])[0], image([second])[0]
    # a first frame is the image model's; later frames are not (the last stage reads the memory)
    assert without_tracks(video_first)[1] == expected_first["panoptic_seg"][1]
    assert torch.equal(without_tracks(again)[0], expected["panoptic_seg"][0])
    assert not torch.allclose(fused["cls_logits"], plain["cls_logits"])


def test_image_checkpoint_initialises_a_video_model():
    """An official image K-Net converts for the video config: the video heads keep their
    initial values; an official video checkpoint's missing key is still an error."""
    image = make_official_state_dict(num_classes=19, **SMALL)
    converted = convert_official_knet_state_dict(image, model_state_shapes(video_cfg()))
    assert not any(k.startswith(("kernel_link.", "association_head.")) for k in converted)
    broken = make_video_knet_state_dict(num_classes=19, link_ffn_channels=64, **SMALL)
    del broken["track_head.fc_embed.bias"]
    with pytest.raises(CheckpointKeyError, match="association_head.track_embed.bias"):
        convert_official_knet_state_dict(broken, model_state_shapes(video_cfg()))


def test_initial_video_heads_follow_the_official_init():
    model = build_model(video_cfg())
    link, head = model.kernel_link, model.association_head
    assert torch.all(link.attention.in_proj_bias == 0) and torch.all(
        link.attention.out_proj.bias == 0
    )
    bound = (6 / (32 + 96)) ** 0.5  # Xavier-uniform of the (3C, C) stacked projection
    assert link.attention.in_proj_weight.abs().max() <= bound
    assert link.attention.in_proj_weight.abs().max() > 0.9 * bound
    assert torch.all(head.track_embed.bias == 0) and head.track_embed.weight.std() < 0.012
    assert head.embed_fcs[0].bias is None and head.track_fcs[0].bias.abs().max() == 0


# ------------------------------------------------------------------------------- losses
def random_targets(g: torch.Generator, n: int, m: int) -> torch.Tensor:
    key_ids = torch.randint(0, 6, (n,), generator=g)
    ref_ids = torch.randperm(8, generator=g)[:m]
    return association_targets(key_ids, ref_ids)[0]


@pytest.mark.parametrize("seed", range(6))
def test_association_losses_equal_loop_implementations(seed):
    g = torch.Generator().manual_seed(seed)
    n, m = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
    targets = random_targets(g, n, m)
    similarity = torch.randn(n, m, generator=g, dtype=torch.float64) * 3
    weights = (targets.sum(1) > 0).double()
    got = multi_positive_cross_entropy(similarity, targets.double(), weights)
    assert got.item() == pytest.approx(ref_multi_positive_cross_entropy(similarity, targets), 1e-12)
    cosine = torch.rand(n, m, generator=g, dtype=torch.float64) * 2 - 1
    got_l2 = hard_mined_l2(cosine, targets.double(), 3, 0.0, 0.1)
    assert got_l2.item() == pytest.approx(ref_hard_mined_l2(cosine, targets), 1e-12)


def test_hard_mining_keeps_the_hardest_negatives():
    targets = torch.zeros(2, 6)
    targets[0, 0] = 1  # one positive: 11 negatives > 3 x (1 + 1): keep the 3 hardest
    cosine = torch.tensor([[0.9, 0.05, 0.5, 0.6, 0.7, 0.0], [0.95, 0.2, 0.3, 0.0, 0.0, 0.0]])
    kept = [(0.9 - 1) ** 2, 0.85**2, 0.6**2, 0.5**2]
    assert hard_mined_l2(cosine, targets).item() == pytest.approx(sum(kept) / 4, 1e-6)


def test_association_losses_are_batch_means_and_zero_without_positives():
    g = torch.Generator().manual_seed(3)
    key = [torch.randn(3, 16, generator=g, requires_grad=True), torch.randn(0, 16)]
    ref = [torch.randn(4, 16, generator=g), torch.randn(2, 16)]
    targets = [association_targets(torch.tensor([1, 2, 9]), torch.tensor([2, 1, 7, 8]))[0]]
    targets.append(torch.zeros(0, 2))
    losses = association_losses(key, ref, targets, {"track": 0.25, "track_aux": 1.0})
    first = multi_positive_cross_entropy(key[0] @ ref[0].T, targets[0], torch.tensor([1, 1, 0.0]))
    assert losses["loss_track"].item() == pytest.approx(0.25 * first.item() / 2, 1e-6)
    losses["loss_track"].backward()
    assert key[0].grad.abs().sum() > 0


# ------------------------------------------------------------------------------- model
def frame_input(g: torch.Generator, ids: list[int], size=(64, 96)) -> dict:
    """A synthetic training frame: one square per object id at a random place, classes from
    the id, stuff class 5 elsewhere."""
    h, w = size
    masks = torch.zeros(len(ids), h, w, dtype=torch.bool)
    for i in range(len(ids)):
        y, x = (
            int(torch.randint(0, h - 20, (1,), generator=g)),
            int(torch.randint(0, w - 20, (1,), generator=g)),
        )
        masks[i, y : y + 20, x : x + 20] = True
    sem = torch.full((h, w), 5, dtype=torch.int64)
    classes = torch.tensor([i % 2 for i in ids])
    for mask, c in zip(masks, classes):
        sem[mask] = c
    instances = Instances(size, gt_masks=masks, gt_classes=classes, gt_ids=torch.tensor(ids))
    image = torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8)
    return {"image": image, "instances": instances, "sem_seg": sem}


def test_training_step_gives_both_frames_and_association_losses():
    torch.manual_seed(0)
    model = build_model(video_cfg()).train()
    g = torch.Generator().manual_seed(1)
    batch = []
    for ids in ([1, 2, 3], [4, 5]):
        x = frame_input(g, ids)
        x["reference"] = frame_input(g, [ids[1], ids[0], 7])
        batch.append(x)
    losses = model(batch)
    assert {"loss_track", "loss_track_aux", "s2_loss_cls", "s2_loss_cls_ref"} <= set(losses)
    assert {"loss_rpn_seg_ref", "s0_loss_dice_ref"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_track"] > 0
    sum(losses.values()).backward()
    for module in (model.kernel_link, model.association_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_training_inputs_without_ids_are_refused():
    model = build_model(video_cfg()).train()
    x = frame_input(torch.Generator().manual_seed(0), [1, 2])
    x["reference"] = copy.deepcopy(x)
    x["instances"].remove("gt_ids")
    with pytest.raises(ValueError, match="gt_ids"):
        model([x])


# ------------------------------------------------------------------------------- inference
EVAL_OPTS = (
    "MODEL.KNET.TEST.PANOPTIC_THING_SCORE_THRESH", "0.0",
    "MODEL.KNET.VIDEO.TRACKER.INIT_SCORE_THRESH", "0.0",
    "MODEL.KNET.VIDEO.TRACKER.OBJ_SCORE_THRESH", "0.0",
)  # fmt: skip


def frames(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 255, (3, 64, 96), generator=g, dtype=torch.uint8)}
        for _ in range(n)
    ]


def without_tracks(output: dict):
    seg, segments = output["panoptic_seg"]
    return seg, [{k: v for k, v in s.items() if k != "track_id"} for s in segments]


def test_frame_outputs_equal_the_image_model():
    """The network and the panoptic merge are the image model's: with the same weights, every
    frame's panoptic output equals image K-Net's (the link module at its initial state or not);
    thing segments gain a track id."""
    torch.manual_seed(0)
    video = build_model(video_cfg(*EVAL_OPTS)).eval()
    image = build_model(video_cfg(*EVAL_OPTS, "MODEL.META_ARCHITECTURE", "KNet")).eval()
    state = {
        k: v
        for k, v in video.state_dict().items()
        if not k.startswith(("kernel_link.", "association_head."))
    }
    image.load_state_dict(state)
    with torch.no_grad():
        for i, x in enumerate(frames(3)):
            ours = video([{**x, "video_id": "a", "frame_index": i}])[0]
            expected = image([x])[0]
            seg, segments = without_tracks(ours)
            assert torch.equal(seg, expected["panoptic_seg"][0])
            assert segments == expected["panoptic_seg"][1]
            assert segments and all(
                s["track_id"] >= 1 for s in ours["panoptic_seg"][1] if s["isthing"]
            )


def crafted_frame(objects: dict[int, tuple[int, int, int]], identities: torch.Tensor):
    """Predictions of a 64 x 96 frame: thing kernel ``slot`` shows object ``o`` (class o % 2,
    score decreasing with o,
    an 8 x 8 square at stride 2 (y, x)) with kernel ``identities[o]``; stuff kernel 8 (road)
    covers the rest. {o: (slot, y, x)} -> (predictions, batched_inputs, images)."""
    n, k, c = 8 + 17, 19, identities.shape[1]
    cls = torch.full((1, n, k), -10.0)
    masks = torch.full((1, n, 32, 48), -10.0)
    kernels = torch.zeros(1, n, c)
    cls[0, 8, 2], masks[0, 8] = 0.0, 10.0  # stuff kernel 8 = class 2 everywhere, score 0.5
    for o, (slot, y, x) in objects.items():
        cls[0, slot, o % 2] = 6.0 - o / 2  # distinct scores: a new object comes last
        masks[0, slot, y : y + 8, x : x + 8] = 10.0
        kernels[0, slot] = identities[o]
    seg_logits = torch.zeros(1, k, 8, 12)  # the semantic filter keeps every pixel
    seg_logits[:, 0] = 1
    predictions = {"cls_logits": cls, "mask_logits": masks, "kernels": kernels}
    predictions["seg_logits"] = seg_logits
    return predictions, ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)])


def test_ids_follow_the_objects_across_frames_and_restart_with_a_new_video():
    """Track ids follow the kernels' identities (not their slots) from frame to frame."""
    torch.manual_seed(0)
    model = build_model(video_cfg("MODEL.KNET.VIDEO.LINK_PREVIOUS", "False")).eval()
    # embeddings = kernels, orthogonal per object: the dot products make matching decisive
    model.association_head = torch.nn.Identity()
    identities = torch.eye(32)[:4] * 10

    def track_ids(video_id, frame_index, objects):
        predictions, images = crafted_frame(objects, identities)
        inputs = [{"video_id": video_id, "frame_index": frame_index}]
        model.frame = model.next_frame_index(inputs[0])  # what forward does before the network
        with torch.no_grad():
            out = model.inference(predictions, inputs, images)[0]
        seg, segments = out["panoptic_seg"]
        ids = {}
        for o, (_, y, x) in objects.items():
            segment = next(s for s in segments if s["id"] == int(seg[2 * y + 4, 2 * x + 4]))
            ids[o] = segment["track_id"]
        return ids

    first = track_ids("a", 0, {0: (0, 2, 2), 1: (1, 2, 20), 2: (2, 20, 2)})
    assert sorted(first.values()) == [1, 2, 3]
    moved = {0: (5, 4, 4), 1: (0, 4, 22), 2: (3, 22, 6), 3: (1, 20, 30)}  # new slots, one new
    second = track_ids("a", 1, moved)
    assert {o: second[o] for o in first} == first and second[3] == 4
    assert model.tracker.num_tracks == 4
    assert track_ids("b", 0, {2: (0, 2, 2)}) == {2: 1}  # a new video: the counter restarts
    model.reset()
    assert model.memory is None and model.tracker.empty


def test_video_configs_train_the_official_loss_set():
    """The initial head keeps its rank loss, the stages lose theirs; the initial semantic loss
    is the softmax cross-entropy, background ignored, over all pixels (mmdet's mean)."""
    torch.manual_seed(0)
    model = build_model(video_cfg()).train()
    g = torch.Generator().manual_seed(1)
    x = frame_input(g, [1, 2, 3])
    x["reference"] = frame_input(g, [2, 1])
    losses = model([x])
    assert "loss_rpn_rank" in losses and not any(k.startswith("s0_loss_rank") for k in losses)
    criterion = model.criterion
    logits = torch.randn(2, 19, 6, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 20, (2, 6, 5), generator=g)  # 19 = background
    expected = 0.0
    for b, i, j in torch.cartesian_prod(*(torch.arange(n) for n in (2, 6, 5))).tolist():
        c = int(target[b, i, j])
        if c < 19:
            expected -= torch.log_softmax(logits[b, :, i, j], 0)[c].item()
    labels = torch.full((2, 0), 19)
    stuff = [{"stuff_labels": t.unique()[t.unique() < 19], "stuff_masks": None} for t in target]
    for entry, t in zip(stuff, target):  # every pixel's class as a stuff target
        entry["stuff_masks"] = (t[None] == entry["stuff_labels"][:, None, None]).double()
    positive = torch.zeros(2, 0, dtype=torch.bool)
    got = criterion.semantic_loss(logits, labels, positive, [], stuff)
    assert got.item() == pytest.approx(expected / target.numel(), rel=1e-10)


def test_periodic_evaluation_of_videos_in_several_processes_is_refused_before_training():
    from knet.engine.trainer import check_periodic_evaluation

    cfg = video_cfg("DATASETS.TEST", "('knet_toy_video_val',)", "TEST.EVAL_PERIOD", "100")
    check_periodic_evaluation(cfg, 1)
    with pytest.raises(ValueError, match="TEST.EVAL_PERIOD 0"):
        check_periodic_evaluation(cfg, 2)
    cfg.defrost()
    cfg.TEST.EVAL_PERIOD = 0
    check_periodic_evaluation(cfg, 2)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_video_model_tracks_as_the_eager_model(fmt, tmp_path):
    """The exported graph computes the frame's outputs and the tracking inputs (linked,
    embedded kernels; thing pixels); the runner tracks in Python: the same segments and track
    ids as the eager model over a video, and a reset starts the ids again."""
    torch.manual_seed(0)
    cfg = video_cfg(*EVAL_OPTS)
    model = build_model(cfg).eval()
    with torch.no_grad():  # confident, sharp thing masks: random weights predict no thing
        model.kernel_head.stages[-1].fc_cls.bias[:2] += 4.0
        model.kernel_head.stages[-1].fc_mask.weight.mul_(3.0)
    module = KNetExportModule(model)
    sample = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    path = str(tmp_path / ("model.onnx" if fmt == "onnx" else "model.ts"))
    if fmt == "onnx":
        export_onnx(module, sample, path, module.metadata(cfg))
    else:
        export_torchscript(module, sample, path, module.metadata(cfg), "tracing")
    exported = ExportedKNet(path)
    video = frames(3, seed=2)
    model.reset()
    tracked = 0
    for i, frame in enumerate(video + video[:1]):
        if i == 3:  # a new video
            model.reset()
            exported.reset()
        with torch.no_grad():
            eager = model([{**frame, "video_id": "a" if i < 3 else "b", "frame_index": i % 3}])[0]
        got = detectron2_outputs(exported(frame["image"]))
        (ids, info), (got_ids, got_info) = eager["panoptic_seg"], got["panoptic_seg"]
        assert int((got_ids != ids).sum()) <= 1e-3 * ids.numel()
        keys = ("id", "category_id", "isthing", "track_id")
        assert [tuple(s[k] for k in keys) for s in got_info] == [
            tuple(s[k] for k in keys) for s in info
        ]
        tracked += sum(s["track_id"] > 0 for s in info)
    assert tracked == 4  # one thing per frame, tracked in each (the comparison is not trivial)
    fused = build_model(video_cfg("MODEL.KNET.VIDEO.KERNEL_FUSION", "True")).eval()
    with pytest.raises(ValueError, match="kernel fusion"):
        KNetExportModule(fused)
