#!/usr/bin/env python
"""Convert ImageNet ResNet weights (torchvision or MMCV ResNetV1c) into a Detectron2 file.

Examples::

    python tools/convert_torchvision_resnet.py resnet50-0676ba61.pth R-50-torchvision.pth
    python tools/convert_torchvision_resnet.py resnet50_v1c-2cccc1ad.pth R-50-V1c.pth --no-fpn

The keys become ``backbone.bottom_up.*`` (Detectron2 ResNet names inside the ResNet-FPN of
instance/panoptic K-Net), or ``backbone.*`` with ``--no-fpn`` (the plain ResNet of semantic
K-Net); ``fc.*`` is dropped and no name-matching heuristics are needed at load time. MMCV's
ResNetV1c deep stem (``stem.{0,1,3,4,6,7}``, e.g. ``open-mmlab://resnet50_v1c``) becomes
``stem.conv{1,2,3}`` (``MODEL.RESNETS.STEM_TYPE=deeplab``). Build the model with
``MODEL.RESNETS.STRIDE_IN_1X1=False`` (the stride is on the 3x3 conv).
"""

import argparse
import sys
from typing import List, Optional

from knet.checkpoint import (
    CheckpointKeyError,
    UnsupportedCheckpointError,
    convert_torchvision_resnet_state_dict,
    load_checkpoint_file,
    save_detectron2_checkpoint,
)
from knet.checkpoint.official import BACKBONE_PREFIX, SEMANTIC_BACKBONE_PREFIX


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision or MMCV ImageNet ResNet weights (.pth)")
    parser.add_argument("output", help="converted file (.pth, or .pkl for numpy arrays)")
    prefix = parser.add_mutually_exclusive_group()
    prefix.add_argument(
        "--prefix", default=BACKBONE_PREFIX, help=f"prefix of the output keys ({BACKBONE_PREFIX})"
    )
    prefix.add_argument(
        "--no-fpn",
        dest="prefix",
        action="store_const",
        const=SEMANTIC_BACKBONE_PREFIX,
        help=f"prefix {SEMANTIC_BACKBONE_PREFIX!r}: the backbone is not wrapped in an FPN "
        "(semantic K-Net)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="fully unpickle the input if it holds more than tensors (trusted files only)",
    )
    args = parser.parse_args(argv)

    state_dict = load_checkpoint_file(args.input, allow_pickle=args.allow_pickle)
    try:
        converted = convert_torchvision_resnet_state_dict(state_dict, prefix=args.prefix)
    except (CheckpointKeyError, UnsupportedCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    deep_stem = f"{args.prefix}stem.conv2.weight" in converted
    source = "MMCV ResNetV1c" if deep_stem else "torchvision"
    save_detectron2_checkpoint(converted, args.output, author=source)
    print(f"wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
