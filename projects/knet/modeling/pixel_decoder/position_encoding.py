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
        # cumsum of an all-ones mask is simply the 1-based row / column index.
        y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32).view(1, h, 1)
        x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32).view(1, 1, w)
        y_embed = y_embed.expand(b, h, w)
        x_embed = x_embed.expand(b, h, w)
        if self.normalize:
            y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack(
            (pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4
        ).flatten(3)
        pos_y = torch.stack(
            (pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4
        ).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)
