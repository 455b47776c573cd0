"""One kernel update stage of K-Net (``KernelUpdateHead``, ZwwWayne/K-Net
``knet/det/kernel_update_head.py`` and ``knet/seg/kernel_update_head.py``)."""

import math

import torch
from torch import nn

from .kernel_updator import KernelUpdator


def fc_ln_relu(channels: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` x (Linear without bias -> LayerNorm -> ReLU)."""
    layers = []
    for _ in range(num_layers):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(True)]
    return nn.Sequential(*layers)


def bias_init_with_prob(prior_prob: float) -> float:
    """Bias that makes sigmoid output ``prior_prob`` (-4.595 for 0.01)."""
    return -math.log((1 - prior_prob) / prior_prob)


class KernelUpdateHead(nn.Module):
    """Refines kernels once: group features, gated update, kernel attention, FFN, new masks.

    With F the shared feature (B, C, h, w), kernels K (B, N, C) and mask logits M (B, N, h, w):
        F' = feat_transform(F)                                  (1x1 conv with bias)
        A  = sigmoid(M) > thr   (instance / panoptic)  or  softmax(M, dim=1)  (semantic)
        G  = sum_u A[b, n, u] F'[b, :, u]                       (a sum, not a mean)
        K~ = KernelUpdator(G, K)
        K^ = LN(K~ + MHA(K~, K~, K~))                           (post-norm, kernels attend)
        K' = LN(K^ + FFN(K^))
        logits = fc_cls(cls_fcs(K'))                            (absent when num_classes == 0)
        M' = einsum(fc_mask(mask_fcs(K')), F')                  (dynamic 1x1 conv, no bias)
    K' (not the mask kernel) is handed to the next stage.

    ``fusion`` (None; Video K-Net's kernel fusion sets it on the last stage): given the previous
    frame's kernels, K is first replaced by ``fusion(G, K, K_previous)``.

    Clip mode (Video K-Net's clip-level VIS head, "mean" query merge): F (B, T, C, h, w) and M
    (B, T, N, h, w) for T frames share one kernel set K (B, N, C): G is the mean over the frames
    of the per-frame G, logits are per clip and M'[b, t] = einsum(fc_mask(mask_fcs(K')), F'[b, t]).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        channels: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        updator_channels: int = 256,
        num_cls_fcs: int = 1,
        num_mask_fcs: int = 1,
        hard_mask_threshold: float | None = 0.5,
        xavier_init: bool = True,
    ):
        """
        Args:
            num_classes: classification outputs (sigmoid, no background); 0 for no cls branch.
            channels: kernel and feature width C.
            updator_channels: width of the KernelUpdator; C must be a multiple of it. Wider
                kernels are split into C / updator_channels chunks that share the updator
                (the official 512-channel semantic heads do this).
            hard_mask_threshold: group features from ``sigmoid(M) > thr``; None uses
                ``softmax(M, dim=1)`` over the kernels instead (semantic segmentation).
            xavier_init: Xavier-uniform on every >=2-D parameter, as the official
                instance/panoptic heads are initialised.
        """
        super().__init__()
        if channels % updator_channels:
            raise ValueError(f"channels {channels} not a multiple of {updator_channels}")
        self.num_classes = num_classes
        self.channels = channels
        self.updator_channels = updator_channels
        self.hard_mask_threshold = hard_mask_threshold

        self.feat_transform = nn.Conv2d(channels, channels, 1)
        self.kernel_update_conv = KernelUpdator(
            updator_channels, updator_channels, updator_channels
        )
        self.attention = nn.MultiheadAttention(
            channels, num_heads, dropout=dropout, batch_first=True
        )
        self.attention_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, dim_feedforward),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, channels),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(channels)
        if num_classes > 0:
            self.cls_fcs = fc_ln_relu(channels, num_cls_fcs)
            self.fc_cls = nn.Linear(channels, num_classes)
        self.mask_fcs = fc_ln_relu(channels, num_mask_fcs)
        self.fc_mask = nn.Linear(channels, channels)

        if xavier_init:
            for p in self.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            nn.init.zeros_(self.feat_transform.bias)
        if num_classes > 0:
            nn.init.constant_(self.fc_cls.bias, bias_init_with_prob(0.01))
        self.fusion: nn.Module | None = None

    def group_weights(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """(B, N, h, w) mask logits -> the weights with which each kernel pools features."""
        if self.hard_mask_threshold is None:
            return mask_logits.softmax(dim=1)
        return (mask_logits.sigmoid() > self.hard_mask_threshold).to(mask_logits.dtype)

    def group_features(
        self, features: torch.Tensor, mask_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) F and (B, N, h, w) M -> F' = feat_transform(F) and the group features
        G (B, N, C) in >= float32 (sums over many pixels can reach ~1e4)."""
        feats = self.feat_transform(features)
        acc = torch.promote_types(feats.dtype, torch.float32)
        with torch.autocast(device_type=feats.device.type, enabled=False):
            weights = self.group_weights(mask_logits.to(acc))
            return feats, torch.einsum("bnhw,bchw->bnc", weights, feats.to(acc))

    def forward(
        self,
        features: torch.Tensor,
        kernels: torch.Tensor,
        mask_logits: torch.Tensor,
        previous: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """
        Args:
            features: (B, C, h, w) the shared kernel-head feature F (same at every stage), or
                (B, T, C, h, w) in clip mode.
            kernels: (B, N, C) kernels of the previous stage.
            mask_logits: (B, N, h, w) mask logits of the previous stage ((B, T, N, h, w)).
            previous: (B, N, C) the previous frame's last-stage kernels, for ``fusion``.

        Returns:
            kernels (B, N, C), mask_logits (B, N, h, w) ((B, T, N, h, w) in clip mode),
            cls_logits (B, N, num_classes) or None.
        """
        b, n, c = kernels.shape
        clip = features.shape[:-3] if features.dim() == 5 else None  # (B, T)
        if clip is not None:
            features, mask_logits = features.flatten(0, 1), mask_logits.flatten(0, 1)
        feats, group_feats = self.group_features(features, mask_logits)
        group_feats = group_feats.to(kernels.dtype)
        if clip is not None:
            group_feats = group_feats.unflatten(0, clip).mean(1)
        if self.fusion is not None and previous is not None:
            kernels = self.fusion(group_feats, kernels, previous)
        chunks = c // self.updator_channels
        kernels = self.kernel_update_conv(
            group_feats.reshape(b * n * chunks, self.updator_channels),
            kernels.reshape(b * n * chunks, self.updator_channels),
        ).reshape(b, n, c)

        attended = self.attention(kernels, kernels, kernels, need_weights=False)[0]
        kernels = self.attention_norm(kernels + attended)
        kernels = self.ffn_norm(kernels + self.ffn(kernels))

        cls_logits = self.fc_cls(self.cls_fcs(kernels)) if self.num_classes > 0 else None
        mask_kernels = self.fc_mask(self.mask_fcs(kernels))
        if clip is not None:
            feats = feats.unflatten(0, clip)
            return kernels, torch.einsum("bnc,btchw->btnhw", mask_kernels, feats), cls_logits
        new_masks = torch.einsum("bnc,bchw->bnhw", mask_kernels, feats)
        return kernels, new_masks, cls_logits


def build_update_stages(
    cfg, *, num_classes: int, hard_mask_threshold: float | None
) -> list[KernelUpdateHead]:
    """``MODEL.KNET.NUM_STAGES`` unshared update stages configured by ``MODEL.KNET``, with
    ``num_classes`` (0: no class branch) and ``hard_mask_threshold`` (None: softmax group
    features) as in ``KernelUpdateHead``."""
    k = cfg.MODEL.KNET
    return [
        KernelUpdateHead(
            num_classes=num_classes,
            channels=cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
            num_heads=k.NHEADS,
            dim_feedforward=k.DIM_FEEDFORWARD,
            dropout=k.DROPOUT,
            updator_channels=k.UPDATOR_DIM,
            num_cls_fcs=k.NUM_CLS_FCS,
            num_mask_fcs=k.NUM_MASK_FCS,
            hard_mask_threshold=hard_mask_threshold,
            xavier_init=k.XAVIER_INIT_STAGES,
        )
        for _ in range(k.NUM_STAGES)
    ]
