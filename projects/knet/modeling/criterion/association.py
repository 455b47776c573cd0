"""The association losses of Video K-Net (lxtGH/Video-K-Net ``knet/video/track_heads.py``
``QuasiDenseMaskEmbedHeadGTMask``, ``qdtrack/losses/multipos_cross_entropy_loss.py`` and
``l2_loss.py``): the embeddings of a key frame's and a reference frame's matched thing kernels,
positives where both were matched to the same object."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def association_targets(
    key_ids: torch.Tensor, reference_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) object ids of the key frame's positives, (m,) of the reference's -> targets (n, m)
    float, 1 where both are the same object, and row weights (n,), 1 where a row has a positive.
    Unmatched kernels and stuff kernels take no part (they are not in the lists)."""
    targets = (key_ids[:, None] == reference_ids[None, :]).float()
    return targets, (targets.sum(1) > 0).float()


def multi_positive_cross_entropy(
    similarity: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The multi-positive cross-entropy of (n, m) similarities s (raw dot products)::

        l_i = log(1 + sum_{p in P_i} sum_{q in N_i} exp(s_iq - s_ip)),
        L   = sum_i w_i l_i / sum_i w_i

    P_i / N_i: the columns where ``targets`` is 1 / 0. Returns 0 (keeping the graph) when no row
    has a positive (the official code would divide by 0)."""
    positive, negative = targets > 0, targets == 0
    pair_ok = positive[:, :, None] & negative[:, None, :]  # (n, p, q)
    differences = similarity[:, None, :] - similarity[:, :, None]  # s_iq - s_ip
    terms = differences.masked_fill(~pair_ok, float("-inf")).flatten(1)
    # log(1 + sum exp(x)) = logsumexp([x, 0])
    losses = torch.logsumexp(F.pad(terms, (0, 1)), dim=1)
    return (losses * weights).sum() / weights.sum().clamp(min=1)


def hard_mined_l2(
    cosine: torch.Tensor,
    targets: torch.Tensor,
    neg_pos_ratio: int = 3,
    pos_margin: float = 0.0,
    neg_margin: float = 0.1,
) -> torch.Tensor:
    """The auxiliary L2 loss of (n, m) cosine similarities c with hard-negative mining::

        x = clamp(c - margin(y), 0, 1),   L = sum_kept (x - y)^2 / #kept

    ``margin`` is ``neg_margin`` on negatives (y = 0) and ``pos_margin`` on positives (applied
    only when > 0, as the official code). When #neg / (#pos + 1) > ``neg_pos_ratio``, only the
    ``neg_pos_ratio`` x #pos negatives with the largest (x - y)^2 are kept."""
    x = cosine
    if pos_margin > 0:
        x = torch.where(targets == 1, x - pos_margin, x)
    if neg_margin > 0:
        x = torch.where(targets == 0, x - neg_margin, x)
    x = x.clamp(0, 1)
    squared = (x - targets) ** 2
    keep = torch.ones_like(targets, dtype=torch.bool)
    num_pos, num_neg = int((targets == 1).sum()), int((targets == 0).sum())
    if neg_pos_ratio > 0 and num_neg / (num_pos + 1) > neg_pos_ratio:
        negatives = (targets == 0).flatten().nonzero().squeeze(1)
        hardest = squared.detach().flatten()[negatives].topk(num_pos * neg_pos_ratio).indices
        kept_neg = torch.zeros_like(keep).flatten()
        kept_neg[negatives[hardest]] = True
        keep = (targets == 1) | kept_neg.view_as(keep)
    return (squared * keep).sum() / keep.sum().clamp(min=1)


def association_losses(
    key_embeds: list[torch.Tensor],
    reference_embeds: list[torch.Tensor],
    targets: list[torch.Tensor],
    weights: dict[str, float],
    aux_options: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Per image i: key embeddings (n_i, E), reference embeddings (m_i, E), targets (n_i, m_i)
    -> {"loss_track": w_track * mean_i MPCE, "loss_track_aux": w_aux * mean_i L2}, the L2 on
    the cosine similarities (:func:`hard_mined_l2` with ``aux_options``)."""
    track, aux = [], []
    for key, ref, target in zip(key_embeds, reference_embeds, targets):
        if key.shape[0] == 0 or ref.shape[0] == 0:  # nothing to associate: zero, in the graph
            zero = (key.sum() + ref.sum()) * 0
            track.append(zero)
            aux.append(zero)
            continue
        row_weights = (target.sum(1) > 0).float()
        track.append(multi_positive_cross_entropy(key @ ref.t(), target, row_weights))
        cosine = F.normalize(key, dim=1) @ F.normalize(ref, dim=1).t()
        aux.append(hard_mined_l2(cosine, target, **(aux_options or {})))
    return {
        "loss_track": weights["track"] * torch.stack(track).mean(),
        "loss_track_aux": weights["track_aux"] * torch.stack(aux).mean(),
    }
