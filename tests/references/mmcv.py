"""MMCV operations re-implemented in plain PyTorch (no ``mmcv`` import).

``ConvModule`` (conv, optional BN, ReLU) as the MMSeg heads use it, and the DCNv1
``deform_conv2d`` sampling rule (open-mmlab/mmcv ``mmcv/ops/deform_conv.py``,
``mmcv/ops/csrc/common/cuda/deform_conv_cuda_kernel.cuh``) by bilinear sampling. Deliberately
simple and unoptimised; computed in the dtype of the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IntPair = int | tuple[int, int]


def _pair(value: IntPair) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def ref_conv_module(sd: dict[str, Tensor], prefix: str, x: Tensor, dilation: int = 1) -> Tensor:
    """MMCV ConvModule: conv ("same" padding) -> eval BN (if any) -> ReLU."""
    w = sd[f"{prefix}.weight"]
    pad = dilation * (w.shape[-1] // 2)
    y = F.conv2d(x, w, sd.get(f"{prefix}.bias"), padding=pad, dilation=dilation)
    if f"{prefix}.norm.running_mean" in sd:
        y = F.batch_norm(
            y,
            sd[f"{prefix}.norm.running_mean"],
            sd[f"{prefix}.norm.running_var"],
            sd[f"{prefix}.norm.weight"],
            sd[f"{prefix}.norm.bias"],
            training=False,
            eps=1e-5,
        )
    return F.relu(y)


def mmcv_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    deform_groups: int = 1,
) -> Tensor:
    """MMCV ``deform_conv2d`` (DCNv1: no mask, no bias, groups=1) by bilinear sampling.

    For output (ho, wo), tap t = i * kw + j and deform group g (input channels
    ``[g * C / G, (g + 1) * C / G)``), with dy = offset[:, 2 * (g * kh * kw + t)] and
    dx = offset[:, 2 * (g * kh * kw + t) + 1], the input is sampled at
    ``y = ho * stride_h - pad_h + i * dil_h + dy``, ``x = wo * stride_w - pad_w + j * dil_w + dx``.
    A sample with y <= -1, y >= H, x <= -1 or x >= W is 0; otherwise it is the bilinear
    blend of the 4 neighbours (floor/floor+1) where each neighbour outside the image
    contributes 0. The output is ``sum_{c, i, j} weight[o, c, i, j] * sample[c, i, j]``.

    Args:
        x: (B, C, H, W).
        offset: (B, 2 * deform_groups * kh * kw, H_out, W_out).
        weight: (C_out, C, kh, kw).

    Returns:
        (B, C_out, H_out, W_out), H_out = (H + 2 pad_h - (dil_h (kh - 1) + 1)) // stride_h + 1.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    bsz, chans, height, width = x.shape
    c_out, c_in, kh, kw = weight.shape
    if c_in != chans:
        raise ValueError(f"weight expects {c_in} input channels, got {chans}")
    if chans % deform_groups != 0:
        raise ValueError("channels must be divisible by deform_groups")
    h_out = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    w_out = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    taps = kh * kw
    expected = (bsz, 2 * deform_groups * taps, h_out, w_out)
    if tuple(offset.shape) != expected:
        raise ValueError(f"offset shape {tuple(offset.shape)} != expected {expected}")

    dtype, device = x.dtype, x.device
    off = offset.to(dtype).reshape(bsz, deform_groups, taps, 2, h_out, w_out)
    tap_i = torch.arange(kh, device=device).repeat_interleave(kw)  # (K,)
    tap_j = torch.arange(kw, device=device).repeat(kh)  # (K,)
    grid_y = (torch.arange(h_out, device=device) * sh - ph)[None, :] + (tap_i * dh)[:, None]
    grid_x = (torch.arange(w_out, device=device) * sw - pw)[None, :] + (tap_j * dw)[:, None]
    # Sampling positions, each (B, G, K, H_out, W_out).
    pos_y = grid_y.to(dtype)[None, None, :, :, None] + off[:, :, :, 0]
    pos_x = grid_x.to(dtype)[None, None, :, None, :] + off[:, :, :, 1]

    inside = (pos_y > -1) & (pos_y < height) & (pos_x > -1) & (pos_x < width)
    y0 = torch.floor(pos_y)
    x0 = torch.floor(pos_x)
    frac_y = pos_y - y0
    frac_x = pos_x - x0
    y0 = y0.long()
    x0 = x0.long()

    per_group = chans // deform_groups
    flat = x.reshape(bsz, deform_groups, per_group, height * width)
    sampled = torch.zeros(
        bsz, deform_groups, per_group, taps * h_out * w_out, dtype=dtype, device=device
    )
    corners = (
        (0, 0, (1 - frac_y) * (1 - frac_x)),
        (0, 1, (1 - frac_y) * frac_x),
        (1, 0, frac_y * (1 - frac_x)),
        (1, 1, frac_y * frac_x),
    )
    for step_y, step_x, blend in corners:
        cy = y0 + step_y
        cx = x0 + step_x
        usable = inside & (cy >= 0) & (cy <= height - 1) & (cx >= 0) & (cx <= width - 1)
        lin = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).flatten(2)
        lin = lin[:, :, None, :].expand(-1, -1, per_group, -1)
        values = torch.gather(flat, 3, lin)
        scale = torch.where(usable, blend, torch.zeros_like(blend)).flatten(2)
        sampled = sampled + values * scale[:, :, None, :]

    columns = sampled.reshape(bsz, chans, taps, h_out, w_out)
    kernel = weight.to(dtype).reshape(c_out, chans, taps)
    return torch.einsum("bckhw,ock->bohw", columns, kernel)
