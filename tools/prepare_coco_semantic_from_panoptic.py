#!/usr/bin/env python
"""Derive semantic PNGs (and optionally COCO instance json) from COCO panoptic annotations.

Semantic PNGs hold contiguous ids 0..132 in the order of Detectron2's ``COCO_CATEGORIES`` (things
first), 255 for void; crowd segments get their class, as in Mask2Former. This produces the
``coco/panoptic_semseg_{train,val}2017`` folders read by ``coco_2017_*_panoptic_with_sem_seg``::

    python tools/prepare_coco_semantic_from_panoptic.py            # $DETECTRON2_DATASETS/coco
    python tools/prepare_coco_semantic_from_panoptic.py --splits val2017 --num-workers 8

Any other COCO-format panoptic json::

    python tools/prepare_coco_semantic_from_panoptic.py --panoptic-json X.json \\
        --panoptic-root X_png/ --output-dir X_semseg/ --instances-json X_instances.json
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from panoptic_conversion import prepare_instances_from_panoptic, prepare_semantic_from_panoptic

from knet.data.datasets import get_datasets_root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add = parser.add_argument
    add("--root", help="COCO root (default: $DETECTRON2_DATASETS/coco)")
    add("--splits", nargs="+", default=["val2017", "train2017"])
    add("--panoptic-json", help="convert this json instead of the COCO splits")
    add("--panoptic-root", help="PNG folder of --panoptic-json")
    add("--output-dir", help="semantic PNG folder for --panoptic-json")
    add("--instances-json", help="also write a COCO instance json (things only) here")
    add("--num-workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.panoptic_json:
        if not (args.panoptic_root and args.output_dir):
            parser.error("--panoptic-json needs --panoptic-root and --output-dir")
        jobs = [(args.panoptic_json, args.panoptic_root, args.output_dir, args.instances_json)]
    else:
        root = args.root or os.path.join(get_datasets_root(), "coco")
        jobs = []
        for s in args.splits:
            names = [f"annotations/panoptic_{s}.json", f"panoptic_{s}", f"panoptic_semseg_{s}"]
            jobs.append((*(os.path.join(root, name) for name in names), None))
    for pan_json, pan_root, out_dir, inst_json in jobs:
        start = time.perf_counter()
        n = prepare_semantic_from_panoptic(
            pan_json, pan_root, out_dir, num_workers=args.num_workers
        )
        print(f"{pan_json}: {n} semantic PNGs in {out_dir} ({time.perf_counter() - start:.1f} s)")
        if inst_json:
            n = prepare_instances_from_panoptic(pan_json, pan_root, inst_json)
            print(f"{pan_json}: {n} instance annotations in {inst_json}")


if __name__ == "__main__":
    main()
