"""Clip-level Video K-Net for video instance segmentation (``VideoKNetClip``): converted
official weights against the official computation, tube targets and matching, training and
whole-video inference.

The released VIS checkpoints cannot be downloaded here: ``references.layouts`` writes synthetic
ones in the official layout (narrowed widths, the real key pattern), compared in float64 with
``references.video_knet.ref_clip_head`` (tolerance 1e-10 relative; 1e-5 in float32).
"""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import Instances
from PIL import Image
from references.layouts import (
    head_opts,
    make_knet_track_state_dict,
    make_official_state_dict,
    resnet_opts,
)
from references.video_knet import ref_clip_head
from scripts import REPO, load_script

from knet.conversion import convert_official_knet_state_dict
from knet.conversion.official import describe_official_knet_state_dict, model_state_shapes
from knet.data.datasets.video import YTVIS_2019_CLASSES
from knet.engine import get_knet_cfg
from knet.modeling.kernel_head import KernelUpdateHead
from knet.modeling.meta_arch.video_knet_clip import tube_targets

YTVIS = str(REPO / "configs/video/video_knet_clip_R50_ytvis.yaml")
SMALL = dict(channels=32, ffn_channels=64, num_proposals=8, base_width=8)
OPTS = resnet_opts(8) + head_opts(32, 64, 8) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]


def clip_cfg(*opts: str):
    return get_knet_cfg(YTVIS, OPTS + list(opts))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def official_track():
    return make_knet_track_state_dict(num_classes=40, **SMALL)


@pytest.fixture(scope="module")
def converted_model(official_track):
    cfg = clip_cfg()
    converted = convert_official_knet_state_dict(official_track, model_state_shapes(cfg))
    model = build_model(cfg).double().eval()
    incompatible = model.load_state_dict({k: v.double() for k, v in converted.items()}, False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return model


def test_clip_checkpoint_detected_and_converted(official_track):
    info = describe_official_knet_state_dict(official_track)
    assert info.task == "video instance" and info.num_classes == 40 and info.num_stages == 3
    converted = convert_official_knet_state_dict(official_track, model_state_shapes(clip_cfg()))
    clip_keys = [k for k in converted if k.startswith("clip_head.stages.")]
    assert len(clip_keys) == 44 + 44 + 39  # the last stage has no class branch
    assert not any(k.startswith("clip_head.stages.2.fc_cls") for k in converted)
    source = official_track["tracker.mask_head.1.ffn.layers.1.weight"]
    assert converted["clip_head.stages.1.ffn.3.weight"] is source


def test_converted_clip_head_equals_the_official_forward(converted_model, official_track):
    g = torch.Generator().manual_seed(0)
    t, n, c, h, w = 3, 8, 32, 6, 7
    features = torch.randn(1, t, c, h, w, generator=g, dtype=torch.float64)
    kernels = torch.randn(1, t, n, c, generator=g, dtype=torch.float64)
    masks = torch.randn(1, t, n, h, w, generator=g, dtype=torch.float64)
    state = {k: v.double() for k, v in official_track.items()}
    with torch.no_grad():
        (out,) = converted_model.clip_head(features, kernels, masks)
    logits, expected_masks = ref_clip_head(state, features[0], kernels[0], masks[0])
    upsampled = F.interpolate(expected_masks, scale_factor=2, mode="bilinear", align_corners=False)
    assert relative_error(out["cls_logits"][0], logits) < 1e-10
    assert relative_error(out["mask_logits"][0], upsampled) < 1e-10
    head32 = copy.deepcopy(converted_model.clip_head).float()
    with torch.no_grad():
        (out32,) = head32(features.float(), kernels.float(), masks.float())
    assert relative_error(out32["cls_logits"][0].double(), logits) < 1e-5
    assert relative_error(out32["mask_logits"][0].double(), upsampled) < 1e-5


def test_clip_of_identical_frames_is_the_image_stage():
    """With T copies of one frame, the clip-mode stage (group features averaged over frames) is
    the image stage on that frame, and its masks are the image masks on every frame."""
    torch.manual_seed(0)
    stage = KernelUpdateHead(
        num_classes=5, channels=16, num_heads=4, dim_feedforward=32, updator_channels=16
    )
    stage = stage.double().eval()
    features = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    kernels = torch.randn(2, 7, 16, dtype=torch.float64)
    masks = torch.randn(2, 7, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        image = stage(features, kernels, masks)
        clip = stage(
            features[:, None].expand(2, 3, 16, 5, 6), kernels, masks[:, None].repeat(1, 3, 1, 1, 1)
        )
    torch.testing.assert_close(clip[0], image[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(clip[2], image[2], rtol=1e-12, atol=1e-12)
    for t in range(3):
        torch.testing.assert_close(clip[1][:, t], image[1], rtol=1e-12, atol=1e-12)


def test_tube_targets_stack_the_frames_of_each_object():
    def frame(ids, labels, value):
        masks = torch.zeros((len(ids), 2, 3)) + value + torch.arange(len(ids))[:, None, None]
        as_long = {"dtype": torch.int64}
        return {"ids": torch.tensor(ids, **as_long), "labels": torch.tensor(labels, **as_long)} | {
            "masks": masks
        }

    # clip 0: object 7 in frames 0 and 1, object 3 in frame 1 only; clip 1: no object in frame 0
    targets = [frame([7], [2], 1), frame([3, 7], [0, 2], 10), frame([], [], 0), frame([5], [1], 4)]
    tubes = tube_targets(targets, num_frames=2)
    assert tubes[0]["labels"].tolist() == [0, 2]  # ids 3, 7 ascending
    assert tubes[0]["masks"].shape == (2, 4, 3)  # frames stacked vertically
    assert tubes[0]["masks"][0, :2].eq(0).all() and tubes[0]["masks"][0, 2:].eq(10).all()
    assert tubes[0]["masks"][1, :2].eq(1).all() and tubes[0]["masks"][1, 2:].eq(11).all()
    assert tubes[1]["labels"].tolist() == [1]
    assert tubes[1]["masks"][0, :2].eq(0).all() and tubes[1]["masks"][0, 2:].eq(4).all()


TOY = str(REPO / "configs/toy/video_knet_R18_toy.yaml")
TOY_OPTS = [
    "MODEL.META_ARCHITECTURE", "VideoKNetClip",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2", "MODEL.KNET.NUM_THING_CLASSES", "2",
    "MODEL.KNET.RANK_WEIGHT", "0.0", "MODEL.KNET.TEST.PANOPTIC_ON", "False",
    "MODEL.KNET.TEST.INSTANCE_ON", "True", "MODEL.RESNETS.NORM", "BN",
    "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
]  # fmt: skip


def _toy_clip(num_frames: int, train: bool = True) -> dict:
    """A disc moving right and a block that appears in the last frame, on noise."""
    g = torch.Generator().manual_seed(1)
    frames = []
    for t in range(num_frames):
        image = torch.randint(0, 60, (3, 64, 96), generator=g, dtype=torch.uint8)
        masks = torch.zeros(2, 64, 96, dtype=torch.bool)
        masks[0, 10:30, 10 + 4 * t : 30 + 4 * t] = True
        masks[1, 36:60, 50:74] = t == num_frames - 1
        image[:, masks[0]] = 220
        image[0, masks[1]] = 250
        frame = {"image": image, "height": 64, "width": 96}
        if train:
            keep = masks.flatten(1).any(1)
            frame["instances"] = Instances(
                (64, 96),
                gt_masks=masks[keep],
                gt_classes=torch.tensor([0, 1])[keep],
                gt_ids=torch.tensor([4, 9])[keep],
            )
        frames.append(frame)
    return {"frames": frames}


def test_training_step_gives_frame_and_tube_losses(monkeypatch):
    torch.manual_seed(0)
    model = build_model(get_knet_cfg(TOY, TOY_OPTS)).train()
    matched = []
    match = model.criterion.match
    monkeypatch.setattr(model.criterion, "match", lambda *a: matched.append(a[3]) or match(*a))
    losses = model([_toy_clip(3), _toy_clip(3)])
    tube_keys = sorted(k for k in losses if k.startswith("tracker_"))
    assert tube_keys == [
        *(f"tracker_s{s}_loss_{n}" for s in (0, 1) for n in ("cls", "dice", "mask")),
        "tracker_s2_loss_dice",
        "tracker_s2_loss_mask",
    ]
    assert "s2_loss_cls" in losses and "loss_rpn_seg" in losses  # every frame's image losses
    # the clip stages are matched on their own predictions, the per-frame stage reuses stage 1's
    assert [m for m in matched if m.startswith("clip")] == ["clip_stages[0]", "clip_stages[1]"]
    sum(losses.values()).backward()
    assert model.clip_head.stages[2].fc_mask.weight.grad.abs().sum() > 0
    assert model.kernel_head.stages[0].fc_cls.weight.grad.abs().sum() > 0


def test_training_refuses_frames_without_ids():
    model = build_model(get_knet_cfg(TOY, TOY_OPTS)).train()
    clip = _toy_clip(2)
    for frame in clip["frames"]:
        frame["instances"].remove("gt_ids")
    with pytest.raises(ValueError, match="gt_ids"):
        model([clip])


def test_a_video_is_one_clip_with_one_id_per_object():
    """Whole-video inference: the top-k (kernel, class) pairs of the clip's class scores, each an
    object with a mask in every frame, at the requested output size."""
    torch.manual_seed(0)
    cfg = get_knet_cfg(TOY, TOY_OPTS + ["MODEL.KNET.VIDEO.CLIP_TOPK", "4"])
    model = build_model(cfg).eval()
    video = _toy_clip(3, train=False)
    for f in video["frames"]:
        f.update(height=32, width=48)  # outputs at half the input size
    (out,) = model([video])
    assert out["image_size"] == (32, 48)
    assert out["pred_masks"].shape == (4, 3, 32, 48) and out["pred_masks"].dtype == torch.bool
    assert out["pred_scores"].shape == out["pred_labels"].shape == (4,)
    assert (out["pred_scores"].diff() <= 0).all() and out["pred_labels"].max() < 2
    with torch.no_grad():
        frames = model.preprocess_image(video["frames"])
        outputs = model.kernel_head(*model.pixel_decoder(model.backbone(frames.tensor)))
        (last,) = model.clip_head(*model.clip_inputs(outputs, 3))
    expected = last["cls_logits"][0].sigmoid().flatten().topk(4).values
    torch.testing.assert_close(out["pred_scores"], expected)


@pytest.mark.slow
def test_training_on_a_clip_finds_its_objects_with_one_id_each():
    """60 steps on one 4-frame clip: each object (the moving disc, the block of the last frame)
    is one output of its class whose masks over the frames match its tube."""
    torch.manual_seed(0)
    opts = TOY_OPTS + ["MODEL.KNET.VIDEO.CLIP_TOPK", "4", "MODEL.RESNETS.NORM", "FrozenBN"]
    model = build_model(get_knet_cfg(TOY, opts))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    clip = _toy_clip(4)
    for _ in range(60):
        losses = model([clip])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    (out,) = model.eval()([_toy_clip(4, train=False)])
    empty = torch.zeros(64, 96, dtype=torch.bool)
    frames = [f["instances"] for f in clip["frames"]]
    tubes = {
        label: torch.stack(
            [
                next((m for m, c in zip(i.gt_masks, i.gt_classes) if c == label), empty)
                for i in frames
            ]
        )
        for label in (0, 1)
    }
    for label, tube in tubes.items():
        ious = [
            float((m & tube).sum() / (m | tube).sum())
            for m, c in zip(out["pred_masks"], out["pred_labels"])
            if c == label
        ]
        assert ious and max(ious) > 0.5, (label, ious)


def test_image_checkpoint_initialises_the_clip_model():
    image = make_official_state_dict(num_classes=40, **SMALL)
    converted = convert_official_knet_state_dict(image, model_state_shapes(clip_cfg()))
    assert not any(k.startswith("clip_head.") for k in converted)  # the clip head starts fresh


def _write_ytvis(root, split: str, num_videos: int, num_frames: int) -> None:
    """A YouTube-VIS 2019 folder layout (official json: one annotation per track with
    per-frame RLE, None where absent) of squares moving over noise."""
    rng = np.random.default_rng(0)
    videos, annotations = [], []
    for v in range(1, num_videos + 1):
        names, tracks = [], {1: [], 2: []}
        for t in range(num_frames):
            image = rng.integers(0, 60, (64, 96, 3), dtype=np.uint8)
            person = np.zeros((64, 96), np.uint8, order="F")
            person[8:28, 6 + 5 * t : 26 + 5 * t] = 1
            dog = np.zeros((64, 96), np.uint8, order="F")
            dog[36:60, 40 + 3 * v : 64 + 3 * v] = t % 3 != 1  # hidden in some frames
            image[person > 0], image[dog > 0] = (220, 40, 40), (40, 200, 40)
            name = f"v{v}/{t:05d}.jpg"
            (root / split / "JPEGImages" / f"v{v}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / "JPEGImages" / name, quality=95)
            names.append(name)
            for track, mask in ((1, person), (2, dog)):
                rle = mask_util.encode(mask) if mask.any() else None
                tracks[track].append(
                    rle and {"size": rle["size"], "counts": rle["counts"].decode()}
                )
        videos.append({"id": v, "file_names": names, "height": 64, "width": 96})
        for track, category in ((1, 1), (2, 8)):  # person, dog
            annotations.append(
                {"id": 10 * v + track, "video_id": v, "category_id": category, "iscrowd": 0}
                | {"segmentations": tracks[track]}
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(YTVIS_2019_CLASSES)]
    data = {"videos": videos, "categories": categories}
    if split == "train":
        data["annotations"] = annotations
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"youtube_vis_2019_{split}.json").write_text(json.dumps(data))


@pytest.mark.slow
def test_train_net_trains_on_youtube_vis_and_writes_the_results_file(tmp_path):
    """The user's path: the YouTube-VIS config on data in the official layout (5-frame training
    clips, whole validation videos), a few iterations, then the benchmark's results file."""
    root = tmp_path / "datasets" / "youtube_vis_2019"
    _write_ytvis(root, "train", num_videos=2, num_frames=6)
    _write_ytvis(root, "valid", num_videos=2, num_frames=4)
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "train_net.py"), "--config-file", YTVIS]
    command += [*OPTS, "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()"]
    command += [
        "SOLVER.WARMUP_ITERS",
        "0",
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "DATALOADER.NUM_WORKERS",
    ]
    command += ["0", "INPUT.MIN_SIZE_TEST", "64", "OUTPUT_DIR", str(out)]
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "console.log", "w") as console:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)
    log = (tmp_path / "console.log").read_text()
    assert code.returncode == 0, log[-3000:]
    assert "ytvis_2019_train: 4 clips of 12 frames" in log  # frames 2, 3 of each 6-frame video
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert "tracker_s2_loss_dice" in metrics[-1] or any(
        "tracker_s2_loss_dice" in m for m in metrics
    )
    results = json.loads((out / "inference" / "ytvis_2019_val" / "results.json").read_text())
    assert len(results) == 2 * 10  # 10 objects per video
    assert {r["video_id"] for r in results} == {1, 2}
    assert all(len(r["segmentations"]) == 4 for r in results)


def test_demo_draws_the_objects_of_a_whole_video_in_their_colours():
    demo_predictor = load_script("demo/predictor.py")
    opts = TOY_OPTS + ["MODEL.WEIGHTS", "", "MODEL.KNET.VIDEO.CLIP_TOPK", "3"]
    torch.manual_seed(0)
    cfg = demo_predictor.build_demo_cfg(TOY, opts, confidence_threshold=0.0)
    demo = demo_predictor.VisualizationDemo(cfg, parallel=True)  # (one batch: never parallel)
    assert demo.clip and not demo.parallel
    frames = [
        np.ascontiguousarray(f["image"].permute(1, 2, 0).numpy()[:, :, ::-1])
        for f in _toy_clip(3, train=False)["frames"]
    ]
    drawings = list(demo.run_on_clip(frames))
    assert len(drawings) == 3 and all(d.shape == frames[0].shape for d in drawings)
    torch.manual_seed(0)
    cfg = demo_predictor.build_demo_cfg(TOY, opts, confidence_threshold=1.1)
    plain = list(demo_predictor.VisualizationDemo(cfg).run_on_clip(frames))  # no object
    assert all((d != p).any() for d, p in zip(drawings, plain))  # the 3 objects are drawn
    with pytest.raises(ValueError, match="whole videos"):
        demo.run_on_image(frames[0])
