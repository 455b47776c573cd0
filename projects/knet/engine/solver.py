"""Optimizer of the official K-Net recipe: AdamW, backbone lr multiplier, global grad clip."""

from typing import Any

import torch
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from torch import nn

# Position tables of the Swin backbone (SOLVER.WEIGHT_DECAY_EMBED), by parameter name.
EMBED_PARAMS = ("relative_position_bias_table", "absolute_pos_embed")


def split_backbone_body(
    groups: list[dict[str, Any]], model: nn.Module, multiplier: float
) -> list[dict[str, Any]]:
    """Split param groups so the backbone body's parameters get ``lr * multiplier``: those of
    ``backbone.bottom_up.`` under an FPN (whose neck keeps the full lr, as in MMDet), else all of
    ``backbone.``."""
    fpn = hasattr(getattr(model, "backbone", None), "bottom_up")
    prefix = "backbone.bottom_up." if fpn else "backbone."
    body = {id(p) for n, p in model.named_parameters() if n.startswith(prefix)}
    result = []
    for group in groups:
        for in_body in (False, True):
            params = [p for p in group["params"] if (id(p) in body) == in_body]
            if params:
                new = dict(group, params=params)
                if in_body:
                    new["lr"] = group["lr"] * multiplier
                result.append(new)
    return result


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD with ``SOLVER.BACKBONE_MULTIPLIER`` on the backbone body.

    Weight decay: ``SOLVER.WEIGHT_DECAY``, with ``WEIGHT_DECAY_NORM`` for normalisation layers,
    ``WEIGHT_DECAY_BIAS`` for biases and ``WEIGHT_DECAY_EMBED`` for Swin's position tables.

    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"`` clips the global gradient norm over all
    parameters before each step (Detectron2 only has per-parameter "value"/"norm" clipping,
    which is used for the other clip types).
    """
    solver = cfg.SOLVER
    clip = solver.CLIP_GRADIENTS
    params: list[dict[str, Any]] = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
        overrides={name: {"weight_decay": solver.WEIGHT_DECAY_EMBED} for name in EMBED_PARAMS},
    )
    params = split_backbone_body(params, model, solver.BACKBONE_MULTIPLIER)
    if solver.OPTIMIZER == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {}
    elif solver.OPTIMIZER == "SGD":
        optimizer_cls = torch.optim.SGD
        kwargs = {"momentum": solver.MOMENTUM, "nesterov": solver.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {solver.OPTIMIZER!r}")
    full_model_clip = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    if clip.ENABLED and not full_model_clip:
        # Detectron2's per-parameter "value" / "norm" clipping
        optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
    optimizer = optimizer_cls(params, lr=solver.BASE_LR, **kwargs)
    if full_model_clip:
        add_global_grad_clipping(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)
    return optimizer


def add_global_grad_clipping(optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float):
    """Clip the norm of all gradients together before every ``optimizer.step()``.

    A step pre-hook runs after ``GradScaler.step`` has unscaled the gradients: it works with AMP.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip_hook(opt, args, kwargs):
        torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    optimizer.register_step_pre_hook(clip_hook)
