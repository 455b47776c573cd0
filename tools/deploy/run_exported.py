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
exported with: the pixels of a thing left out here stay unlabelled.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

import knet  # noqa: F401  (registers the datasets whose class names are drawn)
from knet.data.dataset_mappers import read_image_checked
from knet.data.kinds import CLASS_FIELDS, registered_or
from knet.export import INSTANCE_OUTPUTS, ExportedKNet
from knet.modeling.postprocessing import detectron2_outputs
from knet.visualization import draw_predictions, expand_inputs

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


def thresholded(outputs: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """The exported outputs without the instances and panoptic things scoring below
    ``threshold`` (the pixels of those things become void)."""
    out = dict(outputs)
    if "scores" in out:
        keep = out["scores"] >= threshold
        out.update({name: out[name][keep] for name in INSTANCE_OUTPUTS})
    if "panoptic_seg" in out:
        low = out["segment_isthing"].bool() & (out["segment_score"] < threshold)
        ids = out["panoptic_seg"]
        out["panoptic_seg"] = torch.where(torch.isin(ids, low.nonzero()[:, 0] + 1), 0, ids)
        out["segment_area"] = torch.where(low, 0, out["segment_area"])
    return out


def at_size(outputs: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The exported outputs brought to ``size`` (H, W): id maps and masks by nearest neighbour,
    ``sem_seg`` bilinearly, boxes scaled."""
    out = dict(outputs)

    def resize(x: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
        if not x.numel():  # no instance
            return x.new_zeros((*x.shape[:-2], *size))
        return F.interpolate(x[None], size=size, mode=mode)[0]

    if "panoptic_seg" in out:
        out["panoptic_seg"] = resize(out["panoptic_seg"][None].double())[0].int()
    if "pred_masks" in out:
        masks = out["pred_masks"]
        scale = torch.tensor([size[1] / masks.shape[2], size[0] / masks.shape[1]] * 2)
        out["pred_masks"] = resize(masks.to(torch.uint8)).bool()
        out["pred_boxes"] = out["pred_boxes"] * scale
    if "sem_seg" in out:
        out["sem_seg"] = resize(out["sem_seg"], "bilinear")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    setup_logger(name="knet")
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    exported = ExportedKNet(args.model, num_threads=args.threads)
    meta = exported.metadata
    classes = {key: meta[key] for key in CLASS_FIELDS if key in meta}
    metadata = registered_or([args.dataset or meta["dataset"]], classes)
    resize = T.ResizeShortestEdge(meta["min_size_test"], meta["max_size_test"])
    os.makedirs(args.output, exist_ok=True)
    for path in expand_inputs(args.input):
        original = read_image_checked(path, meta["input_format"], "image")
        image = resize.get_transform(original).apply_image(original)
        start = time.perf_counter()
        outputs = exported(np.ascontiguousarray(image.transpose(2, 0, 1)))
        seconds = time.perf_counter() - start
        outputs = thresholded(outputs, args.confidence_threshold)
        outputs = detectron2_outputs(at_size(outputs, original.shape[:2]))
        rgb = original if meta["input_format"] == "RGB" else original[:, :, ::-1]
        out_path = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        drawing = draw_predictions(Visualizer(rgb, metadata), outputs).get_image()
        cv2.imwrite(out_path, drawing[:, :, ::-1])
        logger.info("%s: run at %dx%d in %.2fs -> %s", path, *image.shape[1::-1], seconds, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
