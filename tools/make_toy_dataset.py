#!/usr/bin/env python
"""Generate K-Net's synthetic toy panoptic dataset into ``<root>/knet_toy``.

The registered ``knet_toy_*`` datasets never generate it (loading them without it raises an
error naming this command); run this once, or to regenerate it with another size or seed
(``tools/run_demo.py`` runs it for the toy tasks)::

    python tools/make_toy_dataset.py                       # $DETECTRON2_DATASETS/knet_toy
    python tools/make_toy_dataset.py --root /data --num-train 1000 --seed 1 --force
"""

from __future__ import annotations

import argparse
import logging
import time

from knet.data.datasets.paths import get_datasets_root
from knet.data.datasets.toy import (
    TOY_DEFAULT_NUM_IMAGES,
    TOY_DEFAULT_SEED,
    generate_toy_dataset,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)"
    )
    parser.add_argument("--num-train", type=int, default=TOY_DEFAULT_NUM_IMAGES["train"])
    parser.add_argument("--num-val", type=int, default=TOY_DEFAULT_NUM_IMAGES["val"])
    parser.add_argument("--seed", type=int, default=TOY_DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    out = generate_toy_dataset(
        args.root if args.root is not None else get_datasets_root(),
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        force=args.force,
    )
    print(f"Toy dataset ready in {out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
