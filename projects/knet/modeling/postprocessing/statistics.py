"""Statistics of the full-resolution mask probabilities (:class:`~.base.MaskStatistics`): one
interface, :func:`mask_statistics`; one definition, :func:`full_mask_statistics` (the maps of
``chunk_size`` kernels at a time, resized by :func:`~.base.resize_to_output`, then reduced); one
acceleration, :func:`tiled_mask_statistics`, equal up to floating-point rounding (a pixel can
differ only where two kernels tie, or a probability equals the threshold, to within ~1e-6).

The acceleration evaluates the maps only where they can change the result. Each map is a linear
resize of its stride-4 map, separable into a row and a column operator, ``P_n = R_rows p_n
R_cols^T``, whose weights are >= 0 and sum to 1 per output pixel. On a tile of the output, a map
therefore lies between the minimum and maximum of its low-resolution values over the tile's
support (widened by ``SLACK``), and:

* a kernel whose upper bound (times its score) is below the best lower bound on a tile cannot
  own a pixel there; tiles with one candidate are owned by it without evaluating anything;
* a tile whose bounds lie on one side of the mask threshold adds all or none of its pixels to
  a kernel's mask, and its per-kernel sums follow from that side.

Only the undecided (kernel, tile) pairs are evaluated, as ``R_rows[tile] p_n[support]
R_cols[tile]^T``. Its two forms differ only in how the tiles are made and the pairs batched:

* eager (CPU): the operators are :func:`~.base.resize_to_output` of unit vectors (any geometry;
  the official resizing by construction), the pairs go in batches of bounded memory, and it
  returns None (the caller computes the full maps) where the bounds would not pay off or the
  inputs are not finite;
* traced (exported graphs, whose output is the padded input cropped: an exact upsampling by the
  stride f): a tile of ``CELLS`` f pixels depends on the ``CELLS`` + 2 stride-4 values around its
  cells (the map is replicate-padded by one, the clamping of ``F.interpolate`` at the borders),
  so the tiles are tensors of the input size; all pairs are evaluated at once. Rows are
  written with ``index_put_``, never ``x[index] = rows``: Python's assignment drops leading
  dimensions of size 1 from the rows, which a trace records as a reshape to a constant shape
  (a graph traced with one shared tile would fail on an image with two).

Adding a per-kernel statistic that sums a pixel term of P_n over the output (as ``own_area``
counts ``P_n >= threshold``) is one change: a column of :func:`_pixel_terms` (and its field in
``MaskStatistics``); the definition and both forms of the acceleration reduce every column.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MaskStatistics, OutputGeometry, exporting, resize_to_output

TILE = 32  # output pixels per tile side (eager form)
CELLS = 8  # stride-4 cells per tile side (traced form)
SLACK = 1e-5  # relative slack on the bounds, far above the rounding of the resize
BATCH_PIXELS = 1 << 20  # tile pixels evaluated at once in the eager form (bounds temporaries)
# The bounds pay off while the pixels of the evaluated pairs are at most this share of the
# pixels of the full computation (a tile pixel costs ~2x a pixel of F.interpolate).
MAX_EVALUATED_SHARE = 0.4


def mask_statistics(
    mask_logits: Tensor,
    geometry: OutputGeometry,
    scores: Tensor | None,
    selected: Tensor | None,
    mask_threshold: float = 0.5,
    chunk_size: int = 16,
) -> MaskStatistics:
    """Owner map, areas and selected binary masks from (N, h, w) stride-4 mask logits.

    Args:
        scores: (N,) kernel scores for the owner map and the areas (None: not computed).
        selected: (M,) kernel indices whose thresholded masks are wanted (None: none).
        chunk_size: kernels resized at once by the full computation, at the padded input size
            (fewer for a larger output: see :func:`full_mask_statistics`).

    The tiled computation serves the CPU (where it pays off) and exported graphs whose output
    is the image (no second resize); the full computation serves the rest (GPU).
    """
    if exporting():
        if geometry.output_size is None:
            return tiled_mask_statistics(
                mask_logits, geometry, scores, selected, mask_threshold, traced=True
            )
    elif mask_logits.device.type == "cpu":
        stats = tiled_mask_statistics(mask_logits, geometry, scores, selected, mask_threshold)
        if stats is not None:
            return stats
    return full_mask_statistics(mask_logits, geometry, scores, selected, mask_threshold, chunk_size)


# ----------------------------------------------------------------------------- per-kernel sums
def _pixel_terms(probs: Tensor, threshold: float) -> Tensor:
    """(...) probabilities -> (..., S) pixel terms: column s summed over the output pixels is
    the s-th per-kernel sum of ``MaskStatistics`` (own_area: ``P >= threshold``). A term may
    depend on P only through its side of the threshold (P < or > threshold; free at it): the
    tiles that the bounds place on one side take their terms from a bound."""
    return (probs >= threshold)[..., None]


def _kernel_sums(probs: Tensor, inside: Tensor | None, threshold: float) -> Tensor:
    """(B, h, w) maps -> (B, S) int64 sums of their pixel terms over the pixels ``inside``
    (bool, broadcast to (B, h, w); None: all pixels)."""
    terms = _pixel_terms(probs, threshold)
    if inside is not None:
        terms = terms * inside[..., None]
    return terms.sum((1, 2))


def _statistics(masks: Tensor, owner=None, won_area=None, sums=None) -> MaskStatistics:
    """``MaskStatistics`` of the selected masks and, given scores, of the owner map, the pixels
    won and the (N, S) per-kernel sums (tensors), counted for the kernels that own pixels."""
    if owner is None:  # no scores: empty owner map and sums
        owner = won_area = masks.new_zeros((0,), dtype=torch.int64)
        sums = _kernel_sums(masks.new_zeros((0, 1, 1), dtype=torch.float32), None, 0.5)
    sums = sums * (won_area > 0)[:, None]
    return MaskStatistics(owner, won_area, *sums.unbind(1), selected_masks=masks)


def _count(values: Tensor, n: int) -> Tensor:
    """``torch.bincount(values, minlength=n)`` for values in [0, n); a scatter-add when
    exporting (ONNX has no bincount)."""
    if not exporting():
        return torch.bincount(values, minlength=n)
    return values.new_zeros((n,)).scatter_add(0, values, torch.ones_like(values))


# ----------------------------------------------------------------------------- definition
def full_mask_statistics(
    mask_logits: Tensor,
    geometry: OutputGeometry,
    scores: Tensor | None,
    selected: Tensor | None,
    mask_threshold: float = 0.5,
    chunk_size: int = 16,
) -> MaskStatistics:
    """:func:`mask_statistics` from the full-resolution maps, a chunk of kernels at a time (the
    owner map is reduced on the fly).

    A chunk is ``chunk_size`` kernels at the padded input size, so its maps hold at most
    ``chunk_size x H_pad x W_pad`` floats, a bound set by the configured input size
    (``INPUT.MAX_SIZE_TEST``): an output larger than the input (e.g. a 48-megapixel original)
    takes fewer kernels at a time, down to one. Beyond the outputs (owner map, selected masks),
    memory then grows with the output size by a few (H_out, W_out) maps, not by N of them.
    """
    n = mask_logits.shape[0]
    # Without a second resize the maps stay at the padded size, and the padding is cropped from
    # the reductions (owner map, sums, masks) instead of from every chunk of maps (a view).
    crop_late = geometry.output_size is None
    height, width = geometry.padded_size if crop_late else geometry.out_size
    crop = (slice(None),) + tuple(
        slice(size if crop_late else None) for size in geometry.image_size
    )
    if not exporting():  # (a trace keeps the chunks it was traced with)
        chunk_size = _kernels_per_chunk(chunk_size, geometry.padded_size, (height, width))

    def full_probs(logits: Tensor) -> Tensor:
        return resize_to_output(logits.float().sigmoid(), geometry, crop=not crop_late)

    owner = won_area = sums = None
    if scores is not None:
        best = mask_logits.new_full((height, width), -1.0, dtype=torch.float32)
        owner = mask_logits.new_zeros((height, width), dtype=torch.int64)
        sums = []
        for start in range(0, n, chunk_size):
            probs = full_probs(mask_logits[start : start + chunk_size])
            sums.append(_banded_kernel_sums(probs[crop], mask_threshold))
            scored = probs * scores[start : start + chunk_size, None, None]
            del probs
            chunk_best, chunk_owner = scored.max(0)
            del scored
            better = chunk_best > best  # strict: ties keep the earlier kernel, as argmax does
            if exporting():
                best = torch.where(better, chunk_best, best)
                owner = torch.where(better, chunk_owner + start, owner)
            else:  # in place: no second pair of full-size maps per chunk
                torch.where(better, chunk_best, best, out=best)
                torch.where(better, chunk_owner.add_(start), owner, out=owner)
        owner = owner[crop[1:]]
        won_area, sums = _count(owner.flatten(), n), torch.cat(sums)
    masks = mask_logits.new_zeros((0, height, width), dtype=torch.bool)
    if selected is not None and exporting():
        chunks = [
            full_probs(mask_logits[selected[s : s + chunk_size]]) > mask_threshold
            for s in range(0, selected.shape[0], chunk_size)
        ]
        masks = torch.cat([masks] + chunks)
    elif selected is not None:  # written into the output: the masks are never held twice
        masks = mask_logits.new_empty((selected.shape[0], height, width), dtype=torch.bool)
        for s in range(0, selected.shape[0], chunk_size):
            chunk = selected[s : s + chunk_size]
            torch.gt(full_probs(mask_logits[chunk]), mask_threshold, out=masks[s : s + len(chunk)])
    masks = masks[crop]
    return _statistics(masks, owner, won_area, sums)


def _kernels_per_chunk(
    chunk_size: int, padded_size: tuple[int, int], map_size: tuple[int, int]
) -> int:
    """How many kernels' (H, W) = ``map_size`` maps hold at most as many pixels as
    ``chunk_size`` maps of the padded input: ``chunk_size`` at most, 1 at least."""
    budget = chunk_size * padded_size[0] * padded_size[1]
    return max(1, min(chunk_size, budget // (map_size[0] * map_size[1])))


def _banded_kernel_sums(probs: Tensor, threshold: float) -> Tensor:
    """:func:`_kernel_sums` of (B, H, W) maps over all pixels, summed over bands of rows of
    about ``BATCH_PIXELS`` pixels when not exporting: a sum of the bool terms first casts them
    to int64, 8 bytes a pixel, which for a large output is many times the maps themselves."""
    if exporting():
        return _kernel_sums(probs, None, threshold)
    rows = max(1, BATCH_PIXELS // max(1, probs.shape[0] * probs.shape[2]))
    bands = probs.split(rows, dim=1) if probs.shape[1] else [probs]
    return sum(_kernel_sums(band, None, threshold) for band in bands)


# ----------------------------------------------------------------------------- acceleration
class _Tiles(NamedTuple):
    """One output axis cut into n tiles of T pixels.

    support: (n, L) int64 map positions that each tile depends on; weights: (n, T, L) float32
    operator rows of the tile's pixels on that support (0 where a pixel does not depend on a
    position, and on pixels past the end); valid: (n,) pixels of each tile inside the output.
    """

    support: Tensor
    weights: Tensor
    valid: Tensor


@functools.lru_cache(maxsize=32)
def _operator_tiles(low: int, geometry: OutputGeometry) -> _Tiles:
    """Tiles of ``TILE`` pixels of one axis of ``geometry`` (an (n, 1) geometry, see
    ``OutputGeometry.axis``) of a map of ``low`` positions (eager form)."""
    eye = torch.eye(low, dtype=torch.float32)[:, :, None]  # (low, low, 1): unit vectors
    operator = resize_to_output(eye, geometry)[:, :, 0].t()  # (out, low)
    out = operator.shape[0]
    n = -(-out // TILE)
    operator = torch.cat([operator, operator.new_zeros((n * TILE - out, low))])
    nonzero = (operator != 0).view(n, TILE, low).any(1)  # (n, low)
    first = nonzero.int().argmax(1)
    last = low - 1 - nonzero.flip(1).int().argmax(1)
    positions = first[:, None] + torch.arange(int((last - first).max()) + 1)  # (n, L)
    # the support is [first, last], repeated at its end; the operator is 0 past ``low``
    padded = torch.cat([operator, operator.new_zeros((n * TILE, positions.shape[1]))], 1)
    weights = padded[torch.arange(n * TILE).view(n, TILE, 1), positions[:, None, :]]
    valid = torch.clamp(out - torch.arange(n) * TILE, max=TILE)
    return _Tiles(torch.minimum(positions, last[:, None]), weights, valid)


def _stride_tiles(cells: int, size: int, factor: int, device: torch.device) -> _Tiles:
    """Tiles of ``CELLS * factor`` pixels of one axis of the upsampling by ``factor`` of a map
    of ``cells`` positions (a multiple of ``CELLS``), replicate-padded by one, cropped to
    ``size`` (traced form: tensor operations of the input size only)."""
    window, tile = CELLS + 2, CELLS * factor
    upsampled = OutputGeometry((factor * window, 1), (factor * window, 1))
    eye = torch.eye(window, device=device)[:, :, None]
    operator = resize_to_output(eye, upsampled)[:, :, 0].t()  # (factor * window, window)
    start = torch.arange(cells // CELLS, device=device) * CELLS  # first padded cell of a tile
    support = start[:, None] + torch.arange(window, device=device)
    weights = operator[factor : factor + tile].expand(start.shape[0], -1, -1)  # middle cells
    return _Tiles(support, weights, (size - start * factor).clamp(0, tile))


def _bounds(probs: Tensor, rows: _Tiles, cols: _Tiles) -> tuple[Tensor, Tensor]:
    """(N, h, w) -> lower and upper bounds (N, n_rows, n_cols) of the full-resolution maps on
    each tile: min and max over the tile's support, widened by ``SLACK``."""
    block = probs[:, rows.support]  # (N, n_rows, L_rows, w)
    lower = block.amin(2)[:, :, cols.support].amin(3)
    upper = block.amax(2)[:, :, cols.support].amax(3)
    return lower * (1 - SLACK), upper * (1 + SLACK)


def _tile_values(
    probs: Tensor, kernels: Tensor, tile_rows: Tensor, tile_cols: Tensor, rows: _Tiles, cols: _Tiles
) -> Tensor:
    """Full-resolution probabilities of ``kernels[p]`` on tile (``tile_rows[p]``,
    ``tile_cols[p]``): (P, T, T) = R_rows[tile] p[support] R_cols[tile]^T."""
    patch = probs[
        kernels[:, None, None],
        rows.support[tile_rows][:, :, None],
        cols.support[tile_cols][:, None, :],
    ]  # (P, L_rows, L_cols)
    return rows.weights[tile_rows] @ patch @ cols.weights[tile_cols].transpose(1, 2)


def _valid_pixels(tile_rows: Tensor, tile_cols: Tensor, rows: _Tiles, cols: _Tiles) -> Tensor:
    """(P, T, T) bool: the tile pixels inside the output."""
    pixel = torch.arange(rows.weights.shape[1], device=tile_rows.device)
    inside_rows = pixel < rows.valid[tile_rows][:, None]
    inside_cols = pixel < cols.valid[tile_cols][:, None]
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def _image(tiles: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., n_rows, T, n_cols, T) tiles (a view, or contiguous) -> (..., H, W) image."""
    *lead, n_rows, tile, n_cols, _ = tiles.shape
    return tiles.reshape(*lead, n_rows * tile, n_cols * tile)[..., : size[0], : size[1]]


def _batches(pairs: Tensor, tiles: Tensor | None = None) -> Iterator[tuple[Tensor, ...]]:
    """The columns of (P, C) pairs (kernel, tile row, tile col, ...) in batches of about
    ``BATCH_PIXELS`` tile pixels, cut only between tiles given the (P,) grouped ``tiles``
    ids; all at once when exporting."""
    if exporting():
        yield pairs.unbind(1)
        return
    size = BATCH_PIXELS // (TILE * TILE)
    cuts = list(range(size, pairs.shape[0], size))
    if tiles is not None:  # the first pair of the first tile starting in each block of ``size``
        starts = (tiles.diff() != 0).nonzero()[:, 0] + 1
        block = starts // size
        cuts = starts[torch.cat([block[:1] > 0, block[1:] > block[:-1]])].tolist()
    for part in torch.tensor_split(pairs, cuts) if pairs.shape[0] else ():
        yield part.unbind(1)


def _owner_tiles(
    probs: Tensor, scores: Tensor, candidate: Tensor, single: Tensor, rows: _Tiles, cols: _Tiles
) -> Tensor:
    """(n_rows, n_cols, T, T) owner of every tile pixel: the first kernel maximising
    ``score * P`` among the tile's candidates (N, n_rows, n_cols); ``single`` (n_rows, n_cols)
    owns the tiles with one candidate."""
    tile = rows.weights.shape[1]
    count = candidate.sum(0)
    owner = single[:, :, None, None].repeat(1, 1, tile, tile)
    # the candidates of the shared tiles, by tile (row-major), then kernel, and their tile ids
    pairs = (candidate & (count > 1)).permute(1, 2, 0).nonzero()[:, [2, 0, 1]]
    pairs = torch.cat([pairs, (pairs[:, 1] * count.shape[1] + pairs[:, 2])[:, None]], 1)
    if not exporting():  # tiles by candidate count: batches of tiles of alike counts
        pairs = pairs[count.flatten()[pairs[:, 3]].argsort(stable=True)]
    for k, r, c, index in _batches(pairs, pairs[:, 3]):
        starts = torch.cat([index[:1] >= 0, index[1:] != index[:-1]])
        slot = torch.cumsum(starts.long(), 0) - 1  # which tile of the batch
        first = starts.nonzero()[:, 0]
        rank = torch.arange(index.shape[0], device=index.device) - first[slot]
        # each tile's candidates padded to ``width`` (score -1)
        width = count.max() if exporting() else int(rank.max()) + 1  # (a tensor in a trace)
        scored = probs.new_full((first.shape[0], width, tile, tile), -1.0)
        scored.index_put_(
            (slot, rank), _tile_values(probs, k, r, c, rows, cols) * scores[k][:, None, None]
        )
        # the first candidate (lowest kernel) at the maximum (argmax over dim 1 is slow, and so
        # is amin over int64)
        ranks = torch.arange(width, dtype=torch.int32, device=k.device)[:, None, None]
        at_max = torch.where(scored == scored.amax(1, keepdim=True), ranks, width).amin(1)
        owner.index_put_((r[first], c[first]), k[first[:, None, None] + at_max])
    return owner


def tiled_mask_statistics(
    mask_logits: Tensor,
    geometry: OutputGeometry,
    scores: Tensor | None,
    selected: Tensor | None,
    mask_threshold: float,
    traced: bool = False,
) -> MaskStatistics | None:
    """:func:`mask_statistics` by bounds on tiles (see the module docstring), or None where the
    full computation is cheaper or the inputs are not finite (eager form only).

    Args:
        traced: the form of exported graphs: the output is the padded input (the maps
            upsampled by an integer factor, h and w multiples of ``CELLS``), cropped to the
            image (``geometry.output_size`` None).
    """
    n, h, w = mask_logits.shape
    size = geometry.out_size
    probs = mask_logits.float().sigmoid()
    if traced:
        factor = geometry.padded_size[0] // h
        probs = F.pad(probs[None], (1, 1, 1, 1), mode="replicate")[0]
        rows, cols = (_stride_tiles(m, s, factor, probs.device) for m, s in zip((h, w), size))
    elif n == 0 or bool(probs.sum().isnan()):  # (NaN logits; infinite ones are fine)
        return None
    else:
        rows, cols = _operator_tiles(h, geometry.axis(0)), _operator_tiles(w, geometry.axis(1))
    tile = rows.weights.shape[1]
    lower, upper = _bounds(probs, rows, cols)
    above = lower > mask_threshold
    undecided = ~above & (upper >= mask_threshold)
    if scores is not None:
        best_lower, single = (lower * scores[:, None, None]).max(0)
        candidate = upper * scores[:, None, None] >= best_lower  # may own pixels of the tile

    if not traced:  # the pixels of the pairs left to evaluate, against those of the full maps
        evaluated = 0
        if scores is not None:
            count, may_own = candidate.sum(0), candidate.flatten(1).any(1)
            evaluated += int(count[count > 1].sum()) + int(undecided[may_own].sum())
        if selected is not None:
            evaluated += int(undecided[selected].sum())
        if evaluated * tile * tile > MAX_EVALUATED_SHARE * n * size[0] * size[1]:
            return None

    owner = won_area = sums = None
    if scores is not None:
        owner_tiles = _owner_tiles(probs, scores, candidate, single, rows, cols)
        owner = _image(owner_tiles.transpose(1, 2), size)
        won_area = _count(owner.flatten(), n)
        # the tiles on one side of the threshold take their terms from a bound on that side
        terms = _pixel_terms(torch.where(above, lower, upper), mask_threshold)
        valid = (rows.valid[:, None] * cols.valid[None, :])[..., None]  # (n_rows, n_cols, 1)
        sums = (terms * ~undecided[..., None] * valid).sum((1, 2))
        owned_pairs = (undecided & (won_area > 0)[:, None, None]).nonzero()
        for k, r, c in _batches(owned_pairs):
            values = _tile_values(probs, k, r, c, rows, cols)
            part = _kernel_sums(values, _valid_pixels(r, c, rows, cols), mask_threshold)
            sums = sums.scatter_add(0, k[:, None].expand_as(part), part)
    masks = mask_logits.new_zeros((0, *size), dtype=torch.bool)
    if selected is not None:
        kernels, inverse = selected.unique(return_inverse=True)
        tiles = above[kernels][..., None, None].repeat(1, 1, 1, tile, tile)  # (U, n_r, n_c, T, T)
        for m, r, c in _batches(undecided[kernels].nonzero()):
            tiles.index_put_(
                (m, r, c), _tile_values(probs, kernels[m], r, c, rows, cols) > mask_threshold
            )
        masks = _image(tiles.transpose(2, 3), size)[inverse]
    return _statistics(masks, owner, won_area, sums)
