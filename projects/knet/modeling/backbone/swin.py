"""Swin Transformer backbone (Liu et al., ICCV 2021) for K-Net's Swin-L and Swin-T models.

The computation is that of the Swin backbones the official K-Net (MMDetection 2.x
``SwinTransformer``) and MMSeg's K-Net were trained with, for inputs of any size:

* patch embedding: zero-pad bottom/right to a multiple of the patch size, ``patch x patch``
  conv with stride ``patch``, LayerNorm;
* each block: ``x + DropPath(SW-MSA(LN(x)))``, then ``x + DropPath(MLP(LN(x)))`` (GELU);
  (S)W-MSA zero-pads the normalised map bottom/right to a multiple of the window, rolls it by
  ``-window // 2`` in odd blocks, attends within each window with a learned relative position
  bias, masks pairs of tokens that come from different regions of the rolled map with -100,
  and undoes roll and padding;
* patch merging between stages: zero-pad to even size, concatenate the 2x2 neighbours
  ``[x(0,0), x(1,0), x(0,1), x(1,1)]`` (row, column offsets), LayerNorm, linear 4C -> 2C;
* one LayerNorm per output (``norm{i}``), on the stage output before merging.

Parameter names follow Microsoft's Swin (``patch_embed.proj``, ``layers.{i}.blocks.{j}.attn.qkv``,
``mlp.fc1``, ``layers.{i}.downsample.reduction``) plus the per-output ``norm{i}`` of the detection
variant, so Microsoft's ImageNet checkpoints and Mask2Former's converted Swin weights map one to
one; MMDet/MMSeg checkpoints are converted by ``knet.conversion`` (their patch merging uses
``nn.Unfold`` channel order, which the converter permutes).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torchvision.ops import StochasticDepth

__all__ = [
    "SwinTransformer",
    "WindowAttention",
    "SwinBlock",
    "PatchEmbed",
    "PatchMerging",
    "build_knet_swin_backbone",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]

# The additive attention mask between tokens of different regions of a rolled map (the
# official value; exp(-100) is negligible, but not exactly zero).
MASKED_LOGIT = -100.0
FEATURE_NAMES = ("res2", "res3", "res4", "res5")


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B, nW, window * window, C).

    Windows are numbered row-major over the (H / window, W / window) grid; tokens row-major
    within a window.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B, nW, window * window, C) -> (B, H, W, C)."""
    b, _, _, c = windows.shape
    x = windows.view(b, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) int64: row of the bias table for each (query, key) token pair.

    For tokens p, q of one window at (y, x) coordinates, the index is
    ``(y_p - y_q + window - 1) * (2 * window - 1) + (x_p - x_q + window - 1)``.
    """
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)  # (2, window^2)
    delta = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), in [0, 2w-2]
    return delta[0] * (2 * window - 1) + delta[1]


def shifted_window_mask(
    height: int, width: int, window: int, shift: int, device: torch.device
) -> torch.Tensor:
    """Additive mask (nW, window^2, window^2) of shifted-window attention on a padded map.

    After rolling the (height, width) map by ``-shift``, the last ``window`` rows (columns)
    hold tokens of up to two regions: ``[-window, -shift)`` and ``[-shift, end)``, the latter
    wrapped around from the top (left). Pairs of tokens from different regions get
    ``MASKED_LOGIT``; ``height`` and ``width`` are multiples of ``window``.
    """
    region = torch.zeros(1, height, width, 1, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bounds):
        for j, cols in enumerate(bounds):
            region[:, rows, cols, :] = 3 * i + j
    labels = window_partition(region, window)[0, :, :, 0]  # (nW, window^2)
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill(different, MASKED_LOGIT)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a relative position bias.

    For one window with tokens X (N = window^2, C) and head h::

        A_h = softmax(Q_h K_h^T * scale + B_h[index] + M)      (N, N)
        out = concat_h(A_h V_h) W_proj + b_proj

    with [Q | K | V] = X W_qkv (+ b), scale = (C / heads)^-0.5, B the learned table
    ((2 window - 1)^2, heads) gathered by :func:`relative_position_index`, and M the optional
    shifted-window mask.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.window = window
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        # derived from the window size: not stored in checkpoints
        self.register_buffer(
            "relative_position_index", relative_position_index(window), persistent=False
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            windows: (B, nW, N, C) tokens of nW windows of N = window^2 tokens.
            mask: (nW, N, N) additive mask, or None.

        Returns:
            (B, nW, N, C).
        """
        b, nw, n, c = windows.shape
        qkv = self.qkv(windows).view(b, nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, C/heads)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:
            bias = bias + mask[:, None]  # (nW, heads, N, N)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        out = out.transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    """One Swin block: (shifted-)window attention and MLP, each pre-norm with a residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"Swin: shift {shift} must be in [0, window={window})")
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """
        Args:
            x: (B, H, W, C).
            mask: the shifted-window mask of the padded map (``shift > 0`` only).

        Returns:
            (B, H, W, C).
        """
        b, h, w, c = x.shape
        y = self.norm1(x)
        # zero padding after the norm, as the official implementation: padded tokens are keys
        pad_b, pad_r = -h % self.window, -w % self.window
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), mask if self.shift else None)
        y = window_reverse(y, self.window, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 patch merging: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C).

    ``reduction(norm([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]]))`` after
    zero-padding H and W to even sizes (Microsoft's channel order).
    """

    def __init__(self, dim: int, norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim) if norm else nn.Identity()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` blocks (odd ones shifted by window // 2), then an optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        drop_paths: Sequence[float],
        downsample: bool,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        **block_kwargs,
    ):
        super().__init__()
        self.window = window
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window,
                shift=window // 2 if j % 2 else 0,
                drop_path=drop_paths[j],
                **block_kwargs,
            )
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim, patch_norm) if downsample else None

    def forward(self, x: torch.Tensor):
        """(B, H, W, C) -> (stage output (B, H, W, C), input of the next stage or None)."""
        h, w = x.shape[1:3]
        mask = None
        if len(self.blocks) > 1 and self.window // 2:
            hp, wp = h + (-h % self.window), w + (-w % self.window)
            mask = shifted_window_mask(hp, wp, self.window, self.window // 2, x.device)
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x, self.downsample(x) if self.downsample is not None else None


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, ceil(H / p), ceil(W / p), C): zero-pad bottom/right to a multiple
    of the patch size p, p x p conv with stride p, optional LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm: bool):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.patch_size, 0, -h % self.patch_size))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(Backbone):
    """Swin Transformer as a Detectron2 backbone: res2-res5 at strides 4, 8, 16, 32.

    Output ``res{i + 2}`` has ``embed_dim * 2^i`` channels and size ceil(H / 4 / 2^i) x
    ceil(W / 4 / 2^i) for any input size (padding happens inside).
    """

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        drop_path_rate: float = 0.2,
        ape_size: int = 0,
        patch_size: int = 4,
        in_chans: int = 3,
        out_features: Sequence[str] = FEATURE_NAMES,
        **stage_kwargs,
    ):
        """
        Args:
            embed_dim: C, the width of res2 (96 Swin-T, 192 Swin-L).
            depths, num_heads: blocks and attention heads of each of the 4 stages.
            window_size: side of the attention windows (7 for the K-Net models).
            drop_path_rate: stochastic depth of the last block, rising linearly from 0.
            ape_size: > 0: add an absolute position embedding learned at this image size,
                resized bicubically to the patch grid (0: none).
            patch_size: side and stride of the patch embedding conv.
            in_chans: input channels.
            out_features: subset of res2-res5 to return.
            stage_kwargs: options of every ``SwinStage`` and ``SwinBlock``:
                ``patch_norm`` (LayerNorm after the patch embedding and in the patch merging,
                default True), ``use_checkpoint`` (recompute each block in the backward pass:
                less training memory, about 20-30% slower), ``mlp_ratio`` (MLP hidden width /
                block width), ``qkv_bias`` and ``qk_scale`` (the q|k|v projection; None:
                (C / heads)^-0.5), ``drop`` and ``attn_drop`` (dropout after projections, also
                after the patch embedding / on attention weights).
        """
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(
                f"MODEL.SWIN.DEPTHS and NUM_HEADS need 4 entries, got {list(depths)} and "
                f"{list(num_heads)}"
            )
        unknown = sorted(set(out_features) - set(FEATURE_NAMES))
        if unknown:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES: {unknown} not in {list(FEATURE_NAMES)}")
        patch_norm = stage_kwargs.get("patch_norm", True)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.absolute_pos_embed = None
        if ape_size > 0:
            grid = ape_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(stage_kwargs.get("drop", 0.0))

        total = sum(depths)
        # linear from 0 to drop_path_rate over all blocks (plain floats: builds on any device)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        self.num_features = [embed_dim * 2**i for i in range(4)]
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    self.num_features[i],
                    depth,
                    heads,
                    window_size,
                    drop_paths=rates[start : start + depth],
                    downsample=i < 3,
                    **stage_kwargs,
                )
            )
        self._out_features = [f for f in FEATURE_NAMES if f in out_features]
        self._out_feature_channels = dict(zip(FEATURE_NAMES, self.num_features))
        self._out_feature_strides = {f: patch_size * 2**i for i, f in enumerate(FEATURE_NAMES)}
        for name in self._out_features:
            i = FEATURE_NAMES.index(name)
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"res{i+2}": (B, C * 2^i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2)))}."""
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer takes a (B, C, H, W) input, got {tuple(x.shape)}")
        x = self.patch_embed(x)  # (B, H/4, W/4, C)
        if self.absolute_pos_embed is not None:
            ape = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")
            x = x + ape.permute(0, 2, 3, 1)
        x = self.pos_drop(x)
        outputs = {}
        for i, (name, stage) in enumerate(zip(FEATURE_NAMES, self.layers)):
            out, x = stage(x)  # x: the merged map for the next stage (None after the last)
            if name in self._out_features:
                out = getattr(self, f"norm{i}")(out)
                outputs[name] = out.permute(0, 3, 1, 2).contiguous()
        return outputs


def _init_weights(module: nn.Module) -> None:
    """Swin's initialisation for training from scratch: truncated N(0, 0.02) linears (the
    LayerNorms keep PyTorch's weight 1, bias 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@BACKBONE_REGISTRY.register()
def build_knet_swin_backbone(cfg, input_shape: ShapeSpec) -> SwinTransformer:
    """Swin Transformer from ``MODEL.SWIN.*`` (names and meanings as in Mask2Former)."""
    s = cfg.MODEL.SWIN
    return SwinTransformer(
        embed_dim=s.EMBED_DIM,
        depths=s.DEPTHS,
        num_heads=s.NUM_HEADS,
        window_size=s.WINDOW_SIZE,
        drop_path_rate=s.DROP_PATH_RATE,
        ape_size=s.PRETRAIN_IMG_SIZE if s.APE else 0,
        patch_size=s.PATCH_SIZE,
        in_chans=input_shape.channels,
        out_features=s.OUT_FEATURES,
        patch_norm=s.PATCH_NORM,
        use_checkpoint=s.USE_CHECKPOINT,
        mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS,
        qk_scale=s.QK_SCALE,
        drop=s.DROP_RATE,
        attn_drop=s.ATTN_DROP_RATE,
    )
