"""CPU accelerator of :func:`~.post_processor.mask_statistics`: evaluate the full-resolution
mask probabilities only where they can change the result.

Each full-resolution probability map is a linear resize of its stride-4 map, separable into a
row operator and a column operator, ``P_n = R_rows p_n R_cols^T``, whose weights are >= 0 and sum
to 1 per output pixel. Both operators are obtained by applying
:func:`~.post_processor.resize_to_output` to unit vectors, so they are the official resizing by
construction. On a tile of the output, a map therefore lies between the minimum and maximum of
its low-resolution values over the tile's support, and:

* a kernel whose upper bound (times its score) is below the best lower bound on a tile cannot
  own a pixel there; tiles with one candidate are owned by it without evaluating anything;
* a tile whose bounds lie on one side of the mask threshold adds all or none of its pixels to
  a kernel's area or mask.

Only the undecided (kernel, tile) pairs are evaluated, as ``R_rows[tile] p_n[support]
R_cols[tile]^T``. The result equals the chunked computation up to floating-point rounding (a
pixel can differ only where two kernels tie, or a probability equals the threshold, to within
~1e-6); it returns None, and the caller computes the full maps, where bounding would not pay
off or the inputs are not finite.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .post_processor import MaskStatistics, OutputGeometry, resize_to_output

__all__ = ["tiled_mask_statistics"]

TILE = 32  # output pixels per tile side
SLACK = 1e-5  # relative slack on the bounds, far above the rounding of the resize
BATCH_PIXELS = 1 << 20  # tile pixels evaluated at once (bounds the temporaries)
# The bounds pay off while the pixels of the evaluated pairs are at most this share of the
# pixels of the full computation (a tile pixel costs ~2x a pixel of F.interpolate).
MAX_EVALUATED_SHARE = 0.4


class _Axis(NamedTuple):
    """One output axis cut into ``n`` tiles of ``TILE`` pixels.

    support: (n, L) int64 low-resolution positions each tile depends on (an interval, repeated
    at its end); weights: (n, TILE, L) float32 operator rows of the tile's pixels on that
    support (0 on the repeats and on pixels past the end); valid: (n,) pixels of each tile.
    """

    n: int
    support: Tensor
    weights: Tensor
    valid: Tensor


@functools.lru_cache(maxsize=32)
def _axis(low: int, geometry: OutputGeometry) -> _Axis:
    """Tiles of one axis of ``geometry`` (an (n, 1) geometry, see ``OutputGeometry.axis``)."""
    eye = torch.eye(low, dtype=torch.float32)[:, :, None]  # (low, low, 1): unit vectors
    operator = resize_to_output(eye, geometry)[:, :, 0].t()  # (out, low)
    out = operator.shape[0]
    n = -(-out // TILE)
    operator = torch.cat([operator, operator.new_zeros((n * TILE - out, low))])
    nonzero = (operator != 0).view(n, TILE, low).any(1)  # (n, low)
    first = nonzero.int().argmax(1)
    last = low - 1 - nonzero.flip(1).int().argmax(1)
    positions = first[:, None] + torch.arange(int((last - first).max()) + 1)  # (n, L)
    # the operator is 0 outside [first, last] of each tile, and past ``low`` (padding)
    padded = torch.cat([operator, operator.new_zeros((n * TILE, positions.shape[1]))], 1)
    weights = padded[torch.arange(n * TILE).view(n, TILE, 1), positions[:, None, :]]
    valid = torch.clamp(out - torch.arange(n) * TILE, max=TILE)
    return _Axis(n, torch.minimum(positions, last[:, None]), weights, valid)


def _bounds(probs: Tensor, rows: _Axis, cols: _Axis) -> tuple[Tensor, Tensor]:
    """(N, h, w) -> lower and upper bounds (N, n_rows, n_cols) of the full-resolution maps on
    each tile: min and max over the tile's support, widened by ``SLACK``."""
    block = probs[:, rows.support]  # (N, n_rows, L_rows, w)
    lower = block.amin(2)[:, :, cols.support].amin(3)
    upper = block.amax(2)[:, :, cols.support].amax(3)
    return lower * (1 - SLACK), upper * (1 + SLACK)


def _tile_values(
    probs: Tensor, kernels: Tensor, tile_rows: Tensor, tile_cols: Tensor, rows: _Axis, cols: _Axis
) -> Tensor:
    """Full-resolution probabilities of ``kernels[p]`` on tile (``tile_rows[p]``,
    ``tile_cols[p]``): (P, TILE, TILE) = R_rows[tile] p[support] R_cols[tile]^T."""
    patch = probs[
        kernels[:, None, None],
        rows.support[tile_rows][:, :, None],
        cols.support[tile_cols][:, None, :],
    ]  # (P, L_rows, L_cols)
    return rows.weights[tile_rows] @ patch @ cols.weights[tile_cols].transpose(1, 2)


def _batches(pairs: Tensor, tile: Tensor | None = None):
    """Split (P, 3) (kernel, tile row, tile col) pairs into batches of a bounded number of
    pixels; with ``tile`` (P,) sorted tile ids, only between tiles (whole tiles per batch)."""
    budget = max(1, BATCH_PIXELS // (TILE * TILE))
    if tile is None:
        cuts = list(range(budget, pairs.shape[0], budget))
    else:
        ends = torch.unique_consecutive(tile, return_counts=True)[1].cumsum(0).tolist()
        cuts, start, previous = [], 0, 0
        for end in ends:
            if end - start > budget and previous > start:
                cuts.append(previous)
                start = previous
            previous = end
    for part in torch.tensor_split(pairs, cuts):
        yield part.unbind(1)


def _valid_pixels(tile_rows: Tensor, tile_cols: Tensor, rows: _Axis, cols: _Axis) -> Tensor:
    """(P, TILE, TILE) bool: the tile pixels inside the output."""
    inside_rows = torch.arange(TILE) < rows.valid[tile_rows][:, None]
    inside_cols = torch.arange(TILE) < cols.valid[tile_cols][:, None]
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def _image(tiles: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., n_rows, TILE, n_cols, TILE) tiles -> (..., H, W) view of the image they tile."""
    *lead, n_rows, _, n_cols, _ = tiles.shape
    return tiles.view(*lead, n_rows * TILE, n_cols * TILE)[..., : size[0], : size[1]]


def _owner_tiles(
    probs: Tensor, scores: Tensor, candidate: Tensor, single: Tensor, rows: _Axis, cols: _Axis
) -> Tensor:
    """(n_rows, TILE, n_cols, TILE) owner of every tile pixel: the first kernel maximising
    ``score * P`` among the tile's candidates (N, n_rows, n_cols); ``single`` (n_rows, n_cols)
    owns the tiles with one candidate."""
    n = probs.shape[0]
    owner = single[:, None, :, None].expand(-1, TILE, -1, TILE).clone()
    # the pairs of the tiles with several candidates, by tile (row-major), then kernel
    tile_row, tile_col, kernel = candidate.permute(1, 2, 0).nonzero().unbind(1)
    shared = (candidate.sum(0) > 1)[tile_row, tile_col]
    pairs = torch.stack([kernel, tile_row, tile_col], 1)[shared]
    for k, r, c in _batches(pairs, pairs[:, 1] * cols.n + pairs[:, 2]):
        values = _tile_values(probs, k, r, c, rows, cols) * scores[k][:, None, None]
        tiles, slot = torch.unique_consecutive(r * cols.n + c, return_inverse=True)
        index = slot[:, None, None].expand_as(values)
        top = values.new_full((tiles.shape[0], TILE, TILE), -1.0)
        top.scatter_reduce_(0, index, values, "amax")
        hit = torch.where(values == top[slot], k[:, None, None], n)  # first kernel at the max
        first = hit.new_full(top.shape, n).scatter_reduce_(0, index, hit, "amin")
        owner[tiles // cols.n, :, tiles % cols.n, :] = first
    return owner


def _open(lower: Tensor, upper: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Tiles entirely above ``threshold`` and tiles the bounds leave undecided."""
    above = lower > threshold
    return above, ~above & (upper >= threshold)


def _areas(
    probs: Tensor, lower: Tensor, upper: Tensor, threshold: float, rows: _Axis, cols: _Axis
) -> Tensor:
    """(K,) int64 pixels with ``P >= threshold`` of the K maps of ``probs``."""
    above, undecided = _open(lower, upper, threshold)
    area = (above * (rows.valid[:, None] * cols.valid[None, :])).sum((1, 2))
    for k, r, c in _batches(undecided.nonzero()):
        values = _tile_values(probs, k, r, c, rows, cols)
        hits = (values >= threshold) & _valid_pixels(r, c, rows, cols)
        area.index_add_(0, k, hits.sum((1, 2)))
    return area


def _masks(
    probs: Tensor, lower: Tensor, upper: Tensor, threshold: float, rows: _Axis, cols: _Axis
) -> Tensor:
    """(K, n_rows, TILE, n_cols, TILE) bool ``P > threshold`` of the K maps of ``probs``."""
    above, undecided = _open(lower, upper, threshold)
    masks = above[:, :, None, :, None].expand(-1, -1, TILE, -1, TILE).clone()
    for k, r, c in _batches(undecided.nonzero()):
        masks[k, r, :, c, :] = _tile_values(probs, k, r, c, rows, cols) > threshold
    return masks


def tiled_mask_statistics(
    mask_logits: Tensor,
    geometry: OutputGeometry,
    scores: Tensor | None,
    selected: Tensor | None,
    mask_threshold: float,
) -> MaskStatistics | None:
    """:func:`~.post_processor.mask_statistics` by bounds on tiles, or None where the full
    computation is cheaper or the inputs are not finite."""
    n, h, w = mask_logits.shape
    probs = mask_logits.float().sigmoid()
    if n == 0 or bool(probs.sum().isnan()):  # (NaN logits; infinite ones are fine)
        return None
    size = geometry.out_size
    rows, cols = _axis(h, geometry.axis(0)), _axis(w, geometry.axis(1))
    lower, upper = _bounds(probs, rows, cols)
    undecided = _open(lower, upper, mask_threshold)[1]

    # cost guard: the pixels of the pairs left to evaluate, against those of the full maps
    evaluated = 0
    if scores is not None:
        best_lower, single = (lower * scores[:, None, None]).max(0)
        candidate = upper * scores[:, None, None] >= best_lower  # may own pixels of the tile
        count = candidate.sum(0)
        may_own = candidate.flatten(1).any(1)
        evaluated += int(count[count > 1].sum()) + int(undecided[may_own].sum())
    if selected is not None:
        evaluated += int(undecided[selected].sum())
    if evaluated * TILE * TILE > MAX_EVALUATED_SHARE * n * size[0] * size[1]:
        return None

    owner = won_area = own_area = mask_logits.new_zeros((0,), dtype=torch.int64)
    masks = mask_logits.new_zeros((0, *size), dtype=torch.bool)
    if scores is not None:
        owner = _image(_owner_tiles(probs, scores, candidate, single, rows, cols), size)
        won_area = torch.bincount(owner.flatten(), minlength=n)
        owning = won_area.nonzero()[:, 0]
        own_area = torch.zeros_like(won_area)
        own_area[owning] = _areas(
            probs[owning], lower[owning], upper[owning], mask_threshold, rows, cols
        )
    if selected is not None:
        unique, inverse = selected.unique(return_inverse=True)
        masks = _masks(probs[unique], lower[unique], upper[unique], mask_threshold, rows, cols)
        masks = _image(masks, size)[inverse]
    return MaskStatistics(owner, won_area, own_area, masks)
