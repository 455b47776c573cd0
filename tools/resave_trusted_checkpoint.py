#!/usr/bin/env python
"""Re-save the weights of a TRUSTED checkpoint as plain tensors, loadable without unpickling code.

Detectron2 and this project load weight files with a restricted unpickler that accepts only
tensors, numpy arrays and plain containers. A checkpoint that also pickles other Python objects
(a config object, a custom class) is refused. If you trust where it came from, this tool unpickles
it fully once and writes ``{"model": state_dict}`` (plus ``__author__``) that loads everywhere:

    python tools/resave_trusted_checkpoint.py trusted.pth model.pth
"""

import argparse
import sys

import numpy as np
import torch

from knet.conversion import load_checkpoint_file, save_detectron2_checkpoint, unwrap_state_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="a trusted checkpoint (.pth/.pkl)")
    parser.add_argument("output", help="where to write the weights (.pth or .pkl)")
    args = parser.parse_args(argv)
    checkpoint = load_checkpoint_file(args.input, allow_pickle=True)
    weights = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    arrays = {k: v for k, v in weights.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    dropped = sorted(set(weights) - set(arrays))
    state_dict, _ = unwrap_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
    save_detectron2_checkpoint(state_dict, args.output, author=f"resaved from {args.input}")
    print(f"wrote {len(state_dict)} tensors to {args.output}; left out: {dropped or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
