"""Per-pixel kernel assignment of the panoptic merge, computed exactly at full resolution.

The official merge gives every output pixel to the kernel maximising ``score * prob`` and
compares each kernel's won area with its own thresholded area. ``kernel_owner_and_areas``
computes both without materialising all full-resolution maps where it can (see the tiled
merge below) and otherwise chunk by chunk; both paths give bit-identical results.
"""

import bisect
import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F


def mask_probs_at_image_size(
    mask_logits: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
) -> torch.Tensor:
    """Sigmoid probabilities resized as the official code does.

    (N, h, w) logits -> sigmoid -> bilinear to the padded input size -> crop to the image size
    -> bilinear to the output (original image) size. Returns (N, H_out, W_out) float32.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0, *output_size), dtype=torch.float32)
    probs = mask_logits.float().sigmoid()[None]
    probs = F.interpolate(probs, size=padded_size, mode="bilinear", align_corners=False)
    probs = probs[:, :, : image_size[0], : image_size[1]]
    if tuple(output_size) != tuple(image_size):
        # (a bilinear resize to the same size is the identity: skip it)
        probs = F.interpolate(probs, size=output_size, mode="bilinear", align_corners=False)
    return probs[0]


class SelectedMasks:
    """Collects the binary masks of chosen kernels from the panoptic merge (its probability
    chunks, or the tiles the tiled merge evaluates).

    ``masks`` is (M, H, W) bool, one per entry of ``kernels`` (repeats allowed), thresholded at
    ``prob > mask_threshold`` like ``instance_inference``.
    """

    def __init__(self, kernels: torch.Tensor, mask_threshold: float, output_size):
        self.kernels = kernels
        self.mask_threshold = mask_threshold
        self.output_size = tuple(output_size)
        # allocated on first use: the tiled merge supplies its own, with every pixel written
        self._masks: Optional[torch.Tensor] = None

    @property
    def masks(self) -> torch.Tensor:
        """(M, H, W) bool."""
        if self._masks is None:
            self._masks = torch.zeros(
                (self.kernels.numel(), *self.output_size),
                dtype=torch.bool,
                device=self.kernels.device,
            )
        return self._masks

    @masks.setter
    def masks(self, masks: torch.Tensor) -> None:
        self._masks = masks

    def __call__(self, start: int, probs: torch.Tensor) -> None:
        rows = ((self.kernels >= start) & (self.kernels < start + probs.shape[0])).nonzero()[:, 0]
        if rows.numel():
            self.masks[rows] = probs[self.kernels[rows] - start] > self.mask_threshold


# ----------------------------------------------------------------------------- panoptic merge
#
# The merge needs, at every output pixel, the first kernel maximising score * prob, and the
# thresholded areas of some kernels. Each probability map is a bilinear resize (two stages) of
# the stride-4 probabilities, i.e. at every output pixel a convex combination of low-res values.
# On a tile of the output a map therefore lies between the min and max of its low-res values
# over the tile's support. The tiled merge uses these bounds to find, per tile, the kernels that
# can reach the maximum (or whose threshold test is undecided) and evaluates only those, with
# the floating-point operations of PyTorch's CPU bilinear kernel, so every value it compares is
# bit-identical to the one the chunked merge computes on the full maps.

# Slack on the tile bounds. A resized value is 4 interpolations (2 per stage), each with 2
# roundings and weights w0 = 1 - w1 rounded (w0 + w1 within 2**-25 of 1); the merge multiplies
# it by the score once more. It can thus leave the [min, max] of its low-res sources by less
# than 20 * 2**-24 relative plus 20 * 2**-150 absolute (subnormals); the slack is far larger.
_BOUND_REL = 2.0**-16
_BOUND_ABS = 2.0**-126
_TILE = 32  # image pixels per tile side
_BATCH_PIXELS = 1 << 20  # tile pixels evaluated at once (bounds the temporaries, ~30 MB)
# Time of an element of a tile evaluation over that of an element of the full computation
# (measured 2.5-4 on CPU): the merge runs on the full maps when that is cheaper.
_TILE_COST = 4.0


def _bilinear_axis(
    in_size: int, out_size: int, fused: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sources and weights of a bilinear resize (align_corners=False) along one axis, computed
    like PyTorch's CPU kernel (float32; ``fused``: with fused multiply-adds).

    Returns:
        i0, i1: (out_size,) int64 source positions; w0, w1: (out_size,) float32 weights.
    """
    scale = torch.tensor(float(in_size), dtype=torch.float32) / float(out_size)
    x = torch.arange(out_size, dtype=torch.float32) + 0.5
    if fused:
        # fma(scale, x, -0.5): the float64 product of two floats is exact, and so is adding
        # -0.5 (fewer than 53 significant bits), leaving the single final rounding of an fma.
        src = (scale.double() * x.double() - 0.5).float()
    else:
        src = scale * x - 0.5
    src = src.clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    w1 = (src - i0.float()).clamp(0.0, 1.0)
    i1 = i0 + (i0 < in_size - 1).long()
    return i0, i1, 1.0 - w1, w1


def _lerp(
    p: torch.Tensor, q: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, fused: bool
) -> torch.Tensor:
    """``p * w0 + q * w1`` rounded like PyTorch's CPU bilinear kernel: ``q * w1`` first, then
    one fused multiply-add (``fused``) or a product and a sum. Overwrites and returns ``q``."""
    q.mul_(w1)
    return q.addcmul_(p, w0) if fused else q.add_(p * w0)


def _resize_exact(
    probs: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    fused: bool,
) -> torch.Tensor:
    """(C, h, w) probabilities -> (C, H_out, W_out), with the resizes, crop and roundings of
    ``mask_probs_at_image_size`` (the CPU kernel interpolates along W first, then along H)."""
    stages = [(padded_size, image_size)]
    if tuple(output_size) != tuple(image_size):
        stages.append((output_size, output_size))
    out = probs
    for size, keep in stages:
        hi0, hi1, hw0, hw1 = (t[: keep[0]] for t in _bilinear_axis(out.shape[1], size[0], fused))
        wi0, wi1, ww0, ww1 = (t[: keep[1]] for t in _bilinear_axis(out.shape[2], size[1], fused))
        out = _lerp(out[:, :, wi0], out[:, :, wi1], ww0, ww1, fused)
        out = _lerp(out[:, hi0], out[:, hi1], hw0[:, None], hw1[:, None], fused)
    return out


def _interpolate_probs(
    probs: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
) -> torch.Tensor:
    """``mask_probs_at_image_size`` after its sigmoid: (C, h, w) -> (C, H_out, W_out)."""
    out = F.interpolate(probs[None], size=padded_size, mode="bilinear", align_corners=False)
    out = out[:, :, : image_size[0], : image_size[1]]
    if tuple(output_size) != tuple(image_size):
        out = F.interpolate(out, size=output_size, mode="bilinear", align_corners=False)
    return out[0]


@functools.cache
def _cpu_bilinear_arithmetic() -> Optional[bool]:
    """Whether this PyTorch build's CPU bilinear kernel rounds with fused multiply-adds (True)
    or without (False); None if ``_resize_exact`` reproduces neither bit for bit (the tiled
    merge is then not used). Checked once on values and sizes that exercise both stages,
    clamped borders, odd tails, zeros, ones and subnormals; the fused variant also requires
    ``addcmul`` to be an fma on contiguous and strided operands."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand((5, 23, 37), generator=gen) ** 6
    probs[:, ::7] = 0.0
    probs[:, :, ::5] = 1.0
    probs[0, 3] = 1e-40
    cases = [
        ((92, 148), (92, 148), (92, 148)),
        ((92, 148), (90, 143), (61, 207)),
        ((40, 100), (40, 100), (129, 31)),
    ]
    # operands in [0.5, 1): the float64 a * b + c is exact, its float32 rounding an fma
    a, b, c = (0.5 + 0.5 * torch.rand((61, 17), generator=gen) for _ in range(3))
    fma = (a.double() * b.double() + c.double()).float()
    addcmul_fma = all(
        torch.equal(c[:, s].clone().addcmul_(a[:, s], b[:, s]), fma[:, s])
        for s in (slice(None), slice(0, 15), slice(1, 16, 2))
    )
    for fused in (True, False) if addcmul_fma else (False,):
        if all(
            torch.equal(_resize_exact(probs, *sizes, fused), _interpolate_probs(probs, *sizes))
            for sizes in cases
        ):
            return fused
    return None


@dataclass(frozen=True)
class _AxisTiles:
    """One output axis cut into ``n`` tiles of ``size`` pixels, with the exact resize lookups
    of each tile. Positions past the end of the axis repeat the last one, so all tiles have the
    same shapes: ``pos`` (n, size) are the output positions of each tile, ``valid`` (n,) counts
    the real ones.

    low (n, RL): the low-res positions a tile depends on (an interval, padded by repetition);
    pool: max-pool (kernel, stride, padding) whose windows contain these intervals, if any.
    s1_src0, s1_src1 (n, RI): low-res sources of the tile's positions in the cropped padded-size
    map (its image positions); s1_loc0, s1_loc1: the same as offsets into ``low``;
    s1_w0, s1_w1 (n, RI) float32 weights.
    s2_loc0, s2_loc1 (n, size): sources of the output positions as offsets into the tile's
    image positions; s2_w0, s2_w1 (n, size); all None when there is no second resize.
    """

    n: int
    size: int
    pos: torch.Tensor
    valid: torch.Tensor
    low: torch.Tensor
    pool: Optional[Tuple[int, int, int]]
    s1_src0: torch.Tensor
    s1_src1: torch.Tensor
    s1_loc0: torch.Tensor
    s1_loc1: torch.Tensor
    s1_w0: torch.Tensor
    s1_w1: torch.Tensor
    s2_loc0: Optional[torch.Tensor]
    s2_loc1: Optional[torch.Tensor]
    s2_w0: Optional[torch.Tensor]
    s2_w1: Optional[torch.Tensor]


def _span(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(n,) inclusive intervals -> (n, max length) positions, padded by repeating the last."""
    length = int((last - first).max()) + 1
    return torch.minimum(first[:, None] + torch.arange(length), last[:, None])


@functools.lru_cache(maxsize=16)
def _axis_tiles(
    low: int, padded: int, image: int, output: int, second_stage: bool, tile: int, fused: bool
) -> _AxisTiles:
    """Tiles of one axis: ``low`` -> ``padded`` (bilinear), crop to ``image``, then (if
    ``second_stage``) ``image`` -> ``output`` (bilinear)."""
    n = -(-output // tile)
    starts = torch.arange(n) * tile
    pos = torch.clamp_max(starts[:, None] + torch.arange(tile), output - 1)  # (n, tile)
    a0, a1, aw0, aw1 = _bilinear_axis(low, padded, fused)
    s2 = (None,) * 4
    if second_stage:
        b0, b1, bw0, bw1 = _bilinear_axis(image, output, fused)
        first = b0[pos[:, 0]]
        img = _span(first, b1[pos[:, -1]])
        s2 = (b0[pos] - first[:, None], b1[pos] - first[:, None], bw0[pos], bw1[pos])
    else:
        img = pos
    low_first, low_last = a0[img[:, 0]], a1[img[:, -1]]
    return _AxisTiles(
        n=n,
        size=tile,
        pos=pos,
        valid=torch.clamp_max(output - starts, tile),
        low=_span(low_first, low_last),
        pool=_pool_window(low_first, low_last, low),
        s1_src0=a0[img],
        s1_src1=a1[img],
        s1_loc0=a0[img] - low_first[:, None],
        s1_loc1=a1[img] - low_first[:, None],
        s1_w0=aw0[img],
        s1_w1=aw1[img],
        s2_loc0=s2[0],
        s2_loc1=s2[1],
        s2_w0=s2[2],
        s2_w1=s2[3],
    )


def _pool_window(
    first: torch.Tensor, last: torch.Tensor, length: int
) -> Optional[Tuple[int, int, int]]:
    """(kernel, stride, padding) of max-pool windows ``[stride * t - padding, ... + kernel)``
    that contain the intervals ``[first[t], last[t]]`` of an axis of ``length`` positions, or
    None where no such windows fit ``F.max_pool2d`` (it then needs a gather)."""
    n = first.numel()
    stride = max(1, round(float(first[-1] - first[0]) / (n - 1))) if n > 1 else 1
    start = torch.arange(n) * stride
    padding = max(0, int((start - first).max()))
    kernel = int((last - (start - padding)).max()) + 1
    if padding > kernel // 2 or (length + 2 * padding - kernel) // stride + 1 < n:
        return None
    return kernel, stride, padding


def _tile_bounds(
    probs: torch.Tensor, rows: _AxisTiles, cols: _AxisTiles
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, h, w) low-res probabilities -> lower and upper bounds (N, n_rows, n_cols) float64 of
    each map over each tile's support (the min and max over a window containing it): the
    resized values lie between them, up to ``_widen``."""
    if rows.pool is not None and cols.pool is not None:
        # one pass each; windows wider than a support only loosen the bounds
        pool = [tuple(v) for v in zip(rows.pool, cols.pool)]
        upper = F.max_pool2d(probs, *pool)[:, : rows.n, : cols.n]
        lower = F.max_pool2d(probs.neg(), *pool)[:, : rows.n, : cols.n].neg_()
    else:
        block = probs[:, rows.low]  # (N, n_rows, RL, w)
        lower = block.amin(2)[:, :, cols.low].amin(3)
        upper = block.amax(2)[:, :, cols.low].amax(3)
    return lower.double(), upper.double()


def _widen(
    lower: torch.Tensor, upper: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bounds on the sources of computed values (N, ...) -> bounds on the computed values
    (times ``scale`` (N,) if given) as float64, with the slack for their roundings."""
    low, high = 1.0 - _BOUND_REL, 1.0 + _BOUND_REL
    if scale is not None:
        shape = (-1,) + (1,) * (lower.dim() - 1)
        low, high = (scale * low).view(shape), (scale * high).view(shape)
    return lower * low - _BOUND_ABS, upper * high + _BOUND_ABS


def _tile_probs(
    probs: torch.Tensor,
    kernels: torch.Tensor,
    tile_rows: torch.Tensor,
    tile_cols: torch.Tensor,
    rows: _AxisTiles,
    cols: _AxisTiles,
    fused: bool,
) -> torch.Tensor:
    """Resized probabilities of kernel ``kernels[p]`` on tile (``tile_rows[p]``,
    ``tile_cols[p]``), bit-identical to ``mask_probs_at_image_size``.

    Args:
        probs: (N, h, w) low-res probabilities; kernels, tile_rows, tile_cols: (P,) int64.

    Returns:
        (P, rows.size, cols.size) float32 (positions past the output edge repeat the last).
    """
    pair = torch.arange(kernels.numel())[:, None, None]
    # stage 1 along W, on the low-res rows of the tile: (P, RL, CI)
    at = (kernels[:, None, None], rows.low[tile_rows][:, :, None])
    out = _lerp(
        probs[(*at, cols.s1_src0[tile_cols][:, None])],
        probs[(*at, cols.s1_src1[tile_cols][:, None])],
        cols.s1_w0[tile_cols][:, None],
        cols.s1_w1[tile_cols][:, None],
        fused,
    )
    # stage 1 along H: (P, RI, CI)
    out = _lerp(
        out[pair[:, 0], rows.s1_loc0[tile_rows]],
        out[pair[:, 0], rows.s1_loc1[tile_rows]],
        rows.s1_w0[tile_rows][:, :, None],
        rows.s1_w1[tile_rows][:, :, None],
        fused,
    )
    if rows.s2_loc0 is not None:
        # stage 2 along W: (P, RI, TW), then along H: (P, TH, TW)
        at = (pair, torch.arange(out.shape[1])[:, None])
        out = _lerp(
            out[(*at, cols.s2_loc0[tile_cols][:, None])],
            out[(*at, cols.s2_loc1[tile_cols][:, None])],
            cols.s2_w0[tile_cols][:, None],
            cols.s2_w1[tile_cols][:, None],
            fused,
        )
        out = _lerp(
            out[pair[:, 0], rows.s2_loc0[tile_rows]],
            out[pair[:, 0], rows.s2_loc1[tile_rows]],
            rows.s2_w0[tile_rows][:, :, None],
            rows.s2_w1[tile_rows][:, :, None],
            fused,
        )
    return out


def _chunked_sigmoid(mask_logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N, h, w) -> (N, h, w) float32 probabilities, computed chunk by chunk exactly as the
    chunked merge does (the vectorised and scalar sigmoid paths may differ in the last bit,
    and which elements take which path depends on the tensor the call sees)."""
    out = torch.empty(mask_logits.shape, dtype=torch.float32, device=mask_logits.device)
    for start in range(0, mask_logits.shape[0], chunk_size):
        chunk = mask_logits[start : start + chunk_size].float()
        if chunk.is_contiguous():
            torch.sigmoid(chunk, out=out[start : start + chunk.shape[0]])
        else:  # the call must see the same (strided) tensor as the chunked merge's
            out[start : start + chunk.shape[0]] = chunk.sigmoid()
    return out


def _tiled_merge_arithmetic(
    mask_logits: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    chunk_size: int,
    on_chunk: Optional[Callable[[int, torch.Tensor], None]],
) -> Optional[bool]:
    """The ``fused`` flag for the tiled merge, or None where it cannot reproduce the chunked
    merge bit for bit and that one must run."""
    n, h, w = mask_logits.shape
    if mask_logits.device.type != "cpu" or n == 0 or h * w < 2:
        return None
    if on_chunk is not None:
        if not isinstance(on_chunk, SelectedMasks):
            return None  # an arbitrary callback needs the full maps
        kernels = on_chunk.kernels
        if on_chunk.output_size != tuple(output_size) or kernels.device.type != "cpu":
            return None
        if kernels.numel() and not (0 <= int(kernels.min()) and int(kernels.max()) < n):
            return None
    if any(i > p for i, p in zip(image_size, padded_size)) or min(image_size) < 1:
        return None
    # F.interpolate uses its generic CPU kernel (the one emulated) except for outputs with
    # H + W <= 128 and, single-threaded, for 3-channel inputs (a channels-last kernel).
    if sum(padded_size) <= 128:
        return None
    if tuple(output_size) != tuple(image_size) and sum(output_size) <= 128:
        return None
    if torch.get_num_threads() == 1 and 3 in {
        min(chunk_size, n - s) for s in range(0, n, chunk_size)
    }:
        return None
    return _cpu_bilinear_arithmetic()


def _chunked_owner_and_areas(
    scores: torch.Tensor,
    mask_logits: torch.Tensor,
    mask_threshold: float,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    chunk_size: int,
    on_chunk: Optional[Callable[[int, torch.Tensor], None]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merge's reductions on the full maps, ``chunk_size`` kernels at a time.

    Returns:
        owner: (H_out, W_out) int64 first kernel maximising score * prob;
        won_area, own_area: (N,) int64 pixels owned and pixels with prob >= mask_threshold.
    """
    n = scores.numel()
    device = mask_logits.device
    best = torch.full(output_size, -1.0, dtype=torch.float32, device=device)
    owner = torch.zeros(output_size, dtype=torch.int64, device=device)
    own_area = torch.zeros(n, dtype=torch.int64, device=device)
    for start in range(0, n, chunk_size):
        probs = mask_probs_at_image_size(
            mask_logits[start : start + chunk_size], padded_size, image_size, output_size
        )
        if on_chunk is not None:
            on_chunk(start, probs)
        own_area[start : start + probs.shape[0]] = torch.count_nonzero(
            probs >= mask_threshold, dim=(1, 2)
        )
        probs.mul_(scores[start : start + probs.shape[0], None, None])
        chunk_best, chunk_owner = probs.max(dim=0)
        # strict ">" keeps the earlier kernel on ties, as a global argmax does
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        owner = torch.where(better, chunk_owner + start, owner)
    return owner, torch.bincount(owner.flatten(), minlength=n), own_area


def _threshold_bounds(threshold: float) -> Tuple[float, float]:
    """The threshold as a float64 and as the float32 it is compared in: (lowest, highest)."""
    as_float32 = float(torch.tensor(threshold, dtype=torch.float32))
    return min(threshold, as_float32), max(threshold, as_float32)


def _tiled_owner_and_areas(
    scores: torch.Tensor,
    probs: torch.Tensor,
    keepable: torch.Tensor,
    mask_threshold: float,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    selected: Optional[SelectedMasks],
    fused: bool,
) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The reductions of ``_chunked_owner_and_areas``, evaluating only what the tile bounds
    leave undecided.

    Args:
        scores: (N,) float32; probs: (N, h, w) contiguous low-res probabilities;
        keepable: (N,) bool, the kernels whose own area may be used: ``own_area`` is exact for
            those that win pixels (the others get 0);
        selected: gets its masks (on CPU, kernels in [0, N));
        fused: the CPU bilinear arithmetic (``_cpu_bilinear_arithmetic``).

    Returns:
        As ``_chunked_owner_and_areas``, or None (nothing written) where ``probs`` has a NaN or
        the bounds leave so much undecided that the full maps are cheaper.
    """
    n, h, w = probs.shape
    height, width = output_size
    second = tuple(output_size) != tuple(image_size)
    # tiles of about _TILE pixels of the image (where the bounds come from), in output pixels
    tile = [
        max(8, min(2 * _TILE, round(_TILE * o / i))) if second else _TILE
        for i, o in zip(image_size, output_size)
    ]
    rows = _axis_tiles(h, padded_size[0], image_size[0], height, second, tile[0], fused)
    cols = _axis_tiles(w, padded_size[1], image_size[1], width, second, tile[1], fused)
    th, tw = rows.size, cols.size
    src_lower, src_upper = _tile_bounds(probs, rows, cols)
    if bool(src_upper.sum().isnan()):  # the max pools propagate NaN
        return None

    # -- owner candidates: per tile, the kernels whose best value can reach the best value
    # guaranteed there. The true maximum, and any kernel tying with it, is >= that guarantee,
    # so the first argmax among the candidates (in kernel order) is the first argmax of all.
    lower, upper = _widen(src_lower, src_upper, scores.double())
    best_lower, single = lower.max(0)  # a candidate, the only one of 1-candidate tiles
    reach = upper >= best_lower  # (N, n_rows, n_cols)
    count = reach.sum(0)

    # -- threshold tests: prob >= mask_threshold (own areas) and prob > the selected masks'
    # threshold; a tile is decided when its bounds lie on one side, else it is evaluated.
    lower, upper = _widen(src_lower, src_upper)
    lo, hi = _threshold_bounds(mask_threshold)
    area_all = lower >= hi
    area_open = ~area_all & (upper >= lo)
    # a kernel can only win pixels of tiles where it is a candidate
    may_need = keepable & reach.flatten(1).any(1)
    mask_open = None
    if selected is not None:
        unique, inverse = selected.kernels.unique(return_inverse=True)
        m_lo, m_hi = _threshold_bounds(selected.mask_threshold)
        mask_all = lower[unique] > m_hi  # (U, n_rows, n_cols)
        mask_open = ~mask_all & (upper[unique] > m_lo)

    # -- cost guard: where most tiles stay undecided, the full maps are cheaper
    pairs = int(count[count > 1].sum())
    pairs += int(area_open[may_need].sum()) + (0 if mask_open is None else int(mask_open.sum()))
    per_pair = (rows.low.shape[1] + rows.s1_src0.shape[1]) * cols.s1_src0.shape[1]
    per_map = padded_size[0] * padded_size[1] + 4 * height * width
    if second:
        per_pair += rows.s1_src0.shape[1] * tw + th * tw
        per_map += height * width
    if _TILE_COST * pairs * per_pair > n * per_map:
        return None

    row_tile = torch.arange(height) // th  # tile of each output row / column
    col_tile = torch.arange(width) // tw

    def flat_positions(ty: torch.Tensor, tx: torch.Tensor) -> torch.Tensor:
        """(P,) tiles -> (P, th, tw) flat output positions (clamped at the edges, where the
        repeated positions get the values of the last row / column)."""
        return rows.pos[ty][:, :, None] * width + cols.pos[tx][:, None, :]

    # -- owner
    owner = torch.index_select(single[:, col_tile], 0, row_tile)  # (H_out, W_out)
    owner_flat = owner.view(-1)
    # Tiles with several candidates: evaluate them all, in batches of whole tiles, and take per
    # pixel the first kernel reaching the tile's maximum (candidates are in kernel order).
    tiles = (count > 1).nonzero()  # (T, 2) row-major
    tile_pairs = count[tiles[:, 0], tiles[:, 1]]  # (T,) candidates per tile
    kern = reach[:, tiles[:, 0], tiles[:, 1]].t().nonzero()[:, 1]  # (P,) by tile, then kernel
    ends = tile_pairs.cumsum(0).tolist()
    budget = max(1, _BATCH_PIXELS // (th * tw))
    t0 = 0
    while t0 < len(ends):
        p0 = ends[t0 - 1] if t0 else 0
        t1 = max(t0 + 1, bisect.bisect_right(ends, p0 + budget, lo=t0))
        lengths = tile_pairs[t0:t1]
        ty, tx = tiles[t0:t1].repeat_interleave(lengths, 0).unbind(1)
        k = kern[p0 : ends[t1 - 1]]
        values = _tile_probs(probs, k, ty, tx, rows, cols, fused).view(-1, th * tw)
        values.mul_(scores[k][:, None])
        top = torch.segment_reduce(values, "max", lengths=lengths)
        first = torch.where(values == top.repeat_interleave(lengths, 0), k[:, None].float(), n)
        first = torch.segment_reduce(first, "min", lengths=lengths).long()
        owner_flat[flat_positions(*tiles[t0:t1].unbind(1))] = first.view(-1, th, tw)
        t0 = t1
    won_area = torch.bincount(owner_flat, minlength=n)

    # -- areas of the kernels that win pixels and may be kept, and the selected masks
    need = (won_area > 0) & keepable
    own_area = torch.zeros(n, dtype=torch.int64)
    own_area[need] = (area_all[need] * (rows.valid[:, None] * cols.valid[None, :])).sum((1, 2))
    evaluate = area_open & need[:, None, None]
    slot = torch.full((n,), -1, dtype=torch.int64)
    if selected is not None:
        slot[unique] = torch.arange(unique.numel())
        evaluate[unique] |= mask_open
        masks = torch.index_select(mask_all[inverse][:, :, col_tile], 1, row_tile)
        # the rows of each selected kernel (it may be selected with several classes), -1 padded
        order = torch.argsort(inverse, stable=True)
        repeats = torch.bincount(inverse, minlength=unique.numel())
        rank = torch.arange(order.numel()) - (repeats.cumsum(0) - repeats)[inverse[order]]
        most = int(repeats.max()) if repeats.numel() else 0
        rows_of_slot = torch.full((unique.numel(), most), -1)
        rows_of_slot[inverse[order], rank] = order
    pairs = evaluate.nonzero()
    step = max(1, _BATCH_PIXELS // (th * tw))
    for start in range(0, pairs.shape[0], step):
        kern, ty, tx = pairs[start : start + step].unbind(1)
        values = _tile_probs(probs, kern, ty, tx, rows, cols, fused)
        counted = area_open[kern, ty, tx] & need[kern]  # (others: decided or not needed)
        if bool(counted.any()):
            inside = (torch.arange(th) < rows.valid[ty][:, None])[:, :, None] & (
                torch.arange(tw) < cols.valid[tx][:, None]
            )[:, None, :]
            hits = ((values >= mask_threshold) & inside).sum((1, 2))
            own_area.index_add_(0, kern[counted], hits[counted])
        if selected is not None and unique.numel():
            table = rows_of_slot[slot[kern]]  # (P, repeats); kernels not selected: none
            pair, row = ((table >= 0) & (slot[kern] >= 0)[:, None]).nonzero().unbind(1)
            row = table[pair, row]
            flat = row[:, None, None] * (height * width) + flat_positions(ty[pair], tx[pair])
            masks.view(-1)[flat] = values[pair] > selected.mask_threshold
    if selected is not None:
        selected.masks = masks
    return owner, won_area, own_area


def kernel_owner_and_areas(
    scores: torch.Tensor,
    mask_logits: torch.Tensor,
    keepable: torch.Tensor,
    mask_threshold: float,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    chunk_size: int = 16,
    on_chunk: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Owner of every output pixel and the areas the merge compares.

    Args:
        scores: (N,) kernel scores; mask_logits: (N, h, w) stride-4 mask logits.
        keepable: (N,) bool, kernels the merge may keep (only their own areas are needed).
        mask_threshold: a pixel belongs to a kernel's own area when ``prob >= mask_threshold``.
        padded_size, image_size, output_size: as in ``mask_probs_at_image_size``.
        chunk_size, on_chunk: kernels per chunk of the full-map path and its per-chunk
            callback; a ``SelectedMasks`` callback is served by either path.

    Returns:
        owner (H_out, W_out) int64 first kernel maximising ``score * prob``, won_area (N,) pixels
        owned, own_area (N,) thresholded area (exact for the keepable kernels that win pixels).
    """
    sizes = (padded_size, image_size, output_size)
    fused = _tiled_merge_arithmetic(mask_logits, *sizes, chunk_size, on_chunk)
    if fused is not None:
        reduced = _tiled_owner_and_areas(
            scores.cpu(),
            _chunked_sigmoid(mask_logits, chunk_size),
            keepable.cpu(),
            mask_threshold,
            *sizes,
            on_chunk,
            fused,
        )
        if reduced is not None:
            return reduced
    return _chunked_owner_and_areas(
        scores, mask_logits, mask_threshold, *sizes, chunk_size, on_chunk
    )
