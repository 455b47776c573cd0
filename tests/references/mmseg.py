"""MMSegmentation 0.x decode heads re-implemented in plain PyTorch from their state dicts.

The ``_forward_feature`` of ``UPerHead`` (``mmseg/models/decode_heads/uper_head.py``),
``FCNHead`` (``fcn_head.py``), ``PSPHead`` (``psp_head.py``) and ``ASPPHead``
(``aspp_head.py``) of open-mmlab/mmsegmentation v0.x, in eval mode, under the project's key names
(``<conv>.weight``, ``<conv>.norm.*``). Bilinear resizes use ``align_corners=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .mmcv import ref_conv_module


def ref_resize(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def ref_ppm(sd, prefix: str, x: Tensor, scales: Sequence[int]) -> list[Tensor]:
    return [
        ref_resize(ref_conv_module(sd, f"{prefix}.{i}.1", F.adaptive_avg_pool2d(x, s)), x.shape[2:])
        for i, s in enumerate(scales)
    ]


def ref_uper(sd, xs: list[Tensor], scales: Sequence[int]) -> Tensor:
    top = xs[-1]
    laterals = [ref_conv_module(sd, f"lateral_convs.{i}", x) for i, x in enumerate(xs[:-1])]
    laterals.append(
        ref_conv_module(
            sd, "bottleneck", torch.cat([top] + ref_ppm(sd, "psp_modules", top, scales), 1)
        )
    )
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + ref_resize(laterals[i], laterals[i - 1].shape[2:])
    outs = [ref_conv_module(sd, f"fpn_convs.{i}", laterals[i]) for i in range(len(laterals) - 1)]
    outs.append(laterals[-1])
    outs = [outs[0]] + [ref_resize(o, outs[0].shape[2:]) for o in outs[1:]]
    return ref_conv_module(sd, "fpn_bottleneck", torch.cat(outs, 1))


def ref_fcn(sd, x: Tensor, num_convs: int, concat_input: bool) -> Tensor:
    y = x
    for i in range(num_convs):
        y = ref_conv_module(sd, f"convs.{i}", y)
    if concat_input:
        y = ref_conv_module(sd, "conv_cat", torch.cat([x, y], 1))
    return y


def ref_psp(sd, x: Tensor, scales: Sequence[int]) -> Tensor:
    return ref_conv_module(
        sd, "bottleneck", torch.cat([x] + ref_ppm(sd, "psp_modules", x, scales), 1)
    )


def ref_aspp(sd, x: Tensor, dilations: Sequence[int]) -> Tensor:
    pooled = ref_conv_module(sd, "image_pool.1", x.mean(dim=(2, 3), keepdim=True))
    outs = [ref_resize(pooled, x.shape[2:])]
    outs += [ref_conv_module(sd, f"aspp_modules.{i}", x, d) for i, d in enumerate(dilations)]
    return ref_conv_module(sd, "bottleneck", torch.cat(outs, 1))
