#!/usr/bin/env python
"""K-Net demo: segment images, a video or a webcam stream and draw the results.

    python demo/demo.py --config-file CONFIG --input img1.jpg 'photos/*.jpg' --output vis/ \\
        [--confidence-threshold 0.5] [--amp] [--opts MODEL.WEIGHTS model.pth MODEL.DEVICE cpu]
    python demo/demo.py --config-file CONFIG --video-input clip.mp4 --output clip_vis.mp4
    python demo/demo.py --config-file CONFIG --webcam

``--config-file`` takes a run's output folder (``output/my_run``): its ``config.yaml``, which
names the classes, and its last checkpoint. ``--dataset NAME FORMAT PATH...`` (as in training,
datasets/README.md) registers a dataset, whose names then win. More in demo/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence

import cv2
import numpy as np
import tqdm
from detectron2.utils.logger import setup_logger

# ``python demo/demo.py`` puts demo/ on sys.path, so the sibling module imports directly.
from predictor import VisualizationDemo, build_demo_cfg, count_predictions

from knet.data.dataset_mappers import read_image_checked
from knet.data.datasets.custom import IMAGE_EXTENSIONS
from knet.engine.arguments import parse_args_with_datasets
from knet.visualization import expand_inputs

WINDOW_NAME = "K-Net"
VIDEO_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}

logger = logging.getLogger("knet.demo")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's arguments; ``args.dataset`` holds the ``--dataset`` groups (DatasetSpec)."""
    parser = argparse.ArgumentParser(
        description="K-Net demo (Detectron2)", formatter_class=argparse.RawTextHelpFormatter
    )
    add = parser.add_argument
    add("--config-file", required=True, metavar="FILE", help="a config, or a run's output folder")
    add("--webcam", action="store_true", help="take frames from webcam 0")
    add("--video-input", help="path to a video file")
    add("--input", nargs="+", help="image files, glob patterns (quote them) or folders")
    add("--output", help="file, or folder when there are several inputs (default: show them)")
    thresholds = "MODEL.KNET.TEST.INSTANCES_SCORE_THRESH and PANOPTIC_THING_SCORE_THRESH"
    threshold = f"minimum score of instances and panoptic things (default 0.5; sets {thresholds})"
    add("--confidence-threshold", type=float, default=0.5, help=threshold)
    amp = "mixed precision: float16 on CUDA, bfloat16 on CPU (MODEL.KNET.TEST.AMP_DTYPE auto)"
    add("--amp", action="store_true", help=amp)
    add("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parse_args_with_datasets(parser, argv)


def image_output_paths(inputs: Sequence[str], output: str) -> list[str]:
    """Where to save the drawing of each input: ``output`` itself, or one file per input in the
    folder ``output`` named after the input (de-duplicated when two inputs share a name)."""
    is_folder = len(inputs) > 1 or os.path.isdir(output) or output.endswith(os.sep)
    if not is_folder and os.path.splitext(output)[1]:
        return [output]
    if len(inputs) > 1 and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"--output {output!r} must be a folder when there are several inputs")
    os.makedirs(output, exist_ok=True)
    used, result = set(), []
    for path in inputs:
        stem, ext = os.path.splitext(os.path.basename(path))
        name, k = stem + ext, 1
        while name in used:
            name, k = f"{stem}_{k}{ext}", k + 1
        used.add(name)
        result.append(os.path.join(output, name))
    return result


def show(window: str, bgr: np.ndarray, wait_ms: int) -> bool:
    """Show ``bgr`` in ``window`` and wait for a key (``wait_ms``, 0: forever); False: ESC."""
    cv2.namedWindow(window, cv2.WINDOW_NORMAL)
    cv2.imshow(window, bgr)
    return cv2.waitKey(wait_ms) != 27


def run_images(demo: VisualizationDemo, paths: Sequence[str], output: str | None) -> None:
    out_paths = image_output_paths(paths, output) if output else [None] * len(paths)
    for path, out_path in zip(tqdm.tqdm(paths, disable=not output), out_paths):
        # grayscale and RGBA files become BGR; a corrupt file is an error naming it
        img = read_image_checked(path, "BGR", "image")
        start = time.perf_counter()
        predictions, vis_output = demo.run_on_image(img)
        elapsed = time.perf_counter() - start
        logger.info("%s: %s in %.2fs", path, count_predictions(predictions), elapsed)
        drawing = vis_output.get_image() if vis_output is not None else img[:, :, ::-1]
        if out_path is None:
            if not show(WINDOW_NAME, drawing[:, :, ::-1], wait_ms=0):
                break
        elif not cv2.imwrite(out_path, np.ascontiguousarray(drawing[:, :, ::-1])):
            raise OSError(f"could not write {out_path}")


def run_webcam(demo: VisualizationDemo) -> None:
    cam = cv2.VideoCapture(0)
    try:
        for vis in tqdm.tqdm(demo.run_on_video(cam)):
            if not show(WINDOW_NAME, vis, wait_ms=1):
                break
    finally:
        cam.release()
        cv2.destroyAllWindows()


def run_video(demo: VisualizationDemo, video_path: str, output: str | None) -> None:
    video = cv2.VideoCapture(video_path)
    if not video.isOpened():
        raise OSError(f"OpenCV cannot open the video {video_path}")
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    basename = os.path.basename(video_path)
    writer = None
    if output:
        if os.path.isdir(output) or output.endswith(os.sep):
            os.makedirs(output, exist_ok=True)
            out_path = os.path.join(output, os.path.splitext(basename)[0] + ".mp4")
        else:
            out_path = output
        fourcc = VIDEO_FOURCC.get(os.path.splitext(out_path)[1].lower(), "mp4v")
        codec = cv2.VideoWriter_fourcc(*fourcc)
        writer = cv2.VideoWriter(out_path, codec, float(fps), (width, height), True)
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write {out_path} with codec {fourcc}")
    start, count = time.perf_counter(), 0
    try:
        for vis_frame in tqdm.tqdm(demo.run_on_video(video), total=num_frames):
            count += 1
            if writer is not None:
                writer.write(vis_frame)
            elif not show(basename, vis_frame, wait_ms=1):
                break
    finally:
        video.release()
        if writer is not None:
            writer.release()
        else:
            cv2.destroyAllWindows()
    elapsed = time.perf_counter() - start
    logger.info("%s: %d frames in %.2fs (%.2f fps)", video_path, count, elapsed, count / elapsed)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger()
    setup_logger(name="knet")
    logger.info("Arguments: %s", args)
    sources = sum([bool(args.input), bool(args.webcam), bool(args.video_input)])
    if sources != 1:
        raise SystemExit("give exactly one of --input, --video-input and --webcam")
    if args.webcam and args.output:
        raise SystemExit("--output is not supported with --webcam")

    amp = ["MODEL.KNET.TEST.AMP_DTYPE", "auto"] if args.amp else []
    cfg = build_demo_cfg(args.config_file, amp + args.opts, args.confidence_threshold, args.dataset)
    demo = VisualizationDemo(cfg)
    if demo.clip and not args.video_input:
        raise SystemExit(
            f"{cfg.MODEL.META_ARCHITECTURE} segments whole videos at once: give --video-input"
        )
    if args.input:
        run_images(demo, expand_inputs(args.input), args.output)
    elif args.webcam:
        run_webcam(demo)
    else:
        run_video(demo, args.video_input, args.output)


if __name__ == "__main__":
    main()
