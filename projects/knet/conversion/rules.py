"""Rename rules from the official checkpoint layouts to this project's parameter names.

A layout is a tuple of :class:`Section`: the keys under a source prefix go to a target prefix,
the rest of the key rewritten by the section's :class:`Rule` list (successive regular expression
substitutions), which may also transform the tensor or drop the key. :func:`check_against_model`
checks the result against the target model, so the tables never list keys one by one.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

OPTIONAL_BUFFER = "num_batches_tracked"  # BN counters: kept where the model has them

Replacement = str | Callable[[re.Match], str] | None


class CheckpointKeyError(ValueError):
    """The checkpoint has keys that cannot be mapped, or lacks keys that must be present."""


@dataclass(frozen=True)
class Rule:
    """``re.sub(pattern, replacement, key)`` where ``pattern`` matches; None drops the key.

    ``transform`` (if given) converts the tensor of every key the rule matches.
    """

    pattern: str
    replacement: Replacement
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Section:
    """Keys starting with ``source`` become ``target`` + (the rest after ``rules``)."""

    source: str
    target: str
    rules: tuple[Rule, ...] = ()


def _format_keys(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} key(s):\n  {shown}{more}"


def rename_state_dict(
    state_dict: Mapping[str, torch.Tensor], layout: Sequence[Section]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Apply a layout to every key: ({new key: tensor}, {new key: original key}). Keys under no
    section keep their name, so that the model check reports them as unknown; two keys mapped to
    one name raise :class:`CheckpointKeyError`."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        section = next((s for s in layout if key.startswith(s.source)), Section("", ""))
        new: str | None = key[len(section.source) :]
        for rule in section.rules:
            if re.search(rule.pattern, new):
                if rule.replacement is None:
                    new = None
                    break
                new = re.sub(rule.pattern, rule.replacement, new)
                if rule.transform is not None:
                    value = rule.transform(value)
        if new is None:
            continue
        new = section.target + new
        if new in out:
            raise CheckpointKeyError(f"{origin[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        origin[new] = key
    return out, origin


def check_against_model(
    converted: dict[str, torch.Tensor],
    origin: Mapping[str, str],
    model_shapes: Mapping[str, Sequence[int]],
    what: str,
    may_miss: str | None = None,
) -> None:
    """Raise :class:`CheckpointKeyError` naming ``what`` and listing the converted keys the
    model (``model_shapes``, {key: shape}) lacks, the model keys nothing was converted to (except
    those matching the regular expression ``may_miss``) and the shape mismatches; ``origin``
    ({model key: checkpoint key}) words the messages. BN counters the model does not have are
    removed from ``converted``."""
    for key in [k for k in converted if k.endswith(OPTIONAL_BUFFER) and k not in model_shapes]:
        del converted[key]
    unknown = [f"{origin.get(k, k)} -> {k}" for k in converted if k not in model_shapes]
    missing = [
        k
        for k in model_shapes
        if k not in converted
        and not k.endswith(OPTIONAL_BUFFER)
        and not (may_miss and re.search(may_miss, k))
    ]
    mismatch = [
        f"{k}: converted {tuple(v.shape)} vs model {tuple(model_shapes[k])}"
        for k, v in converted.items()
        if k in model_shapes and tuple(v.shape) != tuple(model_shapes[k])
    ]
    problems = [
        f"{title}, {_format_keys(keys)}"
        for title, keys in (
            ("keys with no counterpart in the model", unknown),
            ("model keys the checkpoint lacks", missing),
            ("shape mismatches", mismatch),
        )
        if keys
    ]
    if problems:
        raise CheckpointKeyError(f"Cannot convert {what}:\n" + "\n".join(problems))


# ------------------------------------------------------------------------------ transforms
def unfold_to_slice_order(x: torch.Tensor) -> torch.Tensor:
    """Swin patch merging: ``nn.Unfold`` channel order -> the 2x2 slice order used here.

    MMDet/MMSeg merge a 2x2 neighbourhood with ``nn.Unfold``, whose 4C features are ordered
    (channel c, offset u) as ``4 c + u`` with u = 2 * row + column; Microsoft's Swin (and this
    project) concatenates slices ``[x(0,0), x(1,0), x(0,1), x(1,1)]``: ``C b + c``. Offset u
    holds slice b = [0, 2, 1, 3][u] (its own inverse). Applies to the last axis of the
    reduction weight (2C, 4C) and of the norm's weight/bias (4C,).
    """
    c = x.shape[-1] // 4
    x = x.reshape(*x.shape[:-1], c, 4)[..., [0, 2, 1, 3]]
    return x.transpose(-1, -2).reshape(*x.shape[:-2], 4 * c)


def tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """Absolute position embedding (1, L, C) of a square L = n x n grid -> (1, C, n, n)."""
    n = round(x.shape[1] ** 0.5)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], n, n)


# ------------------------------------------------------------------------------ layouts
CONV_MODULE = (  # MMCV ConvModule -> Detectron2 Conv2d with norm
    Rule(r"\.conv\.(weight|bias)$", r".\1"),
    Rule(r"\.(bn|gn)\.", ".norm."),
)
# torchvision / MMDet / MMCV ResNet(V1c) -> Detectron2 ResNet. Both DCN implementations order
# the 18 offset channels as (dy, dx) per kernel tap, so offset tensors are kept as they are.
RESNET = (
    Rule(r"^conv1\.", "stem.conv1."),
    Rule(r"^bn1\.", "stem.conv1.norm."),
    Rule(r"^stem\.([036])\.", lambda m: f"stem.conv{int(m[1]) // 3 + 1}."),  # V1c deep stem
    Rule(r"^stem\.([147])\.", lambda m: f"stem.conv{int(m[1]) // 3 + 1}.norm."),
    Rule(r"^layer([1-4])\.", lambda m: f"res{int(m[1]) + 1}."),
    Rule(r"\.bn([1-3])\.", r".conv\1.norm."),
    Rule(r"\.downsample\.0\.", ".shortcut."),
    Rule(r"\.downsample\.1\.", ".shortcut.norm."),
    Rule(r"\.conv2\.conv_offset\.", ".conv2_offset."),
    Rule(r"^fc\.", None),  # ImageNet classifier
)
# Microsoft's Swin (ImageNet classification) -> ours: same names; no classifier, no buffers.
SWIN_MICROSOFT = (
    Rule(r"^(head|norm)\.", None),  # classifier and its final norm
    Rule(r"\.(attn_mask|relative_position_index)$", None),  # recomputed from the window size
    Rule(r"^absolute_pos_embed$", r"\g<0>", tokens_to_grid),
)
# MMDet / MMSeg Swin -> ours.
SWIN_MMDET = (
    Rule(r"^patch_embed\.projection\.", "patch_embed.proj."),
    Rule(r"^stages\.", "layers."),
    Rule(r"\.attn\.w_msa\.", ".attn."),
    Rule(r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
    Rule(r"\.ffn\.layers\.1\.", ".mlp.fc2."),
    Rule(
        r"\.downsample\.(reduction\.weight|norm\.(weight|bias))$", r"\g<0>", unfold_to_slice_order
    ),
    Rule(r"\.relative_position_index$", None),
    Rule(r"^absolute_pos_embed$", r"\g<0>", tokens_to_grid),
)
FPN = (  # MMDet FPN -> Detectron2 FPN, levels p2-p5
    Rule(r"^lateral_convs\.(\d)\.conv\.", lambda m: f"fpn_lateral{int(m[1]) + 2}."),
    Rule(r"^fpn_convs\.(\d)\.conv\.", lambda m: f"fpn_output{int(m[1]) + 2}."),
)
LOCALIZATION_FPN = (Rule(r"^aux_convs\.0\.", "aux_conv."), *CONV_MODULE)
UPDATE_STAGE = (  # KernelUpdateHead: MMCV attention / FFN wrappers -> plain modules
    Rule(r"\.attention\.attn\.", ".attention."),
    Rule(r"\.feat_transform\.conv\.", ".feat_transform."),
    Rule(r"\.ffn\.layers\.0\.0\.", ".ffn.0."),
    Rule(r"\.ffn\.layers\.1\.", ".ffn.3."),
)


def KNET_MMDET(backbone: tuple[Rule, ...]) -> tuple[Section, ...]:  # noqa: N802
    """Official instance/panoptic K-Net (MMDetection 2.x) with the given backbone rules."""
    return (
        Section("backbone.", "backbone.bottom_up.", backbone),
        Section("neck.", "backbone.", FPN),
        Section("rpn_head.localization_fpn.", "pixel_decoder.", LOCALIZATION_FPN),
        Section("rpn_head.", "kernel_head.initial_head.", CONV_MODULE),
        Section("roi_head.mask_head.", "kernel_head.stages.", UPDATE_STAGE),
    )


# Kernel linking (and fusion) is built in every stage but runs in the last only: the other
# stages' copies are dropped.
UNUSED_LINKS = Rule(r"^\d+\.(attention_previous|link_ffn)", None)


def _kernel_link(source: str, suffix: str, target: str) -> tuple[Section, ...]:
    """The official linking modules ``attention_previous{suffix}`` (MMCV MultiheadAttention),
    ``attention_previous_norm{suffix}``, ``link_ffn{suffix}`` (MMCV FFN), ``link_ffn_norm{suffix}``
    under ``source`` -> a ``KernelLink`` at ``target``."""
    return (
        Section(f"{source}attention_previous{suffix}.attn.", f"{target}attention."),
        Section(f"{source}attention_previous_norm{suffix}.", f"{target}attention_norm."),
        Section(f"{source}link_ffn{suffix}.layers.0.0.", f"{target}ffn.0."),
        Section(f"{source}link_ffn{suffix}.layers.1.", f"{target}ffn.2."),
        Section(f"{source}link_ffn_norm{suffix}.", f"{target}ffn_norm."),
    )


def VIDEO_KNET_MMDET(  # noqa: N802
    backbone: tuple[Rule, ...], num_stages: int
) -> tuple[Section, ...]:
    """Official Video K-Net (``VideoKNetQuansiEmbedFCJointTrain``): image K-Net's keys, the last
    stage's kernel linking ("ffn": ``attention_previous`` / ``link_ffn``; "update": the ``*_track``
    modules and their ``attention_previous_update_track`` updator), kernel fusion when present
    (the ``*_link`` modules, ``update_dynamic_cov``), and the association embedding layers."""
    last = f"roi_head.mask_head.{num_stages - 1}."
    fusion = f"kernel_head.stages.{num_stages - 1}.fusion."
    image = KNET_MMDET(backbone)
    stages = next(s for s in image if s.source == "roi_head.mask_head.")
    return (
        Section(last + "attention_previous_update_link.", fusion + "updator."),
        *_kernel_link(last, "_link", fusion + "link."),
        *_kernel_link(last, "", "kernel_link."),
        Section(last + "attention_previous_update_track.", "kernel_link.updator."),
        *_kernel_link(last, "_track", "kernel_link.link."),
        Section("embed_fcs.", "association_head.embed_fcs."),
        Section("fc_embed.", "association_head.fc_embed."),
        Section("track_head.fcs.", "association_head.track_fcs.", (Rule(r"^1\.", "2."),)),
        Section("track_head.fc_embed.", "association_head.track_embed."),
        *(s for s in image if s is not stages),
        Section(stages.source, stages.target, (UNUSED_LINKS, *stages.rules)),
    )


def KNET_TRACK_MMDET(backbone: tuple[Rule, ...]) -> tuple[Section, ...]:  # noqa: N802
    """Official clip-level Video K-Net for VIS (``KNetTrack``): image K-Net's keys and the clip
    head's stages (``tracker.mask_head.*``, the image stages' layout; the per-frame stages
    without the class branch)."""
    return (
        *KNET_MMDET(backbone),
        Section("tracker.mask_head.", "clip_head.stages.", UPDATE_STAGE),
    )


def KNET_MMSEG(backbone: tuple[Rule, ...]) -> tuple[Section, ...]:  # noqa: N802
    """MMSeg / official semantic K-Net with the given backbone rules."""
    return (
        Section("backbone.", "backbone.", backbone),
        Section("decode_head.kernel_generate_head.conv_seg.", "kernel_head.conv_seg."),
        Section("decode_head.kernel_generate_head.", "pixel_decoder.", CONV_MODULE),
        Section("decode_head.kernel_update_head.", "kernel_head.stages.", UPDATE_STAGE),
        Section("auxiliary_head.", "auxiliary_head.", CONV_MODULE),
    )
