"""The heads Video K-Net adds on the last stage's kernels (lxtGH/Video-K-Net
``knet/video/kernel_update_head.py`` "previous" branches and the detector's / track head's
embedding layers): kernel linking to the previous frame, kernel fusion, and the kernel association
embedding."""

import torch
from torch import nn

from .kernel_updator import KernelUpdator


class KernelLink(nn.Module):
    """Kernel linking (KL): the current frame's kernels attend to the previous frame's.

    With K_t (B, N, C) the last stage's output kernels and K_{t-1} (B, N, C) those of the previous
    frame (thing and stuff kernels, before any linking):
        A       = LN1(K_t + MHA(K_t, K_{t-1}, K_{t-1}))        (no positional encoding, no mask)
        K_track = LN2(A + W2 ReLU(W1 A + b1) + b2)
    K_track only feeds the association embedding; classes, masks and the next frame's memory use
    the plain K_t. Xavier-uniform on every >= 2-D parameter (the attention's stacked q/k/v
    projection as one (3C, C) matrix); biases keep their construction defaults (attention
    biases 0, Linear biases PyTorch's uniform).
    """

    def __init__(
        self, channels: int = 256, num_heads: int = 8, dim_feedforward: int = 2048
    ) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, dim_feedforward),
            nn.ReLU(True),
            nn.Linear(dim_feedforward, channels),
        )
        self.ffn_norm = nn.LayerNorm(channels)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, kernels: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """(B, N, C) current and (B, M, C) previous kernels -> (B, N, C) tracking kernels."""
        attended = self.attention(kernels, previous, previous, need_weights=False)[0]
        linked = self.attention_norm(kernels + attended)
        return self.ffn_norm(linked + self.ffn(linked))


class KernelFusion(nn.Module):
    """Kernels P (B, N, C) linked to the previous frame's kernels K_{t-1}, first updated with this
    frame's group features G (B, N, C) of the last stage:

        K~  = KernelUpdator(G, K_{t-1})
        P'' = KernelLink(P, K~) = LN2(P' + FFN(P')),  P' = LN1(P + MHA(P, K~, K~))

    Two uses in the official Swin configs: kernel fusion (KF, ``previous_link=
    "update_dynamic_cov"``), where P are the last stage's input kernels and P'' replaces them;
    and the "update" tracking link (``previous_type="update"``), where P are its output kernels
    and P'' is what the association head embeds. Xavier-uniform on every >= 2-D parameter (the
    official stage initialisation covers these modules).
    """

    def __init__(
        self, channels: int = 256, num_heads: int = 8, dim_feedforward: int = 2048
    ) -> None:
        super().__init__()
        self.updator = KernelUpdator(channels, channels, channels)
        self.link = KernelLink(channels, num_heads, dim_feedforward)
        for p in self.updator.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, group_feats: torch.Tensor, kernels: torch.Tensor, previous: torch.Tensor
    ) -> torch.Tensor:
        b, n, c = previous.shape
        updated = self.updator(group_feats.reshape(b * n, c), previous.reshape(b * n, c))
        return self.link(kernels, updated.reshape(b, n, c))


class KernelAssociationHead(nn.Module):
    """Kernel association embedding (KAE): (n, C) kernels -> (n, E) embeddings e.

        e = W5 ReLU(W4 ReLU(W3 (W2 ReLU(LN(W1 k)) + b2) + b3) + b4) + b5

    W1 has no bias. W1 and W2 keep PyTorch's default init (the official code never initialises
    them); W3, W4 are Xavier-uniform with zero bias and W5 is N(0, 0.01) with zero bias, as the
    official track head. Similarities are raw dot products of e (no normalisation).
    """

    def __init__(self, channels: int = 256, embed_dim: int = 256, num_fcs: int = 2) -> None:
        super().__init__()
        self.embed_fcs = nn.Sequential(
            nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(True)
        )
        self.fc_embed = nn.Linear(channels, channels)
        fcs = []
        for _ in range(num_fcs):
            fcs += [nn.Linear(channels, channels), nn.ReLU(True)]
        self.track_fcs = nn.Sequential(*fcs)
        self.track_embed = nn.Linear(channels, embed_dim)
        for m in self.track_fcs:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.track_embed.weight, 0, 0.01)
        nn.init.zeros_(self.track_embed.bias)

    def forward(self, kernels: torch.Tensor) -> torch.Tensor:
        return self.track_embed(self.track_fcs(self.fc_embed(self.embed_fcs(kernels))))
