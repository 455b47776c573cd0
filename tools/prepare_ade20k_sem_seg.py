#!/usr/bin/env python
"""Convert ADE20K (ADEChallengeData2016) labels to Detectron2's convention.

Writes ``annotations_detectron2/{training,validation}`` with ``label - 1`` in uint8 (classes
0..149, "other" 0 -> 255 = ignore), as read by ``ade20k_sem_seg_{train,val}``::

    python tools/prepare_ade20k_sem_seg.py        # $DETECTRON2_DATASETS/ADEChallengeData2016
    python tools/prepare_ade20k_sem_seg.py --root /data/ADEChallengeData2016 --output-root /tmp/ade
"""

from __future__ import annotations

import argparse
import logging
import os

from panoptic_conversion import prepare_ade20k_sem_seg

from knet.data.datasets import get_datasets_root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add = parser.add_argument
    add("--root", help="ADEChallengeData2016 folder (default: under $DETECTRON2_DATASETS)")
    add("--output-root", help="where annotations_detectron2/ goes (default: --root)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.root or os.path.join(get_datasets_root(), "ADEChallengeData2016")
    n = prepare_ade20k_sem_seg(root, args.output_root)
    out = os.path.join(args.output_root or root, "annotations_detectron2")
    print(f"Wrote {n} label maps under {out}")


if __name__ == "__main__":
    main()
