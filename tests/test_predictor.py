"""Inference through Detectron2's DefaultPredictor and the demo (toy model, CPU)."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes, Instances
from scripts import load_script

import knet  # noqa: F401  (registers the meta-architecture and the toy datasets)

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = str(REPO / "configs" / "toy" / "knet_R18_toy_panoptic.yaml")
HEIGHT, WIDTH = 203, 257  # odd on purpose: exercises padding and the resize back
NUM_CLASSES, NUM_THINGS = 7, 4  # toy config
INSTANCE_ONLY = ["MODEL.KNET.TEST.PANOPTIC_ON", "False", "MODEL.KNET.TEST.SEMANTIC_ON", "False"]
SEMANTIC_ONLY = ["MODEL.KNET.TEST.PANOPTIC_ON", "False", "MODEL.KNET.TEST.INSTANCE_ON", "False"]


@pytest.fixture(scope="module")
def demo_predictor():
    return load_script("demo/predictor.py")


def _cfg(demo_predictor, opts=(), threshold=None):
    base = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    return demo_predictor.build_demo_cfg(TOY_CONFIG, base + list(opts), threshold)


def _toy_like_image(height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    """A BGR uint8 image with a sky band, a grass band and a few filled shapes."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2] = (200, 150, 90)
    img[height // 2 :] = (60, 170, 60)
    for _ in range(3):
        center = (int(rng.integers(20, width - 20)), int(rng.integers(20, height - 20)))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.circle(img, center, int(rng.integers(10, 40)), color, -1)
    return img


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _toy_like_image()


def _seeded(build):
    torch.manual_seed(0)
    return build()


def _thing_segments(predictions) -> int:
    return sum(1 for s in predictions["panoptic_seg"][1] if s["isthing"])


def test_default_predictor_output_contract(demo_predictor, image):
    cfg = _cfg(demo_predictor)
    out = _seeded(lambda: DefaultPredictor(cfg))(image)
    assert set(out) == {"panoptic_seg", "instances", "sem_seg"}

    panoptic_seg, segments_info = out["panoptic_seg"]
    assert panoptic_seg.shape == (HEIGHT, WIDTH)
    assert panoptic_seg.dtype == torch.int32
    assert isinstance(segments_info, list)
    ids = {s["id"] for s in segments_info}
    assert set(panoptic_seg.unique().tolist()) <= ids | {0}
    for s in segments_info:
        assert s["id"] >= 1
        assert isinstance(s["isthing"], bool)
        assert 0 <= s["category_id"] < NUM_CLASSES
        assert s["isthing"] == (s["category_id"] < NUM_THINGS)

    instances = out["instances"]
    assert isinstance(instances, Instances)
    assert instances.image_size == (HEIGHT, WIDTH)
    n = len(instances)
    assert n > 0  # config INSTANCES_SCORE_THRESH is 0.0
    assert instances.pred_masks.shape == (n, HEIGHT, WIDTH)
    assert instances.pred_masks.dtype in (torch.bool, torch.float32, torch.uint8)
    assert isinstance(instances.pred_boxes, Boxes)
    assert instances.pred_boxes.tensor.shape == (n, 4)
    assert instances.pred_boxes.tensor.dtype == torch.float32
    assert instances.scores.shape == (n,) and instances.scores.dtype == torch.float32
    assert instances.pred_classes.dtype == torch.int64
    assert int(instances.pred_classes.min()) >= 0 and int(instances.pred_classes.max()) < NUM_THINGS

    sem_seg = out["sem_seg"]
    assert sem_seg.shape == (NUM_CLASSES, HEIGHT, WIDTH)
    assert sem_seg.dtype == torch.float32


@pytest.mark.parametrize(
    "opts, expected_keys",
    [
        ([], {"panoptic_seg", "instances", "sem_seg"}),
        (INSTANCE_ONLY, {"instances"}),
        (SEMANTIC_ONLY, {"sem_seg"}),
    ],
    ids=["panoptic", "instance_only", "semantic_only"],
)
def test_run_on_image_draws_at_input_size(demo_predictor, image, opts, expected_keys):
    cfg = _cfg(demo_predictor, opts)
    demo = _seeded(lambda: demo_predictor.VisualizationDemo(cfg))
    predictions, vis_output = demo.run_on_image(image)
    assert set(predictions) == expected_keys
    assert vis_output is not None
    drawing = vis_output.get_image()
    assert drawing.shape == (HEIGHT, WIDTH, 3)
    assert drawing.dtype == np.uint8


def test_confidence_threshold_filters(demo_predictor, image):
    strict = _cfg(demo_predictor, threshold=1.0)
    assert strict.MODEL.KNET.TEST.INSTANCES_SCORE_THRESH == 1.0
    assert strict.MODEL.KNET.TEST.PANOPTIC_THING_SCORE_THRESH == 1.0
    out = _seeded(lambda: DefaultPredictor(strict))(image)
    assert len(out["instances"]) == 0
    assert _thing_segments(out) == 0

    loose = _cfg(demo_predictor, threshold=0.0)
    out = _seeded(lambda: DefaultPredictor(loose))(image)
    assert len(out["instances"]) > 0

    # drawn: nothing at 1.0 (the drawing is the input), masks at 0.0
    rgb = image[:, :, ::-1]
    for threshold, drawn in ((1.0, False), (0.0, True)):
        cfg = _cfg(demo_predictor, INSTANCE_ONLY, threshold=threshold)
        demo = _seeded(lambda cfg=cfg: demo_predictor.VisualizationDemo(cfg))
        predictions, vis_output = demo.run_on_image(image)
        assert (len(predictions["instances"]) > 0) == drawn
        assert (not np.array_equal(vis_output.get_image(), rgb)) == drawn


def test_explicit_opts_override_confidence_threshold(demo_predictor):
    cfg = _cfg(
        demo_predictor, ["MODEL.KNET.TEST.PANOPTIC_THING_SCORE_THRESH", "0.3"], threshold=0.9
    )
    assert cfg.MODEL.KNET.TEST.INSTANCES_SCORE_THRESH == pytest.approx(0.9)
    assert cfg.MODEL.KNET.TEST.PANOPTIC_THING_SCORE_THRESH == pytest.approx(0.3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_cuda_device_falls_back_to_cpu(demo_predictor):
    cfg = demo_predictor.build_demo_cfg(TOY_CONFIG, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.DEVICE == "cpu"


def _run(args, timeout=600):
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_demo_cli_on_a_folder(tmp_path):
    in_dir, out_dir = tmp_path / "images", tmp_path / "vis"
    in_dir.mkdir()
    sizes = {"a.png": (HEIGHT, WIDTH), "b.jpg": (150, 121)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        assert cv2.imwrite(str(in_dir / name), _toy_like_image(h, w, seed=i))
    result = _run(
        [
            "demo/demo.py",
            "--config-file",
            TOY_CONFIG,
            "--input",
            str(in_dir),
            "--output",
            str(out_dir),
            "--confidence-threshold",
            "1.0",
            "--opts",
            "MODEL.WEIGHTS",
            "",
        ]
    )
    log = result.stdout + result.stderr
    for name, (h, w) in sizes.items():
        drawing = cv2.imread(str(out_dir / name))
        assert drawing is not None, f"{name} was not written"
        assert drawing.shape == (h, w, 3)
        line = next(x for x in log.splitlines() if f"{name}:" in x)
        assert "(0 things)" in line and "0 instances" in line, line


@pytest.mark.slow
def test_demo_cli_converts_grayscale_and_rgba_files_and_runs_amp(tmp_path):
    in_dir, out_dir = tmp_path / "images", tmp_path / "vis"
    in_dir.mkdir()
    bgr = _toy_like_image(97, 131)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert cv2.imwrite(str(in_dir / "gray.png"), gray)
    assert cv2.imwrite(str(in_dir / "rgba.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    (in_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    args = ["demo/demo.py", "--config-file", TOY_CONFIG, "--output", str(out_dir), "--amp"]
    random_weights = ["--opts", "MODEL.WEIGHTS", ""]
    _run(
        [
            *args,
            "--input",
            str(in_dir / "gray.png"),
            str(in_dir / "rgba.png"),
            "--opts",
            "MODEL.WEIGHTS",
            "",
        ]
    )
    for name in ("gray.png", "rgba.png"):
        drawing = cv2.imread(str(out_dir / name))
        assert drawing is not None and drawing.shape == (97, 131, 3)
    broken = subprocess.run(
        [sys.executable, *args, "--input", str(in_dir / "broken.png"), *random_weights],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert broken.returncode != 0 and "broken.png" in broken.stderr


@pytest.mark.slow
def test_demo_cli_on_a_video(tmp_path):
    video_path, out_path = tmp_path / "clip.mp4", tmp_path / "clip_vis.mp4"
    h, w, num_frames = 96, 128, 4
    writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (w, h))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write mp4v videos in this environment")
    for i in range(num_frames):
        writer.write(_toy_like_image(h, w, seed=i))
    writer.release()
    probe = cv2.VideoCapture(str(video_path))
    readable = probe.isOpened() and probe.read()[0]
    probe.release()
    if not readable:
        pytest.skip("OpenCV cannot read back the mp4v video it wrote in this environment")

    _run(
        [
            "demo/demo.py",
            "--config-file",
            TOY_CONFIG,
            "--video-input",
            str(video_path),
            "--output",
            str(out_path),
            "--opts",
            "MODEL.WEIGHTS",
            "",
        ]
    )
    video = cv2.VideoCapture(str(out_path))
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame)
    video.release()
    assert len(frames) == num_frames
    assert frames[0].shape == (h, w, 3)
