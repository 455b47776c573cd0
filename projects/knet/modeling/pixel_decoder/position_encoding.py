"""Sine positional encoding (DETR style), as added to P5 by K-Net's localization FPN."""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised sine encoding without a padding mask.

    Output (B, 2 * num_pos_feats, H, W): channels [0, F) encode y, [F, 2F) encode x, each as
    interleaved [sin, cos, sin, cos, ...] of ``pos / temperature ** (2 * (i // 2) / F)``.
    """

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos = []
        for size, shape in ((h, (1, h, 1)), (w, (1, 1, w))):  # y, then x
            # cumsum of an all-ones mask is simply the 1-based row / column index.
            embed = torch.arange(1, size + 1, device=x.device, dtype=torch.float32).view(shape)
            if self.normalize:
                embed = embed / (embed.flatten()[-1:] + self.eps) * self.scale
            embed = embed.expand(b, h, w)[:, :, :, None] / dim_t
            pos.append(torch.stack((embed[..., 0::2].sin(), embed[..., 1::2].cos()), 4).flatten(3))
        return torch.cat(pos, dim=3).permute(0, 3, 1, 2).to(x.dtype)
