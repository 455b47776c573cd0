"""Tile-bounded :func:`~.post_processor.mask_statistics` for exported graphs.

The same bounds as :mod:`.tiled_mask_statistics`, written with the operations TorchScript
tracing and ONNX keep dynamic (no Python loop over data, no caches): exported models resize the
stride-4 maps only to the padded input (the output is the image itself), an exact x4 bilinear
upsampling, so a tile of 32 x 32 output pixels depends on the 10 x 10 stride-4 values around its
8 x 8 cells (one more on each side; the map is replicate-padded, which is the clamping of
``F.interpolate`` at the borders).

* Bounds: max-pooling over those windows gives each map's minimum and maximum on every tile.
* Owner: on a tile only the kernels whose upper bound (times their score) reaches the best lower
  bound can own a pixel; tiles with one such candidate are owned by it, the others are
  evaluated for their candidates only, with ``F.interpolate`` of the 10 x 10 patches (the same
  upsampling, translated: the values equal the full maps' up to rounding).
* Areas and masks: tiles whose bounds lie above or below the threshold are counted or filled
  without evaluation; the others are evaluated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers import resize
from .post_processor import MaskStatistics, OutputGeometry

__all__ = ["exported_mask_statistics"]

CELLS = 8  # stride-4 cells per tile side
SLACK = 1e-5  # relative slack on the bounds, far above the rounding of the resize


def exported_mask_statistics(
    mask_logits: Tensor,
    geometry: OutputGeometry,
    scores: Tensor | None,
    selected: Tensor | None,
    mask_threshold: float,
    factor: int,
) -> MaskStatistics:
    """:func:`~.post_processor.mask_statistics` of (N, h, w) logits upsampled by ``factor``
    to the padded size (h, w multiples of 8), the output being the image (no second resize)."""
    tile = CELLS * factor
    height, width = geometry.image_size
    probs = F.pad(mask_logits.float().sigmoid()[None], (1, 1, 1, 1), mode="replicate")
    upper = F.max_pool2d(probs, CELLS + 2, CELLS)[0] * (1 + SLACK)  # (N, n_rows, n_cols)
    lower = -F.max_pool2d(-probs, CELLS + 2, CELLS)[0] * (1 - SLACK)
    probs = probs[0]
    n_rows, n_cols = upper.shape[1], upper.shape[2]
    window = torch.arange(CELLS + 2, device=probs.device)

    def values(kernels: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """(P, tile, tile) full-resolution probabilities of kernel ``kernels[p]`` on tile
        (``rows[p]``, ``cols[p]``)."""
        r = rows[:, None] * CELLS + window
        c = cols[:, None] * CELLS + window
        patch = probs[kernels[:, None, None], r[:, :, None], c[:, None, :]]
        size = (factor * (CELLS + 2),) * 2  # x ``factor``, as the padded-size maps
        up = resize(patch[:, None], size)
        return up[:, 0, factor : factor + tile, factor : factor + tile]

    def image(tiles: Tensor) -> Tensor:
        """(..., n_rows, n_cols, tile, tile) -> (..., H, W)."""
        lead = tiles.shape[:-4]
        laid_out = tiles.transpose(-3, -2).reshape(*lead, n_rows * tile, n_cols * tile)
        return laid_out[..., :height, :width]

    above = lower > mask_threshold
    undecided = ~above & (upper >= mask_threshold)
    owner = won_area = own_area = mask_logits.new_zeros((0,), dtype=torch.int64)
    if scores is not None:
        owner = image(_owner_tiles(values, scores, lower, upper, tile))
        won_area = torch.zeros_like(scores, dtype=torch.int64).scatter_add(
            0, owner.flatten(), torch.ones_like(owner.flatten())
        )
        owning = won_area > 0
        valid_rows = torch.clamp(height - torch.arange(n_rows, device=probs.device) * tile, 0, tile)
        valid_cols = torch.clamp(width - torch.arange(n_cols, device=probs.device) * tile, 0, tile)
        own_area = (above * (valid_rows[:, None] * valid_cols[None, :])).flatten(1).sum(1)
        k, r, c = (undecided & owning[:, None, None]).nonzero().unbind(1)
        inside_rows = torch.arange(tile, device=probs.device) < valid_rows[r][:, None]
        inside_cols = torch.arange(tile, device=probs.device) < valid_cols[c][:, None]
        inside = inside_rows[:, :, None] & inside_cols[:, None, :]
        hits = ((values(k, r, c) >= mask_threshold) & inside).flatten(1).sum(1)
        own_area = own_area.scatter_add(0, k, hits) * owning
    masks = mask_logits.new_zeros((0, height, width), dtype=torch.bool)
    if selected is not None:
        tiles = above[selected][:, :, :, None, None].repeat(1, 1, 1, tile, tile)
        m, r, c = undecided[selected].nonzero().unbind(1)
        tiles[m, r, c] = values(selected[m], r, c) > mask_threshold
        masks = image(tiles)
    return MaskStatistics(owner, won_area, own_area, masks)


def _owner_tiles(values, scores: Tensor, lower: Tensor, upper: Tensor, tile: int) -> Tensor:
    """(n_rows, n_cols, tile, tile) first kernel maximising ``score * P`` at each pixel."""
    n = scores.shape[0]
    scale = scores[:, None, None]
    best_lower, single = (lower * scale).max(0)  # (n_rows, n_cols)
    candidate = upper * scale >= best_lower  # (N, n_rows, n_cols): may own pixels there
    shared = candidate.sum(0) > 1
    owner = single[:, :, None, None].repeat(1, 1, tile, tile)
    # the candidates of the shared tiles, by tile (row-major), then kernel
    rows, cols, kernels = (candidate & shared[None]).permute(1, 2, 0).nonzero().unbind(1)
    tile_of_pair = rows * shared.shape[1] + cols
    starts = torch.cat([tile_of_pair[:1] >= 0, tile_of_pair[1:] != tile_of_pair[:-1]])
    slot = torch.cumsum(starts.long(), 0) - 1  # which shared tile
    first = starts.nonzero()[:, 0]
    rank = torch.arange(tile_of_pair.shape[0], device=scores.device) - first[slot]
    # pad each tile's candidates to the largest count; the argmax takes the first maximum
    count = candidate.sum(0).max()  # (a tensor: the size stays dynamic in a trace)
    table = torch.full((first.shape[0], count), n, dtype=torch.long, device=scores.device)
    table[slot, rank] = kernels
    scored = values(kernels, rows, cols) * scores[kernels][:, None, None]
    padded = scored.new_full((first.shape[0], count, tile, tile), -1.0)
    padded[slot, rank] = scored
    best = padded.argmax(1)  # (S, tile, tile)
    winners = table.gather(1, best.flatten(1)).view(-1, tile, tile)
    owner[rows[first], cols[first]] = winners
    return owner
