"""The adaptive kernel update of K-Net (``KernelUpdator``, ZwwWayne/K-Net
``knet/kernel_updator.py``)."""

import torch
from torch import nn


class KernelUpdator(nn.Module):
    """Gated fusion of the group feature of each kernel with the kernel itself.

    With f the group feature and k the kernel (both ``in_channels``-d), C = ``feat_channels``:
        [P_in | P_out] = dynamic_layer(f),   [I_in | I_out] = input_layer(k)
        G = I_in * P_in
        g_k = sigmoid(input_norm_in(input_gate(G))),  g_f = sigmoid(norm_in(update_gate(G)))
        out = relu(fc_norm(fc_layer(g_f * norm_out(P_out) + g_k * input_norm_out(I_out))))
    There is no residual: the output replaces the kernel.
    """

    def __init__(self, in_channels: int = 256, feat_channels: int = 256, out_channels: int = 256):
        super().__init__()
        self.feat_channels = feat_channels
        self.dynamic_layer = nn.Linear(in_channels, 2 * feat_channels)
        self.input_layer = nn.Linear(in_channels, 2 * feat_channels)
        self.input_gate = nn.Linear(feat_channels, feat_channels)
        self.update_gate = nn.Linear(feat_channels, feat_channels)
        self.norm_in = nn.LayerNorm(feat_channels)
        self.norm_out = nn.LayerNorm(feat_channels)
        self.input_norm_in = nn.LayerNorm(feat_channels)
        self.input_norm_out = nn.LayerNorm(feat_channels)
        self.fc_layer = nn.Linear(feat_channels, out_channels)
        self.fc_norm = nn.LayerNorm(out_channels)

    def forward(self, group_feats: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            group_feats, kernels: (M, in_channels), one row per kernel.

        Returns:
            (M, out_channels) updated kernels.
        """
        param_in, param_out = self.dynamic_layer(group_feats).split(self.feat_channels, dim=-1)
        input_in, input_out = self.input_layer(kernels).split(self.feat_channels, dim=-1)
        gate_feats = input_in * param_in
        input_gate = self.input_norm_in(self.input_gate(gate_feats)).sigmoid()
        update_gate = self.norm_in(self.update_gate(gate_feats)).sigmoid()
        features = update_gate * self.norm_out(param_out) + input_gate * self.input_norm_out(
            input_out
        )
        return torch.relu(self.fc_norm(self.fc_layer(features)))
