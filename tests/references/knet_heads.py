"""K-Net's heads re-implemented in plain PyTorch from the published equations.

Each function reads parameters by their state-dict names only (float64 in the tests), so a
wiring or naming mistake in a module shows up as a mismatch. Sources (ZwwWayne/K-Net):
``knet/kernel_updator.py`` (``KernelUpdator``), ``knet/det/kernel_update_head.py`` and
``knet/seg/kernel_update_head.py`` (``KernelUpdateHead``), ``knet/det/kernel_head.py``
(``ConvKernelHead``), ``knet/det/semantic_fpn_wrapper.py`` (the localization FPN, MMCV
``ConvModule`` conv -> GN -> ReLU) and MMDetection 2.x's ``SinePositionalEncoding``
(``mmdet/models/utils/positional_encoding.py``, DETR's sine encoding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LN_EPS = 1e-5
GN_EPS = 1e-5


def ref_linear(x: Tensor, p: dict[str, Tensor], name: str) -> Tensor:
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def ref_layer_norm(x: Tensor, p: dict[str, Tensor], name: str) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * p[f"{name}.weight"] + p[f"{name}.bias"]


def ref_group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int = 32) -> Tensor:
    b, c, h, w = x.shape
    g = x.reshape(b, groups, c // groups * h * w)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(
        g.var(-1, unbiased=False, keepdim=True) + GN_EPS
    )
    return g.reshape(b, c, h, w) * weight[None, :, None, None] + bias[None, :, None, None]


def ref_updator(p: dict[str, Tensor], f: Tensor, k: Tensor, prefix: str = "") -> Tensor:
    """``KernelUpdator.forward`` (knet/kernel_updator.py) on rows: f group features (M, C_in),
    k kernels (M, C_in) -> updated kernels (M, C_out).

    With [P_in, P_out] = dynamic_layer(f) and [I_in, I_out] = input_layer(k), each half C wide,
    and G = I_in * P_in: g_k = sigmoid(input_norm_in(input_gate(G))),
    g_f = sigmoid(norm_in(update_gate(G))),
    out = ReLU(fc_norm(fc_layer(g_f * norm_out(P_out) + g_k * input_norm_out(I_out)))).
    """
    c = p[f"{prefix}input_gate.weight"].shape[0]
    dyn = ref_linear(f, p, f"{prefix}dynamic_layer")
    p_in, p_out = dyn[:, :c], dyn[:, c:]
    inp = ref_linear(k, p, f"{prefix}input_layer")
    i_in, i_out = inp[:, :c], inp[:, c:]
    gate_feats = i_in * p_in
    g_k = torch.sigmoid(
        ref_layer_norm(
            ref_linear(gate_feats, p, f"{prefix}input_gate"), p, f"{prefix}input_norm_in"
        )
    )
    g_f = torch.sigmoid(
        ref_layer_norm(ref_linear(gate_feats, p, f"{prefix}update_gate"), p, f"{prefix}norm_in")
    )
    fused = g_f * ref_layer_norm(p_out, p, f"{prefix}norm_out") + g_k * ref_layer_norm(
        i_out, p, f"{prefix}input_norm_out"
    )
    return torch.relu(
        ref_layer_norm(ref_linear(fused, p, f"{prefix}fc_layer"), p, f"{prefix}fc_norm")
    )


def ref_mha(x: Tensor, p: dict[str, Tensor], num_heads: int) -> Tensor:
    """Multi-head self-attention over the N kernels of each image; x (B, N, C)."""
    b, n, c = x.shape
    d = c // num_heads
    w, bias = p["attention.in_proj_weight"], p["attention.in_proj_bias"]
    q = x @ w[:c].T + bias[:c]
    k = x @ w[c : 2 * c].T + bias[c : 2 * c]
    v = x @ w[2 * c :].T + bias[2 * c :]
    heads = [slice(h * d, (h + 1) * d) for h in range(num_heads)]
    outs = []
    for s in heads:
        att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(att @ v[..., s])
    return ref_linear(torch.cat(outs, dim=-1), p, "attention.out_proj")


def ref_fc_ln_relu(x: Tensor, p: dict[str, Tensor], branch: str) -> Tensor:
    assert f"{branch}.0.bias" not in p  # the Linear before the LayerNorm has no bias
    return torch.relu(ref_layer_norm(x @ p[f"{branch}.0.weight"].T, p, f"{branch}.1"))


def ref_update_head(
    p: dict[str, Tensor],
    features: Tensor,
    kernels: Tensor,
    masks: Tensor,
    num_heads: int,
    hard_threshold: float | None,
) -> dict[str, Tensor]:
    """``KernelUpdateHead.forward`` (knet/det/kernel_update_head.py) in eval mode.

    features (B, C, h, w), kernels (B, N, C), masks (B, N, h, w) logits:
    1. F = feat_transform(features) (1x1 conv);
    2. mask weights: sigmoid(masks) > ``hard_threshold`` (0/1), or softmax over the N kernels
       when it is None (the semantic heads);
    3. group features: sum over pixels of weight * F, (B, N, C);
    4. kernels updated by :func:`ref_updator` (C wider than the updator: each slice of its width
       through the same updator, as the official 512-wide semantic heads);
    5. K = attention_norm(K + MHA(K)) over the N kernels of each image;
    6. K = ffn_norm(K + FFN(K)) (the kernels passed to the next stage);
    7. class logits fc_cls(cls_fcs(K)) (when the head has a classifier) and new mask logits
       fc_mask(mask_fcs(K)) . F (no bias).
    Returns the intermediate values too ("feats", "group", "updated", "attended").
    """
    b, n, c = kernels.shape
    w = p["feat_transform.weight"][:, :, 0, 0]
    feats = torch.einsum("oc,bchw->bohw", w, features) + p["feat_transform.bias"][:, None, None]
    if hard_threshold is None:
        weights = torch.softmax(masks, dim=1)
    else:
        weights = (torch.sigmoid(masks) > hard_threshold).double()
    group = torch.einsum("bnhw,bchw->bnc", weights, feats)  # a sum over pixels
    cu = p["kernel_update_conv.input_gate.weight"].shape[0]
    chunks = [slice(i, i + cu) for i in range(0, c, cu)]  # 2C-d kernels: halves share weights
    updated = torch.cat(
        [
            ref_updator(
                p,
                group[..., s].reshape(-1, cu),
                kernels[..., s].reshape(-1, cu),
                "kernel_update_conv.",
            ).reshape(b, n, cu)
            for s in chunks
        ],
        dim=-1,
    )
    attended = ref_layer_norm(updated + ref_mha(updated, p, num_heads), p, "attention_norm")
    hidden = torch.relu(ref_linear(attended, p, "ffn.0"))
    out = ref_layer_norm(attended + ref_linear(hidden, p, "ffn.3"), p, "ffn_norm")
    result = {"feats": feats, "group": group, "updated": updated, "attended": attended}
    result["kernels"] = out
    if "fc_cls.weight" in p:
        result["cls"] = ref_linear(ref_fc_ln_relu(out, p, "cls_fcs"), p, "fc_cls")
    mask_kernels = ref_linear(ref_fc_ln_relu(out, p, "mask_fcs"), p, "fc_mask")
    result["masks"] = torch.einsum("bnc,bchw->bnhw", mask_kernels, feats)  # no bias
    return result


def ref_conv_gn_relu(x: Tensor, p: dict[str, Tensor], name: str, stride: int = 1) -> Tensor:
    assert f"{name}.bias" not in p  # no conv bias: GN follows
    w = p[f"{name}.weight"]
    y = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)
    return torch.relu(ref_group_norm(y, p[f"{name}.norm.weight"], p[f"{name}.norm.bias"]))


def ref_sine_encoding(b: int, h: int, w: int, num_feats: int, temperature: float = 1e4) -> Tensor:
    """DETR sine encoding with an all-ones (no padding) mask, channel by channel."""
    not_mask = torch.ones(b, h, w, dtype=torch.float64)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    channels: list[Tensor] = []
    for pos in (y, x):  # y first, then x
        for i in range(num_feats):
            freq = temperature ** (2 * (i // 2) / num_feats)
            channels.append(torch.sin(pos / freq) if i % 2 == 0 else torch.cos(pos / freq))
    return torch.stack(channels, dim=1)
