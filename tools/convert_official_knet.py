#!/usr/bin/env python
"""Convert an official K-Net checkpoint (MMDetection or MMSeg) into a Detectron2 file.

Instance/panoptic (COCO, MMDetection) example::

    python tools/convert_official_knet.py \\
        knet_s3_r50_fpn_1x_coco-panoptic_20211017_151750-395fbcba.pth knet_R50_1x_panoptic.pth \\
        --config-file configs/coco/panoptic-segmentation/knet_R50_bs16_1x.yaml

Semantic (ADE20K, MMSeg) checkpoints are recognised by their ``decode_head.*`` keys; the decode
head (UPerNet, FCN, PSPNet or ASPP) is read from the keys and printed with the config options
of the matching model::

    python tools/convert_official_knet.py \\
        knet_s3_upernet_r50-d8_8x2_512x512_adamw_80k_ade20k.pth \\
        knet_upernet_R50_ade20k.pth

With ``--config-file`` the model of that config is built, the converted weights are compared
with its state dict (every key and shape must match) and loaded back through
``DetectionCheckpointer``; the output is written only if everything matches.

Exit status: 0 success, 1 the converted weights do not fit the config (or the class order
differs from Detectron2's COCO ids), 2 the checkpoint cannot be converted.
"""

import argparse
import shlex
import sys
from typing import List, Optional

import torch

from knet.checkpoint import (
    CheckpointKeyError,
    UnsupportedCheckpointError,
    check_coco_class_names,
    compare_state_dicts,
    convert_official_knet_state_dict,
    describe_official_knet_state_dict,
    load_checkpoint_file,
    save_detectron2_checkpoint,
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="official K-Net checkpoint (.pth)")
    parser.add_argument("output", help="converted file (.pth, or .pkl for numpy arrays)")
    parser.add_argument("--config-file", default="", help="check the result against this model")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="fully unpickle the input if it holds more than tensors (trusted files only)",
    )
    parser.add_argument(
        "--skip-class-check",
        action="store_true",
        help="do not compare meta['CLASSES'] with Detectron2's COCO class order "
        "(instance/panoptic checkpoints only)",
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides for --config-file: KEY VALUE ... (must come last)",
    )
    return parser.parse_args(argv)


def build_reference_model(config_file: str, opts: List[str]) -> torch.nn.Module:
    """Build (on CPU, without loading weights) the model described by a config file."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from knet import add_knet_config

    cfg = get_cfg()
    add_knet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return build_model(cfg).eval()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    checkpoint = load_checkpoint_file(args.input, allow_pickle=args.allow_pickle)
    try:
        info = describe_official_knet_state_dict(checkpoint)
    except (CheckpointKeyError, UnsupportedCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"official K-Net: {info.summary()}")
    opts = " ".join(shlex.quote(o) for o in info.detectron2_options())
    print(f"matching config options: {opts}")

    # ADE20K class names are spelled differently in MMSeg and Detectron2; the order is the same
    if info.classes and not info.is_semantic and not args.skip_class_check:
        mismatches = check_coco_class_names(info.classes)
        if mismatches:
            print(
                "error: the checkpoint's class order differs from Detectron2's COCO ids "
                "(use --skip-class-check to convert anyway):\n  " + "\n  ".join(mismatches[:20]),
                file=sys.stderr,
            )
            return 1

    model = build_reference_model(args.config_file, args.opts) if args.config_file else None
    reference = model.state_dict() if model is not None else None
    try:
        converted = convert_official_knet_state_dict(
            checkpoint, target_keys=reference.keys() if reference is not None else None
        )
    except (CheckpointKeyError, UnsupportedCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if reference is not None:
        diff = compare_state_dicts(converted, reference)
        if not diff.ok:
            print(f"error: converted weights do not fit {args.config_file}:", file=sys.stderr)
            print(diff.format(), file=sys.stderr)
            return 1

    source = "MMSegmentation" if info.is_semantic else "MMDetection"
    save_detectron2_checkpoint(converted, args.output, author=f"K-Net official ({source})")
    print(f"wrote {len(converted)} tensors to {args.output}")

    if model is not None:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model).load(args.output)
        loaded = model.state_dict()
        wrong = [k for k, v in converted.items() if not torch.equal(loaded[k], v)]
        if wrong:
            print(
                f"error: {len(wrong)} tensors differ after loading, e.g. {wrong[:5]}",
                file=sys.stderr,
            )
            return 1
        print(f"verified: DetectionCheckpointer loads all {len(loaded)} tensors of the model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
