#!/usr/bin/env python
"""Convert ImageNet backbone weights into a Detectron2 file the K-Net configs start from.

    python tools/convert_pretrained_backbone.py swin_large_patch4_window7_224_22k.pth \\
        pretrained/swin_large_patch4_window7_224_22k.pkl

Recognised from the keys: torchvision ResNets (``resnet101-63fe2227.pth``), MMCV's ResNetV1c
(``resnet50_v1c-2cccc1ad.pth``), Microsoft's Swin checkpoints (``swin_tiny_patch4_window7_224.pth``,
``swin_large_patch4_window7_224_22k.pth``) and MMSeg's converted Swin files. The classifier is
dropped and the keys carry no model prefix, so one file serves the FPN models (COCO) and the plain
backbones (ADE20K) alike: Detectron2 matches them to the model's keys by suffix. The result is
checked against the backbone of ``--config-file`` (default: a shipped config with this backbone):
unknown keys and shape mismatches are errors; deformable-conv offsets (zero-initialised) and the
per-output norms of Swin are not in ImageNet weights.

Exit status: 0 success, 1 the weights do not fit the config, 2 the file is not recognised.
"""

import argparse
import os
import sys
from pathlib import Path

from knet.checkpoint.model_zoo import PRETRAINED_BACKBONES
from knet.conversion import (
    CheckpointKeyError,
    UnsupportedCheckpointError,
    convert_pretrained_backbone,
    describe_backbone,
    load_checkpoint_file,
    model_state_shapes,
    save_detectron2_checkpoint,
    unwrap_state_dict,
)
from knet.engine import get_knet_cfg

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("input", help="ImageNet weights (.pth)")
    add("output", help="converted file (.pkl or .pth)")
    add("--config-file", default="", help="check against this config's backbone")
    pickle = "fully unpickle the input if it holds more than tensors (trusted files only)"
    add("--allow-pickle", action="store_true", help=pickle)
    args = parser.parse_args(argv)

    checkpoint = load_checkpoint_file(args.input, allow_pickle=args.allow_pickle)
    try:
        name, _ = describe_backbone(unwrap_state_dict(checkpoint)[0])
    except (CheckpointKeyError, UnsupportedCheckpointError) as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 2
    config = args.config_file
    if not config:
        known = [p for p in PRETRAINED_BACKBONES if p.backbone == name]
        config = str(REPO / known[0].config) if known else ""
    print(f"detected: {name}" + (f"; checking against {config}" if config else ""))
    shapes = model_state_shapes(get_knet_cfg(config)) if config else None
    try:
        converted, _ = convert_pretrained_backbone(checkpoint, shapes)
    except CheckpointKeyError as e:
        print(f"error: {args.input} does not fit {config}: {e}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    author = f"ImageNet {name}"
    save_detectron2_checkpoint(converted, args.output, author=author, matching_heuristics=True)
    print(f"wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
