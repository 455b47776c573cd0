#!/usr/bin/env python
"""Prepare the shared real samples for the ``coco_sample_*`` and ``ade20k_sample_*`` datasets.

Derives the files the registered datasets read into ``$KNET_CACHE/prepared`` (default
``~/.cache/knet/prepared``), never next to the read-only samples in ``$KNET_SHARED_DATA``:
semantic PNGs and an instance json for the COCO panoptic sample, converted labels for the ADE20K
sample. Registering or loading those datasets never does this; ``tools/run_demo.py`` runs it for
its sample tasks. Up-to-date outputs are kept::

    python tools/prepare_samples.py                 # both samples
    python tools/prepare_samples.py --only coco     # or: --only ade20k
    python tools/prepare_samples.py --force         # prepare again
"""

from __future__ import annotations

import argparse
import sys
import time

from knet.data.datasets import prepare_ade20k_sample, prepare_coco_sample

SAMPLES = {"coco": prepare_coco_sample, "ade20k": prepare_ade20k_sample}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(SAMPLES), help="prepare this sample only")
    parser.add_argument("--force", action="store_true", help="prepare again even if up to date")
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else list(SAMPLES):
        start = time.perf_counter()
        try:
            out = SAMPLES[name](force=args.force)
        except FileNotFoundError as e:  # the shared sample itself is missing
            print(f"{name}: {e}", file=sys.stderr)
            return 1
        print(f"{name} sample ready in {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
