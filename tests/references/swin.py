"""Microsoft's and MMDetection 2.x's Swin Transformer, re-implemented in plain PyTorch.

Written from the official definitions (microsoft/Swin-Transformer
``models/swin_transformer.py``; open-mmlab/mmdetection v2.x
``mmdet/models/backbones/swin.py``, ``mmdet/models/utils/transformer.py``), with no ``mmcv`` /
``mmdet`` import: the relative position index and shifted-window mask buffers of both, seeded
state dicts in both checkpoint layouts and the key mapping between them, MMDetection's
``PatchMerging`` and ``SwinTransformer`` forward (eval mode), and one block as dense attention.

Everything here is deliberately simple and unoptimised; all functions accept float32 and
float64 inputs and compute in the dtype of the input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by both MMCV's "LN" and Microsoft's code

# --------------------------------------------------------------------------------------
# Relative position index and shifted-window masks
# --------------------------------------------------------------------------------------


def mmdet_relative_position_index(window_h: int, window_w: int) -> Tensor:
    """Relative position index buffer as MMDetection's ``WindowMSA`` builds it.

    MMDetection builds a row vector ``c[n] = r * (2 * window_w - 1) + s`` for the token
    ``n = r * window_w + s``, adds it to its own transpose and reverses the columns.

    Returns:
        int64 tensor of shape (window_h * window_w, window_h * window_w).
    """
    row_step = 2 * window_w - 1
    rows = torch.arange(window_h, dtype=torch.int64) * row_step
    cols = torch.arange(window_w, dtype=torch.int64)
    code = (rows[:, None] + cols[None, :]).reshape(1, -1)  # (1, N)
    table = code + code.transpose(0, 1)  # (N, N): code[a] + code[b]
    return table.flip(1).contiguous()


def microsoft_relative_position_index(window_h: int, window_w: int) -> Tensor:
    """Relative position index buffer as the Microsoft Swin code builds it.

    Coordinate-difference form: for tokens a=(ya, xa), b=(yb, xb) the index is
    ``(ya - yb + window_h - 1) * (2 * window_w - 1) + (xa - xb + window_w - 1)``.

    Returns:
        int64 tensor of shape (window_h * window_w, window_h * window_w).
    """
    ys, xs = torch.meshgrid(
        torch.arange(window_h, dtype=torch.int64),
        torch.arange(window_w, dtype=torch.int64),
        indexing="ij",
    )
    ys = ys.reshape(-1)
    xs = xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (window_h - 1)
    dx = xs[:, None] - xs[None, :] + (window_w - 1)
    return dy * (2 * window_w - 1) + dx


def _region_labels(length: int, window: int, shift: int) -> Tensor:
    """Per-axis region id (0, 1, 2) of the three slices used for the shifted-window mask.

    The slices are ``[0, length - window)``, ``[length - window, length - shift)`` and
    ``[length - shift, length)`` (``length >= window`` is required).
    """
    pos = torch.arange(length)
    return (pos >= length - window).long() + (pos >= length - shift).long()


def _partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * nW, window * window, C).

    Windows are ordered batch first, then window row, then window column.
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _unpartition(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_partition`: (B * nW, window * window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_attention_mask(
    height: int, width: int, window: int, shift: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Additive attention mask of a shifted-window block (MMDetection and Microsoft rule).

    The (height, width) map is labelled with 3 x 3 regions (see :func:`_region_labels`),
    cut into windows, and every token pair with different labels gets -100.0, else 0.0.
    MMDetection evaluates this on the window-padded size at every forward; the Microsoft
    code evaluates it once on the stage resolution and stores it as ``attn_mask``.

    Returns:
        tensor of shape (nW, window * window, window * window), nW = (H / w) * (W / w).
    """
    labels = _region_labels(height, window, shift)[:, None] * 3
    labels = labels + _region_labels(width, window, shift)[None, :]
    windows = _partition(labels[None, :, :, None], window)[..., 0]  # (nW, N)
    differs = windows[:, None, :] != windows[:, :, None]
    mask = torch.zeros(differs.shape, dtype=dtype)
    return mask.masked_fill(differs, -100.0)


# --------------------------------------------------------------------------------------
# Seeded random state dicts
# --------------------------------------------------------------------------------------

# Entry kinds used by the state-dict builders below.
_LN_W, _LN_B, _WEIGHT, _BIAS, _TABLE, _FIXED = "ln_w", "ln_b", "weight", "bias", "table", "fixed"

_Entry = tuple[str, tuple[int, ...], str, object]


def _materialise(entries: Sequence[_Entry], seed: int, lazy: bool) -> dict[str, Tensor]:
    """Turn (key, shape, kind, extra) entries into seeded float32 tensors.

    ``extra`` is the fan-in for ``weight`` entries and the fixed tensor for ``fixed``.
    Linear/conv weights use ``randn * 0.5 / sqrt(fan_in)`` so activations stay O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape, kind, extra in entries:
        if kind == _FIXED:
            assert isinstance(extra, Tensor)
            out[key] = extra
            continue
        if kind == _WEIGHT:
            assert isinstance(extra, int)
            scale, offset = 0.5 / math.sqrt(extra), 0.0
        elif kind == _LN_W:
            scale, offset = 0.1, 1.0
        elif kind == _LN_B:
            scale, offset = 0.05, 0.0
        elif kind == _BIAS:
            scale, offset = 0.02, 0.0
        elif kind == _TABLE:
            scale, offset = 0.5, 0.0
        else:  # pragma: no cover - programming error
            raise ValueError(kind)
        if lazy:
            value = torch.randn((), generator=gen) * scale + offset
            out[key] = value.expand(shape)
        else:
            out[key] = torch.randn(shape, generator=gen) * scale + offset
    return out


def _ln_entries(key: str, dim: int) -> list[_Entry]:
    return [(key + ".weight", (dim,), _LN_W, None), (key + ".bias", (dim,), _LN_B, None)]


def _linear_entries(key: str, d_in: int, d_out: int, bias: bool = True) -> list[_Entry]:
    entries: list[_Entry] = [(key + ".weight", (d_out, d_in), _WEIGHT, d_in)]
    if bias:
        entries.append((key + ".bias", (d_out,), _BIAS, None))
    return entries


def mmdet_swin_state_dict(
    embed_dims: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: int = 7,
    mlp_ratio: int = 4,
    patch_size: int = 4,
    in_channels: int = 3,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    patch_norm: bool = True,
    qkv_bias: bool = True,
    seed: int = 0,
    lazy: bool = False,
    prefix: str = "backbone.",
) -> dict[str, Tensor]:
    """Seeded random weights with the keys/shapes of MMDetection 2.x ``SwinTransformer``.

    Mirrors ``SwinTransformer(...).state_dict()`` (``use_abs_pos_embed=False``), in the
    same order, each key prefixed with ``prefix``. With C_i = embed_dims * 2**i, N = w*w,
    T = (2w - 1)**2 and F_i = mlp_ratio * C_i:

    - ``patch_embed.projection.weight`` (C_0, in_channels, p, p), ``.bias`` (C_0,)
    - ``patch_embed.norm.{weight,bias}`` (C_0,) if ``patch_norm``
    - ``stages.i.blocks.j.norm1.{weight,bias}`` (C_i,)
    - ``stages.i.blocks.j.attn.w_msa.relative_position_bias_table`` (T, heads_i)
    - ``stages.i.blocks.j.attn.w_msa.relative_position_index`` (N, N) int64 (real values)
    - ``stages.i.blocks.j.attn.w_msa.qkv.weight`` (3 C_i, C_i), ``.bias`` (3 C_i,) if
      ``qkv_bias``; ``attn.w_msa.proj.{weight,bias}`` (C_i, C_i), (C_i,)
    - ``stages.i.blocks.j.norm2.{weight,bias}`` (C_i,)
    - ``stages.i.blocks.j.ffn.layers.0.0.{weight,bias}`` (F_i, C_i), (F_i,)
    - ``stages.i.blocks.j.ffn.layers.1.{weight,bias}`` (C_i, F_i), (C_i,)
    - ``stages.i.downsample.norm.{weight,bias}`` (4 C_i,) if ``patch_norm`` (i < last)
    - ``stages.i.downsample.reduction.weight`` (2 C_i, 4 C_i) (no bias) (i < last)
    - ``norm{i}.{weight,bias}`` (C_i,) for i in ``out_indices``

    Float tensors are float32; with ``lazy=True`` each one is a stride-0 expand of a
    single random element (the index buffers stay real).
    """
    num_stages = len(depths)
    entries: list[_Entry] = [
        (
            "patch_embed.projection.weight",
            (embed_dims, in_channels, patch_size, patch_size),
            _WEIGHT,
            in_channels * patch_size * patch_size,
        ),
        ("patch_embed.projection.bias", (embed_dims,), _BIAS, None),
    ]
    if patch_norm:
        entries += _ln_entries("patch_embed.norm", embed_dims)
    index = mmdet_relative_position_index(window_size, window_size)
    table_len = (2 * window_size - 1) ** 2
    for i in range(num_stages):
        dim = embed_dims * 2**i
        hidden = int(mlp_ratio * dim)
        for j in range(depths[i]):
            blk = f"stages.{i}.blocks.{j}."
            entries += _ln_entries(blk + "norm1", dim)
            entries.append(
                (
                    blk + "attn.w_msa.relative_position_bias_table",
                    (table_len, num_heads[i]),
                    _TABLE,
                    None,
                )
            )
            entries.append(
                (
                    blk + "attn.w_msa.relative_position_index",
                    tuple(index.shape),
                    _FIXED,
                    index.clone(),
                )
            )
            entries += _linear_entries(blk + "attn.w_msa.qkv", dim, 3 * dim, bias=qkv_bias)
            entries += _linear_entries(blk + "attn.w_msa.proj", dim, dim)
            entries += _ln_entries(blk + "norm2", dim)
            entries += _linear_entries(blk + "ffn.layers.0.0", dim, hidden)
            entries += _linear_entries(blk + "ffn.layers.1", hidden, dim)
        if i < num_stages - 1:
            if patch_norm:
                entries += _ln_entries(f"stages.{i}.downsample.norm", 4 * dim)
            entries += _linear_entries(
                f"stages.{i}.downsample.reduction", 4 * dim, 2 * dim, bias=False
            )
    for i in out_indices:
        entries += _ln_entries(f"norm{i}", embed_dims * 2**i)
    weights = _materialise(entries, seed, lazy)
    return {prefix + key: value for key, value in weights.items()}


def microsoft_swin_state_dict(
    embed_dims: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: int = 7,
    img_size: int = 224,
    num_classes: int = 1000,
    seed: int = 0,
    lazy: bool = False,
) -> dict[str, Tensor]:
    """Seeded random weights with the keys/shapes of an original Microsoft Swin checkpoint.

    Matches the ``"model"`` dict of e.g. ``swin_tiny_patch4_window7_224.pth`` or (with
    ``num_classes=21841``) ``swin_large_patch4_window7_224_22k.pth`` (patch size 4,
    mlp ratio 4, 3 input channels, no absolute position embedding), in state-dict order.
    Stage i works at resolution R_i = (img_size // 4) // 2**i with C_i = embed_dims * 2**i.

    Per stage the Microsoft block uses an effective window w_i = min(R_i) and no shift
    when min(R_i) <= window_size, else w_i = window_size and shift window_size // 2 on
    odd blocks. Keys:

    - ``patch_embed.proj.{weight,bias}`` (C_0, 3, 4, 4), (C_0,); ``patch_embed.norm.*``
    - ``layers.i.blocks.j.attn_mask`` (nW, w_i**2, w_i**2): a float buffer that exists
      ONLY for odd j in stages with min(R_i) > window_size (for 224/window 7: every odd
      block of stages 0-2, none in stage 3; same for 384/window 12). It precedes the
      block's other keys. Its values are the real -100/0 mask, also when ``lazy``.
    - ``layers.i.blocks.j.norm1.*``, ``attn.relative_position_bias_table``
      ((2 w_i - 1)**2, heads_i), ``attn.relative_position_index`` (w_i**2, w_i**2) int64
      (present in every block), ``attn.qkv.*`` (3 C_i, C_i), ``attn.proj.*``, ``norm2.*``,
      ``mlp.fc1.*`` (4 C_i, C_i), ``mlp.fc2.*`` (C_i, 4 C_i)
    - ``layers.i.downsample.reduction.weight`` (2 C_i, 4 C_i) then
      ``layers.i.downsample.norm.{weight,bias}`` (4 C_i,) for i < last
    - ``norm.{weight,bias}`` (C_last,); ``head.{weight,bias}`` (num_classes, C_last) and
      (num_classes,) when ``num_classes > 0``.
    """
    num_stages = len(depths)
    patch = 4
    res0 = img_size // patch
    entries: list[_Entry] = [
        ("patch_embed.proj.weight", (embed_dims, 3, patch, patch), _WEIGHT, 3 * patch * patch),
        ("patch_embed.proj.bias", (embed_dims,), _BIAS, None),
    ]
    entries += _ln_entries("patch_embed.norm", embed_dims)
    for i in range(num_stages):
        dim = embed_dims * 2**i
        res = res0 // 2**i
        if res <= window_size:
            win, shift_size = res, 0
        else:
            win, shift_size = window_size, window_size // 2
        index = microsoft_relative_position_index(win, win)
        for j in range(depths[i]):
            blk = f"layers.{i}.blocks.{j}."
            if j % 2 == 1 and shift_size > 0:
                mask = shifted_window_attention_mask(res, res, win, shift_size)
                entries.append((blk + "attn_mask", tuple(mask.shape), _FIXED, mask))
            entries += _ln_entries(blk + "norm1", dim)
            entries.append(
                (
                    blk + "attn.relative_position_bias_table",
                    ((2 * win - 1) ** 2, num_heads[i]),
                    _TABLE,
                    None,
                )
            )
            entries.append(
                (blk + "attn.relative_position_index", tuple(index.shape), _FIXED, index.clone())
            )
            entries += _linear_entries(blk + "attn.qkv", dim, 3 * dim)
            entries += _linear_entries(blk + "attn.proj", dim, dim)
            entries += _ln_entries(blk + "norm2", dim)
            entries += _linear_entries(blk + "mlp.fc1", dim, 4 * dim)
            entries += _linear_entries(blk + "mlp.fc2", 4 * dim, dim)
        if i < num_stages - 1:
            entries += _linear_entries(
                f"layers.{i}.downsample.reduction", 4 * dim, 2 * dim, bias=False
            )
            entries += _ln_entries(f"layers.{i}.downsample.norm", 4 * dim)
    last_dim = embed_dims * 2 ** (num_stages - 1)
    entries += _ln_entries("norm", last_dim)
    if num_classes > 0:
        entries += _linear_entries("head", last_dim, num_classes)
    return _materialise(entries, seed, lazy)


# --------------------------------------------------------------------------------------
# MMDetection SwinTransformer forward (eval mode)
# --------------------------------------------------------------------------------------


def _corner_pad(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Amount MMDetection's ``AdaptivePadding(padding="corner")`` adds at bottom/right."""
    out = math.ceil(size / stride)
    return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=_LN_EPS)


def mmdet_patch_merging(
    x_bhwc: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    reduction_weight: Tensor,
) -> Tensor:
    """MMDetection's ``PatchMerging`` (kernel 2, stride 2, "corner" padding, no bias).

    An odd H or W is zero-padded by one row/column at the bottom/right. Each 2x2 block
    becomes a 4C vector in ``nn.Unfold`` order: index ``c * 4 + dy * 2 + dx`` holds
    ``x[2i + dy, 2j + dx, c]`` (channel-major). Then LayerNorm (skipped when
    ``norm_weight`` is None, i.e. ``patch_norm=False``) and ``x @ reduction_weight.T``.

    Args:
        x_bhwc: (B, H, W, C) map, any H, W.
        norm_weight, norm_bias: (4C,) or None.
        reduction_weight: (C_out, 4C), usually C_out = 2C.

    Returns:
        (B, ceil(H / 2), ceil(W / 2), C_out).
    """
    b, h, w, c = x_bhwc.shape
    pad_h, pad_w = _corner_pad(h, 2, 2), _corner_pad(w, 2, 2)
    x = F.pad(x_bhwc, (0, 0, 0, pad_w, 0, pad_h))
    h2, w2 = (h + pad_h) // 2, (w + pad_w) // 2
    x = x.reshape(b, h2, 2, w2, 2, c).permute(0, 1, 3, 5, 2, 4)  # (B, h2, w2, C, dy, dx)
    x = x.reshape(b, h2, w2, 4 * c)
    dtype = x_bhwc.dtype
    if norm_weight is not None:
        x = _layer_norm(x, norm_weight.to(dtype), _cast(norm_bias, dtype))
    return F.linear(x, reduction_weight.to(dtype))


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _window_attention(
    tokens: Tensor,
    qkv_w: Tensor,
    qkv_b: Tensor | None,
    proj_w: Tensor,
    proj_b: Tensor,
    table: Tensor,
    index: Tensor,
    heads: int,
    mask: Tensor | None,
) -> Tensor:
    """Window attention with relative position bias: (B * nW, N, C) -> (B * nW, N, C)."""
    bw, n, c = tokens.shape
    head_dim = c // heads
    qkv = F.linear(tokens, qkv_w, qkv_b).reshape(bw, n, 3, heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, N, d)
    q = q * head_dim**-0.5
    logits = q @ k.transpose(-2, -1)
    bias = table[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
    logits = logits + bias[None]
    if mask is not None:
        n_win = mask.shape[0]
        logits = logits.reshape(bw // n_win, n_win, heads, n, n) + mask[None, :, None]
        logits = logits.reshape(bw, heads, n, n)
    weights = logits.softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(bw, n, c)
    return F.linear(out, proj_w, proj_b)


def mmdet_swin_forward(
    state_dict: dict[str, Tensor],
    x: Tensor,
    embed_dims: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: int = 7,
    mlp_ratio: int = 4,
    patch_size: int = 4,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    patch_norm: bool = True,
    prefix: str = "backbone.",
) -> list[Tensor]:
    """Functional MMDetection 2.x ``SwinTransformer.forward`` in eval mode.

    Uses the keys produced by :func:`mmdet_swin_state_dict` (a missing ``qkv.bias`` means
    ``qkv_bias=False``). Order of operations:

    1. PatchEmbed: zero-pad bottom/right to a multiple of ``patch_size``, conv (kernel =
       stride = patch), flatten to tokens, LayerNorm (if ``patch_norm``).
    2. Block j of stage i: ``x + ShiftWindowMSA(norm1(x))`` then
       ``x + fc2(GELU(fc1(norm2(x))))`` (exact GELU). ShiftWindowMSA zero-pads the normed
       map bottom/right to multiples of the window (padded tokens are NOT masked out), for
       odd j rolls by -(window // 2) and adds the -100 region mask computed on the padded
       size, runs window attention, reverses the windows, rolls back and crops.
       The window is never shrunk to the map size.
    3. After each stage but the last: :func:`mmdet_patch_merging`.
    4. Output i: ``norm{i}`` on the stage map before downsampling.

    Args:
        x: (B, in_channels, H, W) image, any H, W.

    Returns:
        list over ``out_indices`` of (B, embed_dims * 2**i, H_i, W_i) tensors with
        H_0 = ceil(H / patch_size) and H_{i+1} = ceil(H_i / 2).
    """
    dtype, device = x.dtype, x.device

    def get(name: str) -> Tensor:
        return state_dict[prefix + name].to(dtype=dtype, device=device)

    def maybe(name: str) -> Tensor | None:
        key = prefix + name
        if key not in state_dict:
            return None
        return state_dict[key].to(dtype=dtype, device=device)

    # Patch embedding.
    _, _, h_in, w_in = x.shape
    pad_h = _corner_pad(h_in, patch_size, patch_size)
    pad_w = _corner_pad(w_in, patch_size, patch_size)
    feat = F.pad(x, (0, pad_w, 0, pad_h))
    feat = F.conv2d(
        feat,
        get("patch_embed.projection.weight"),
        get("patch_embed.projection.bias"),
        stride=patch_size,
    )
    b, c, h, w = feat.shape
    tokens = feat.flatten(2).transpose(1, 2)  # (B, L, C)
    if patch_norm:
        tokens = _layer_norm(tokens, get("patch_embed.norm.weight"), get("patch_embed.norm.bias"))

    outputs: list[Tensor] = []
    num_stages = len(depths)
    for i in range(num_stages):
        for j in range(depths[i]):
            blk = f"stages.{i}.blocks.{j}."
            shift = window_size // 2 if j % 2 == 1 else 0
            normed = _layer_norm(tokens, get(blk + "norm1.weight"), get(blk + "norm1.bias"))
            grid = normed.reshape(b, h, w, c)
            pad_r = (window_size - w % window_size) % window_size
            pad_b = (window_size - h % window_size) % window_size
            grid = F.pad(grid, (0, 0, 0, pad_r, 0, pad_b))
            hp, wp = h + pad_b, w + pad_r
            mask = None
            if shift > 0:
                grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
                mask = shifted_window_attention_mask(hp, wp, window_size, shift, dtype)
                mask = mask.to(device)
            attended = _window_attention(
                _partition(grid, window_size),
                get(blk + "attn.w_msa.qkv.weight"),
                maybe(blk + "attn.w_msa.qkv.bias"),
                get(blk + "attn.w_msa.proj.weight"),
                get(blk + "attn.w_msa.proj.bias"),
                get(blk + "attn.w_msa.relative_position_bias_table"),
                state_dict[prefix + blk + "attn.w_msa.relative_position_index"].to(device),
                num_heads[i],
                mask,
            )
            grid = _unpartition(attended, window_size, hp, wp)
            if shift > 0:
                grid = torch.roll(grid, shifts=(shift, shift), dims=(1, 2))
            grid = grid[:, :h, :w, :]
            tokens = tokens + grid.reshape(b, h * w, c)

            normed = _layer_norm(tokens, get(blk + "norm2.weight"), get(blk + "norm2.bias"))
            hidden = F.gelu(
                F.linear(
                    normed, get(blk + "ffn.layers.0.0.weight"), get(blk + "ffn.layers.0.0.bias")
                )
            )
            tokens = tokens + F.linear(
                hidden, get(blk + "ffn.layers.1.weight"), get(blk + "ffn.layers.1.bias")
            )

        stage_tokens, stage_h, stage_w, stage_c = tokens, h, w, c
        if i < num_stages - 1:
            down = f"stages.{i}.downsample."
            merged = mmdet_patch_merging(
                tokens.reshape(b, h, w, c),
                maybe(down + "norm.weight") if patch_norm else None,
                maybe(down + "norm.bias") if patch_norm else None,
                get(down + "reduction.weight"),
            )
            _, h, w, c = merged.shape
            tokens = merged.reshape(b, h * w, c)
        if i in out_indices:
            normed = _layer_norm(stage_tokens, get(f"norm{i}.weight"), get(f"norm{i}.bias"))
            outputs.append(normed.reshape(b, stage_h, stage_w, stage_c).permute(0, 3, 1, 2))
    return [out.contiguous() for out in outputs]


# --------------------------------------------------------------------------------------
# Microsoft -> MMDetection keys; one block as dense attention
# --------------------------------------------------------------------------------------


def microsoft_to_mmdet(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Microsoft keys -> MMDet keys, restated from the two layouts (independent of the
    converter); patch merging from slice order (C (dy + 2 dx) + c) to unfold (4 c + 2 dy + dx)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(("head.", "norm.")) or key.endswith("attn_mask"):
            continue
        new = key.replace("patch_embed.proj.", "patch_embed.projection.")
        new = new.replace("layers.", "stages.").replace(".attn.", ".attn.w_msa.")
        new = new.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        if ".downsample." in key:
            c = value.shape[-1] // 4
            perm = [(dy + 2 * dx) * c + ch for ch in range(c) for dy in (0, 1) for dx in (0, 1)]
            value = value[..., perm]
        out[new] = value
    return out


def dense_block(block: torch.nn.Module, x: Tensor) -> Tensor:
    """A Swin block (``knet.modeling.backbone.swin.SwinBlock``, read by its attribute names) as
    full attention over the zero-padded map, in original coordinates.

    Token p attends to token q iff both fall in the same window of the map rolled by -shift;
    the bias uses their offset within that window, and -100 is added when exactly one of them
    wrapped around (original row or column < shift).
    """
    b, h, w, c = x.shape
    win, shift, heads = block.window, block.shift, block.attn.num_heads
    hp, wp = h + (-h % win), w + (-w % win)
    y = F.layer_norm(x, (c,), block.norm1.weight, block.norm1.bias)
    y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h)).reshape(b, hp * wp, c)
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    ry, rx = (rows - shift) % hp, (cols - shift) % wp  # coordinates in the rolled map
    same_window = (ry[:, None] // win == ry[None, :] // win) & (
        rx[:, None] // win == rx[None, :] // win
    )
    wy, wx = rows < shift, cols < shift
    other_region = (wy[:, None] != wy[None, :]) | (wx[:, None] != wx[None, :])
    dy = (ry % win)[:, None] - (ry % win)[None, :] + win - 1
    dx = (rx % win)[:, None] - (rx % win)[None, :] + win - 1
    bias = block.attn.relative_position_bias_table[dy * (2 * win - 1) + dx]  # (L, L, heads)

    d = c // heads
    qkv = F.linear(y, block.attn.qkv.weight, block.attn.qkv.bias).view(b, -1, 3, heads, d)
    q, k, v = qkv.unbind(2)  # (B, L, heads, d)
    logits = torch.einsum("bphd,bqhd->bhpq", q, k) * d**-0.5 + bias.permute(2, 0, 1)
    logits = logits + torch.where(other_region, -100.0, 0.0).to(x.dtype)
    logits = logits.masked_fill(~same_window, float("-inf"))
    out = torch.einsum("bhpq,bqhd->bphd", logits.softmax(-1), v).reshape(b, hp * wp, c)
    out = F.linear(out, block.attn.proj.weight, block.attn.proj.bias)
    x = x + out.view(b, hp, wp, c)[:, :h, :w]
    z = F.layer_norm(x, (c,), block.norm2.weight, block.norm2.bias)
    return x + F.linear(
        F.gelu(F.linear(z, block.mlp.fc1.weight, block.mlp.fc1.bias)),
        block.mlp.fc2.weight,
        block.mlp.fc2.bias,
    )
