#!/usr/bin/env python
"""Convert a released K-Net checkpoint (official MMDetection or MMSeg) into a Detectron2 file.

    python tools/convert_official_knet.py \\
        knet_s3_swin-l_fpn_ms-3x_16x2_coco-panoptic_20211020_062341-62f3bbff.pth \\
        output/knet_swin_L_coco_panoptic.pth

The architecture (backbone: ResNet, ResNet-DCN or Swin; task; decode head) is read from the keys
and the matching config of this project is chosen from the model zoo (README.md, "Model zoo");
``--config-file`` (with ``--opts``) selects another one, e.g. for a checkpoint trained with a
different class count. The converted weights must fit the model built from that config key by
key and shape by shape, or nothing is written. ``--markdown`` prints README's model-zoo and
ImageNet-weights tables from ``knet.checkpoint.model_zoo``, their one source.

Exit status: 0 success, 1 the weights do not fit the config (or the class order differs from
Detectron2's COCO ids), 2 the file is not a K-Net checkpoint this project can build.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from knet.checkpoint.model_zoo import find_model_zoo_entry, markdown_tables
from knet.conversion import (
    CheckpointKeyError,
    UnsupportedCheckpointError,
    check_coco_class_names,
    convert_official_knet_state_dict,
    describe_official_knet_state_dict,
    load_checkpoint_file,
    model_state_shapes,
    save_detectron2_checkpoint,
)
from knet.engine import get_knet_cfg

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("input", nargs="?", help="official K-Net or MMSeg K-Net checkpoint (.pth)")
    add("output", nargs="?", help="converted file (.pth, or .pkl for numpy arrays)")
    add("--config-file", default="", help="config to build the model from (default: model zoo)")
    pickle = "fully unpickle the input if it holds more than tensors (trusted files only)"
    add("--allow-pickle", action="store_true", help=pickle)
    classes = "do not compare meta['CLASSES'] with Detectron2's COCO class order"
    add("--skip-class-check", action="store_true", help=classes)
    markdown = "print README's tables (model zoo, ImageNet weights) instead of converting"
    add("--markdown", action="store_true", help=markdown)
    add("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if not args.markdown and not (args.input and args.output):
        parser.error("the input and output files are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print("\n\n".join(markdown_tables()))
        return 0
    checkpoint = load_checkpoint_file(args.input, allow_pickle=args.allow_pickle)
    try:
        info = describe_official_knet_state_dict(checkpoint)
    except (CheckpointKeyError, UnsupportedCheckpointError) as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 2
    print(f"detected: {info.summary()}")
    config = args.config_file
    entry = find_model_zoo_entry(info.architecture, os.path.basename(args.input))
    if entry is not None:
        print(f"model zoo: {entry.file} ({entry.metric} {entry.result}), config {entry.config}")
        config = config or str(REPO / entry.config)
    if not config:
        print(
            "error: no config of this project has this architecture; pass --config-file (and "
            "--opts, e.g. MODEL.SEM_SEG_HEAD.NUM_CLASSES N) describing the model",
            file=sys.stderr,
        )
        return 2

    if info.classes and info.task != "semantic" and not args.skip_class_check:
        mismatches = check_coco_class_names(info.classes)
        if mismatches:
            print(
                "error: the checkpoint's class order differs from Detectron2's COCO ids "
                "(use --skip-class-check to convert anyway):\n  " + "\n  ".join(mismatches[:20]),
                file=sys.stderr,
            )
            return 1

    cfg = get_knet_cfg(config, args.opts)
    try:
        converted = convert_official_knet_state_dict(checkpoint, model_state_shapes(cfg))
    except (CheckpointKeyError, UnsupportedCheckpointError) as e:
        print(f"error: {args.input} does not fit {config}: {e}", file=sys.stderr)
        return 1
    source = "MMSegmentation" if info.task == "semantic" else "MMDetection"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_detectron2_checkpoint(converted, args.output, author=f"K-Net official ({source})")
    print(f"wrote {len(converted)} tensors to {args.output}; every key and shape of the model fit")
    command = ["python", "train_net.py", "--config-file", config, "--eval-only"]
    command += ["MODEL.WEIGHTS", args.output] + list(args.opts)
    print("evaluate with: " + " ".join(shlex.quote(c) for c in command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
