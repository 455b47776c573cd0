#!/usr/bin/env python
"""Convert torchvision ImageNet ResNet weights into a Detectron2 file for this project.

Example::

    python tools/convert_torchvision_resnet.py resnet50-0676ba61.pth R-50-torchvision.pth

The keys become ``backbone.bottom_up.*`` (Detectron2 ResNet names), ``fc.*`` is dropped and no
name-matching heuristics are needed at load time. Build the model with
``MODEL.RESNETS.STRIDE_IN_1X1=False`` (torchvision puts the stride on the 3x3 conv).
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
from knet.checkpoint.official import BACKBONE_PREFIX


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision ResNet state dict (.pth)")
    parser.add_argument("output", help="converted file (.pth, or .pkl for numpy arrays)")
    parser.add_argument("--prefix", default=BACKBONE_PREFIX, help="prefix of the output keys")
    args = parser.parse_args(argv)

    state_dict = load_checkpoint_file(args.input)
    try:
        converted = convert_torchvision_resnet_state_dict(state_dict, prefix=args.prefix)
    except (CheckpointKeyError, UnsupportedCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_detectron2_checkpoint(converted, args.output, author="torchvision")
    print(f"wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
