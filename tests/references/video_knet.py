"""Video K-Net's kernel linking, association embedding and association losses re-implemented in
plain PyTorch from the published equations and the official checkpoint layout.

Functions read parameters by their official state-dict names (lxtGH/Video-K-Net: ``roi_head.
mask_head.{s}.attention_previous`` / ``link_ffn`` (MMCV ``MultiheadAttention`` / ``FFN``),
``embed_fcs``, ``fc_embed``, ``track_head.fcs`` / ``fc_embed``), so a renaming or wiring mistake
in the converter or the modules shows up as a mismatch. The losses are written as loops over
rows and pairs (mmtrack's ``MultiPosCrossEntropyLoss`` and ``L2Loss`` with hard mining).
"""

from __future__ import annotations

import math

import torch

from references.knet_heads import ref_layer_norm, ref_linear, ref_updator

Tensor = torch.Tensor


def ref_cross_attention(q_in: Tensor, kv_in: Tensor, p: dict[str, Tensor], num_heads: int):
    """MMCV MultiheadAttention's inner ``nn.MultiheadAttention`` (q, k = v), one image:
    q_in (N, C), kv_in (M, C) -> (N, C), without the residual."""
    c = q_in.shape[-1]
    d = c // num_heads
    w, b = p["attn.in_proj_weight"], p["attn.in_proj_bias"]
    q = q_in @ w[:c].T + b[:c]
    k = kv_in @ w[c : 2 * c].T + b[c : 2 * c]
    v = kv_in @ w[2 * c :].T + b[2 * c :]
    heads = []
    for h in range(num_heads):
        s = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(d), dim=-1)
        heads.append(weights @ v[:, s])
    return ref_linear(torch.cat(heads, dim=-1), p, "attn.out_proj")


def sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def ref_kernel_link(
    state: dict[str, Tensor],
    stage: str,
    kernels: Tensor,
    previous: Tensor,
    num_heads: int = 8,
    suffix: str = "",
) -> Tensor:
    """Official kernel linking of one image: kernels (N, C), previous (M, C) -> (N, C);
    ``stage`` is the official prefix, e.g. ``roi_head.mask_head.2.``; ``suffix`` "_link" reads
    kernel fusion's copy of the modules.

    A = LN(K + MHA(K, P, P)) (MMCV's MultiheadAttention adds the query as identity),
    out = LN(A + FFN(A)) (MMCV's FFN adds its input)."""
    attention = sub(state, f"{stage}attention_previous{suffix}.")
    linked = kernels + ref_cross_attention(kernels, previous, attention, num_heads)
    linked = ref_layer_norm(linked, state, f"{stage}attention_previous_norm{suffix}")
    hidden = torch.relu(ref_linear(linked, state, f"{stage}link_ffn{suffix}.layers.0.0"))
    ffn = ref_linear(hidden, state, f"{stage}link_ffn{suffix}.layers.1")
    return ref_layer_norm(linked + ffn, state, f"{stage}link_ffn_norm{suffix}")


def ref_kernel_fusion(
    state: dict[str, Tensor], stage: str, group_feats: Tensor, kernels: Tensor, previous: Tensor
) -> Tensor:
    """Official kernel fusion (``update_dynamic_cov``) of one image's last-stage input kernels
    (N, C): the previous kernels updated by ``attention_previous_update_link`` (a KernelUpdator)
    with this frame's group features, then linked with the ``*_link`` modules."""
    updated = ref_updator(state, group_feats, previous, f"{stage}attention_previous_update_link.")
    return ref_kernel_link(state, stage, kernels, updated, suffix="_link")


def ref_association_embedding(state: dict[str, Tensor], kernels: Tensor) -> Tensor:
    """Official embedding of (n, C) kernels: the detector's ``embed_fcs`` (Linear without bias,
    LN, ReLU) and ``fc_embed``, then the track head's ReLU fcs and its ``fc_embed``."""
    assert "embed_fcs.0.bias" not in state
    x = torch.relu(ref_layer_norm(kernels @ state["embed_fcs.0.weight"].T, state, "embed_fcs.1"))
    x = ref_linear(x, state, "fc_embed")
    i = 0
    while f"track_head.fcs.{i}.weight" in state:
        x = torch.relu(ref_linear(x, state, f"track_head.fcs.{i}"))
        i += 1
    return ref_linear(x, state, "track_head.fc_embed")


def ref_multi_positive_cross_entropy(similarity: Tensor, targets: Tensor) -> float:
    """sum_i w_i log(1 + sum_{p pos} sum_{q neg} exp(s_iq - s_ip)) / sum_i w_i, by loops."""
    total, weight = 0.0, 0.0
    for i in range(similarity.shape[0]):
        pos = [j for j in range(similarity.shape[1]) if targets[i, j] == 1]
        neg = [j for j in range(similarity.shape[1]) if targets[i, j] == 0]
        if not pos:
            continue
        inner = sum(math.exp(float(similarity[i, q] - similarity[i, p])) for p in pos for q in neg)
        total += math.log(1 + inner)
        weight += 1
    return total / max(weight, 1.0)


def ref_hard_mined_l2(cosine: Tensor, targets: Tensor, ratio: int = 3, margin: float = 0.1):
    """mmtrack's L2Loss(neg_pos_ub=ratio, pos_margin=0, neg_margin=margin, hard_mining=True)."""
    entries = []
    for i in range(cosine.shape[0]):
        for j in range(cosine.shape[1]):
            y = float(targets[i, j])
            x = float(cosine[i, j]) - (margin if y == 0 else 0.0)
            x = min(max(x, 0.0), 1.0)
            entries.append((y, (x - y) ** 2))
    positives = [e for y, e in entries if y == 1]
    negatives = [e for y, e in entries if y == 0]
    if len(negatives) / (len(positives) + 1) > ratio:
        negatives = sorted(negatives, reverse=True)[: len(positives) * ratio]
    kept = positives + negatives
    return sum(kept) / len(kept)
