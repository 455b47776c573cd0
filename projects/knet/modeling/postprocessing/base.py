"""What the post-processing modules share: where an image lies in the padded input
(:class:`OutputGeometry`), the official resizing to the output (:func:`resize_to_output`), the
statistics of the full-resolution masks (:class:`MaskStatistics`) and :func:`exporting`.

A leaf module: it imports nothing else of the post-processing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..layers import resize


class OutputGeometry(NamedTuple):
    """Where an image lies in the padded network input and which output size is wanted.

    padded_size: (H_pad, W_pad) of the padded batch; image_size: (H, W) of the image in its
    top-left corner; output_size: (H_out, W_out), or None for the image size.
    """

    padded_size: tuple[int, int]
    image_size: tuple[int, int]
    output_size: tuple[int, int] | None = None

    @property
    def out_size(self) -> tuple[int, int]:
        return self.image_size if self.output_size is None else self.output_size

    def axis(self, dim: int) -> OutputGeometry:
        """The geometry of one axis (0: rows, 1: columns), as an (n, 1) image."""
        out = None if self.output_size is None else (self.output_size[dim], 1)
        return OutputGeometry((self.padded_size[dim], 1), (self.image_size[dim], 1), out)


class MaskStatistics(NamedTuple):
    """What the outputs need from the full-resolution mask probabilities P_n = resize(sigmoid).

    owner: (H_out, W_out) int64, the first kernel maximising ``score_n * P_n`` at each pixel;
    won_area: (N,) int64 pixels owned; own_area: (N,) int64 pixels with ``P_n >= threshold``,
    counted for kernels that own pixels (0 for the others). Empty tensors when no scores are
    given. selected_masks: (M, H_out, W_out) bool ``P_n > threshold`` of the selected kernels.

    The fields between ``won_area`` and ``selected_masks`` are the per-kernel sums of
    ``statistics._pixel_terms``, in the order of its columns.
    """

    owner: Tensor
    won_area: Tensor
    own_area: Tensor
    selected_masks: Tensor


def exporting() -> bool:
    """Whether the code runs in a TorchScript trace (or script): exported graphs need
    operations that stay dynamic and that every exporter has (no Python loop over data)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def resize_to_output(
    maps: Tensor, geometry: OutputGeometry, chunk_size: int = 0, crop: bool = True
) -> Tensor:
    """Resize maps predicted on the padded input to the output, as the official code does.

    (C, h, w) -> bilinear (align_corners=False) to ``padded_size`` -> crop to ``image_size``
    -> bilinear to ``output_size`` (skipped when None) -> (C, H_out, W_out).

    Args:
        maps: (C, h, w) floating-point maps at any stride of the padded input.
        chunk_size: > 0: with a second resize, or when exporting, resize that many channels
            at a time, so that only one chunk's padded-size maps exist at once.
        crop: False: stop at the padded size, (C, H_pad, W_pad) (no second resize allowed).
    """
    # Chunks bound the padded-size maps that a second resize consumes; without one, the
    # crop of a single resize is the output itself (no copy) in eager mode.
    chunked = chunk_size > 0 and maps.shape[0] > chunk_size
    if chunked and exporting() and crop:
        # In an exported graph every step is a new tensor (the crop is an ONNX Slice, a copy):
        # at once, all the channels would need two padded-size copies besides the output. By
        # chunks, the steps' copies are one chunk's, and the chunks' pieces fit the memory
        # that the network freed; the chunks' results and their concatenation (the output)
        # are what remains at full size.
        starts = range(0, maps.shape[0], chunk_size)  # (the channel count is a constant)
        return torch.cat([resize_to_output(maps[i : i + chunk_size], geometry) for i in starts])
    if chunked and geometry.output_size is not None:
        out = maps.new_empty((maps.shape[0], *geometry.out_size))
        for start in range(0, maps.shape[0], chunk_size):
            out[start : start + chunk_size] = resize_to_output(
                maps[start : start + chunk_size], geometry
            )
        return out
    x = resize(maps[None], geometry.padded_size)
    if not crop:
        if geometry.output_size is not None:
            raise ValueError("an uncropped resize cannot also resize to another output size")
        return x.squeeze(0)
    x = x[:, :, : geometry.image_size[0], : geometry.image_size[1]]
    if geometry.output_size is not None:
        x = resize(x, geometry.output_size)
    return x.squeeze(0)  # (a view in exported graphs too, where x[0] is a copy)
