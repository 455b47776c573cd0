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
    state: dict[str, Tensor],
    stage: str,
    group_feats: Tensor,
    kernels: Tensor,
    previous: Tensor,
    suffix: str = "_link",
) -> Tensor:
    """Official kernel fusion (``update_dynamic_cov``) of one image's last-stage input kernels
    (N, C): the previous kernels updated by ``attention_previous_update_link`` (a KernelUpdator)
    with this frame's group features, then linked with the ``*_link`` modules. ``suffix``
    "_track": the "update" tracking link of the stage's output kernels (``*_track`` modules)."""
    updater = f"{stage}attention_previous_update{suffix}."
    updated = ref_updator(state, group_feats, previous, updater)
    return ref_kernel_link(state, stage, kernels, updated, suffix=suffix)


def ref_group_features(state: dict[str, Tensor], stage: str, features: Tensor, masks: Tensor):
    """One image's group features (N, C) of an official stage: sum over the pixels of the hard
    masks sigmoid(masks) > 0.5 (N, h, w) times feat_transform(features) (C, h, w)."""
    w = state[f"{stage}feat_transform.conv.weight"][:, :, 0, 0]
    bias = state[f"{stage}feat_transform.conv.bias"]
    feats = torch.einsum("oc,chw->ohw", w, features) + bias[:, None, None]
    return torch.einsum("nhw,chw->nc", (torch.sigmoid(masks) > 0.5).to(feats.dtype), feats)


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


def ref_clip_stage(
    state: dict[str, Tensor], stage: str, features: Tensor, kernels: Tensor, masks: Tensor
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One official ``KernelUpdateHeadVideo`` stage of a clip with "mean" query merge, read from
    the official keys under ``stage`` (e.g. ``tracker.mask_head.0.``): features (T, C, h, w),
    kernels (N, C) shared by the T frames, masks (T, N, h, w) logits ->
    (kernels (N, C), class logits (N, K) or None, masks (T, N, h, w)).

    F = feat_transform(features) per frame; G = mean_t sum_hw [sigmoid(M_t) > 0.5] F_t;
    K = KernelUpdator(G, K); K = LN(K + MHA(K)); K = LN(K + FFN(K)) (MMCV adds the identity in
    both); logits = fc_cls(ReLU(LN(cls_fcs.0 K))); M_t = fc_mask(ReLU(LN(mask_fcs.0 K))) . F_t."""
    p = sub(state, stage)
    w = p["feat_transform.conv.weight"][:, :, 0, 0]
    feats = (
        torch.einsum("oc,tchw->tohw", w, features) + p["feat_transform.conv.bias"][:, None, None]
    )
    hard = (torch.sigmoid(masks) > 0.5).to(feats.dtype)
    group = torch.einsum("tnhw,tchw->tnc", hard, feats).mean(0)
    k = ref_updator(p, group, kernels, "kernel_update_conv.")
    k = ref_layer_norm(k + ref_cross_attention(k, k, sub(p, "attention."), 8), p, "attention_norm")
    hidden = torch.relu(ref_linear(k, p, "ffn.layers.0.0"))
    k = ref_layer_norm(k + ref_linear(hidden, p, "ffn.layers.1"), p, "ffn_norm")

    def fc_ln_relu(x: Tensor, branch: str) -> Tensor:
        x = x @ p[f"{branch}.0.weight"].T  # no bias
        return torch.relu(ref_layer_norm(x, p, f"{branch}.1"))

    logits = ref_linear(fc_ln_relu(k, "cls_fcs"), p, "fc_cls") if "fc_cls.weight" in p else None
    mask_kernels = ref_linear(fc_ln_relu(k, "mask_fcs"), p, "fc_mask")
    return k, logits, torch.einsum("nc,tchw->tnhw", mask_kernels, feats)


def ref_clip_head(
    state: dict[str, Tensor], features: Tensor, kernels: Tensor, masks: Tensor, clip_stages: int = 2
) -> tuple[Tensor, Tensor]:
    """Official ``KernelFrameIterHeadVideo`` ("mean" merge) on one clip: features (T, C, h, w),
    per-frame kernels (T, N, C) and masks (T, N, h, w) of the image head -> the last class
    logits (N, K) and the last stage's masks (T, N, h, w), before upsampling. The kernels are
    averaged over the frames; the stages from ``clip_stages`` on run on every frame alone with
    its own copy of the kernels."""
    num_stages = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("tracker.mask_head."))
    k, logits = kernels.mean(0), None
    for s in range(clip_stages):
        k, logits, masks = ref_clip_stage(state, f"tracker.mask_head.{s}.", features, k, masks)
    frame_kernels = [k] * len(features)
    for s in range(clip_stages, num_stages):
        outputs = [
            ref_clip_stage(state, f"tracker.mask_head.{s}.", f[None], fk, m[None])
            for f, fk, m in zip(features, frame_kernels, masks)
        ]
        frame_kernels = [o[0] for o in outputs]
        masks = torch.cat([o[2] for o in outputs])
    return logits, masks
