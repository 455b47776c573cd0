#!/usr/bin/env python
"""Export a K-Net model to TorchScript or ONNX (Detectron2's ``export_model.py`` options).

    python tools/deploy/export_model.py --config-file output/my_run --format onnx \\
        --output output/export --sample-image photo.jpg
    python tools/deploy/export_model.py --config-file \\
        configs/coco/panoptic-segmentation/knet_R50_bs16_1x.yaml --opts MODEL.WEIGHTS model.pth

writes ``output/export/model.onnx`` (or ``model.ts``): a graph from one uint8 image (3, H, W) of
any size in the config's ``INPUT.FORMAT`` to plain tensors at that size (``knet.export``). It is
traced with the sample image (default: synthetic), resized like the test loader, and its outputs
on it are compared with the eager model's. Only ``--export-method tracing`` works. A run's output
folder as ``--config-file`` exports its last checkpoint with its config; the file holds the class
names and colours (``knet.data.kinds.model_description``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from knet.checkpoint import KNetCheckpointer  # importing knet registers the model
from knet.data.dataset_mappers import read_image_checked
from knet.data.dataset_mappers.common import image_to_tensor
from knet.engine import get_knet_cfg
from knet.export import (
    ExportedKNet,
    KNetExportModule,
    compare_outputs,
    export_onnx,
    export_torchscript,
)

logger = logging.getLogger("knet.export")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--config-file", required=True, metavar="FILE", help="a config, or a run's output folder")
    add("--format", choices=["torchscript", "onnx"], default="torchscript")
    add("--export-method", choices=["tracing", "scripting"], default="tracing", help="(tracing)")
    add("--sample-image", help="image to trace with (default: synthetic)")
    add("--output", default="output/export", help="output folder")
    add("--opset", type=int, help="ONNX opset (default: the lowest that works)")
    add("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides (KEY VALUE ...)")
    return parser.parse_args(argv)


def sample_image(cfg, path: str | None) -> torch.Tensor:
    """(3, H, W) uint8 in ``INPUT.FORMAT``, resized like the test loader."""
    if path:
        image = read_image_checked(path, cfg.INPUT.FORMAT, "sample image")
    else:
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return image_to_tensor(resize.get_transform(image).apply_image(image))


def export(args: argparse.Namespace) -> str:
    """Export the model of ``args`` and check the file; returns its path."""
    if args.export_method == "scripting":
        raise SystemExit(
            "--export-method scripting is not supported: Detectron2's ResNet/FPN backbones "
            "cannot be compiled by torch.jit.script (their stages are a Python list); use "
            "--export-method tracing, which keeps image sizes dynamic"
        )
    cfg = get_knet_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    cfg.freeze()
    torch.manual_seed(0)  # without MODEL.WEIGHTS the exported random weights are reproducible
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        KNetCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialised weights")
    module = KNetExportModule(model)
    image, metadata = sample_image(cfg, args.sample_image), module.metadata(cfg)
    path = os.path.join(args.output, "model.onnx" if args.format == "onnx" else "model.ts")
    if args.format == "onnx":
        path = export_onnx(module, image, path, metadata, args.opset)
    else:
        path = export_torchscript(module, image, path, metadata, args.export_method)
    with torch.no_grad():
        expected = dict(zip(module.output_names, module(image)))
    got = ExportedKNet(path)(image)  # (a Video K-Net file tracks: its tracking inputs are used)
    report = compare_outputs(got, {k: v for k, v in expected.items() if k in got})
    logger.info("Exported %s with outputs %s", path, ", ".join(module.output_names))
    logger.info(
        "Exported vs eager on the sample image %s (max abs difference of float outputs, share "
        "of differing elements of the others): %s",
        tuple(image.shape),
        ", ".join(f"{k} {v:.3g}" for k, v in report.items()),
    )
    return path


def main(argv: Sequence[str] | None = None) -> int:
    setup_logger(name="knet")
    args = parse_args(argv)
    print(export(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
