#!/usr/bin/env python
"""Run an exported K-Net file (TorchScript or ONNX) on images and draw the results.

    python tools/deploy/run_exported.py --model output/export/model.onnx \\
        --input photo.jpg 'photos/*.jpg' --output output/vis [--confidence-threshold 0.5]

Each image is read, resized as the model's config resizes test images (stored in the file) and
passed to the exported graph through TorchScript (``.ts``) or ONNX Runtime (``.onnx``); the
outputs are brought back to the image's size and drawn on it with Detectron2's ``Visualizer``
and the class names and colours the file holds (those of a registered test dataset, or of
``--dataset``, win). ``--confidence-threshold`` leaves out instances and panoptic things scoring
less, as the demo's does, except that the file's panoptic merge used the threshold it was
exported with: the pixels of a thing left out here stay unlabelled. A Video K-Net file takes
the inputs as the frames of one video, in the order given (globs and folders sorted by name), and
draws each tracked thing in its track's colour.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import cv2
import torch
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

import knet  # noqa: F401  (registers the datasets whose class names are drawn)
from knet.data.dataset_mappers import read_image_checked
from knet.export import ExportedKNet
from knet.modeling.postprocessing import detectron2_outputs
from knet.visualization import above_threshold, draw_predictions, expand_inputs

logger = logging.getLogger("knet.export")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model.ts or model.onnx")
    parser.add_argument("--input", nargs="+", required=True, help="images, globs or folders")
    parser.add_argument("--output", required=True, help="folder for the drawings")
    parser.add_argument("--dataset", help="registered dataset whose class names are drawn")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="minimum score of instances and "
        "panoptic things (default 0.5, as the demo)"
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logger(name="knet")
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    exported = ExportedKNet(args.model, num_threads=args.threads)
    input_format = exported.metadata["input_format"]
    metadata = exported.class_metadata(args.dataset)
    os.makedirs(args.output, exist_ok=True)
    for path in expand_inputs(args.input):
        image = read_image_checked(path, input_format, "image")
        start = time.perf_counter()
        outputs = detectron2_outputs(exported.run_on_image(image))
        seconds = time.perf_counter() - start
        outputs = above_threshold(outputs, args.confidence_threshold)
        rgb = image if input_format == "RGB" else image[:, :, ::-1]
        out_path = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        drawing = draw_predictions(Visualizer(rgb, metadata), outputs).get_image()
        cv2.imwrite(out_path, drawing[:, :, ::-1])
        logger.info("%s: %dx%d in %.2fs -> %s", path, *image.shape[1::-1], seconds, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
