"""Conversion of official K-Net (MMDetection) and torchvision ResNet weights to this project.

Official checkpoints (``ZwwWayne/K-Net``, MMDet 2.x) name the model as::

    backbone.*          torchvision-style ResNet (conv1, bn1, layer1-4, downsample.{0,1})
    neck.*              MMDet FPN (lateral_convs.{0-3}.conv, fpn_convs.{0-3}.conv)
    rpn_head.*          ConvKernelHead incl. the localization FPN (localization_fpn.*)
    roi_head.mask_head.{s}.*   one KernelUpdateHead per stage

and this project names the same tensors ``backbone.bottom_up.*`` / ``backbone.fpn_*`` (Detectron2
ResNet-FPN), ``pixel_decoder.*``, ``kernel_head.initial_head.*`` and ``kernel_head.stages.{s}.*``.
Every tensor keeps its layout: the only changes are names (MMCV ``ConvModule`` ``conv``/``gn``
become Detectron2 ``Conv2d`` weight/``norm``, MMCV's attention/FFN wrappers disappear, and
``nn.MultiheadAttention`` keeps the stacked q|k|v ``in_proj`` of the official model).

The converters are strict: a key they cannot map, or a key the detected architecture needs but
the input lacks, raises :class:`CheckpointKeyError` naming the keys.
"""

import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch

__all__ = [
    "CheckpointKeyError",
    "UnsupportedCheckpointError",
    "OfficialKNetInfo",
    "StateDictDiff",
    "convert_official_knet_state_dict",
    "convert_torchvision_resnet_state_dict",
    "describe_official_knet_state_dict",
    "compare_state_dicts",
    "check_coco_class_names",
    "load_checkpoint_file",
    "save_detectron2_checkpoint",
]

# ResNet block counts per stage (layer1-4) -> depth; 18/34 use BasicBlock (no conv3).
RESNET_DEPTHS: Dict[Tuple[Tuple[int, ...], bool], int] = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
BN_BUFFER_OPTIONAL = "num_batches_tracked"
MAX_KEYS_SHOWN = 20

BACKBONE_PREFIX = "backbone.bottom_up."
OUR_FPN_PREFIX = "backbone."
OUR_DECODER_PREFIX = "pixel_decoder."
OUR_INITIAL_HEAD_PREFIX = "kernel_head.initial_head."
OUR_STAGE_PREFIX = "kernel_head.stages."
OFFICIAL_STAGE_PREFIX = "roi_head.mask_head."


class CheckpointKeyError(ValueError):
    """The checkpoint has keys that cannot be mapped, or lacks keys that must be present."""


class UnsupportedCheckpointError(ValueError):
    """The checkpoint belongs to a model variant this project does not implement (yet)."""


def _format_keys(keys: Iterable[str], limit: int = MAX_KEYS_SHOWN) -> str:
    keys = sorted(keys)
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} key(s):\n  {shown}{more}"


def _raise_on_key_problems(unknown: Set[str], missing: Set[str], what: str) -> None:
    """Raise CheckpointKeyError listing unmappable and missing keys (nothing if both empty)."""
    if not unknown and not missing:
        return
    parts = [f"Cannot convert {what}."]
    if unknown:
        parts.append(f"Keys with no known mapping, {_format_keys(unknown)}")
    if missing:
        parts.append(
            f"Keys the detected architecture needs but the input lacks, {_format_keys(missing)}"
        )
    raise CheckpointKeyError("\n".join(parts))


def _unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Return (state_dict, meta) from a bare state dict or an MMCV checkpoint dict."""
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        state_dict = dict(checkpoint["state_dict"])
        meta = checkpoint.get("meta") or {}
    else:
        state_dict, meta = dict(checkpoint), {}
    not_tensors = {k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}
    if not_tensors:
        raise CheckpointKeyError(
            "Expected a state dict of tensors (or a checkpoint dict with a 'state_dict' entry); "
            f"these entries are not tensors, {_format_keys(not_tensors)}"
        )
    return state_dict, dict(meta)


# ------------------------------------------------------------------------------------ ResNet
_STEM_RE = re.compile(r"^(conv1\.weight|bn1\.(\w+))$")
_BLOCK_RE = re.compile(
    r"^layer([1-4])\.(\d+)\."
    r"(?:conv([1-3])\.weight|bn([1-3])\.(\w+)|downsample\.0\.weight|downsample\.1\.(\w+)"
    r"|conv2\.conv_offset\.(weight|bias))$"
)


def resnet_key_to_detectron2(key: str) -> Optional[str]:
    """Map one torchvision/MMDet ResNet key to Detectron2's ResNet naming (None if unknown).

    ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; ``layerN.i`` -> ``res{N+1}.i``;
    ``bnK`` -> ``convK.norm``; ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``;
    the DCNv1 offset conv ``conv2.conv_offset`` -> ``conv2_offset``. Both DCN implementations
    order the 18 offset channels as (dy, dx) per kernel tap, so the tensors are kept as they are.
    """
    m = _STEM_RE.match(key)
    if m:
        if m.group(2) is None:
            return "stem.conv1.weight"
        if m.group(2) in BN_PARAMS + (BN_BUFFER_OPTIONAL,):
            return f"stem.conv1.norm.{m.group(2)}"
        return None
    m = _BLOCK_RE.match(key)
    if not m:
        return None
    layer, block, conv_k, bn_k, bn_param, ds_param, offset_param = m.groups()
    prefix = f"res{int(layer) + 1}.{block}."
    if conv_k is not None:
        return f"{prefix}conv{conv_k}.weight"
    if bn_k is not None:
        return f"{prefix}conv{bn_k}.norm.{bn_param}" if _is_bn_entry(bn_param) else None
    if ds_param is not None:
        return f"{prefix}shortcut.norm.{ds_param}" if _is_bn_entry(ds_param) else None
    if offset_param is not None:
        return f"{prefix}conv2_offset.{offset_param}"
    return f"{prefix}shortcut.weight"


def _is_bn_entry(name: str) -> bool:
    return name in BN_PARAMS or name == BN_BUFFER_OPTIONAL


@dataclass
class ResNetLayout:
    """Architecture of a torchvision-named ResNet, read from its keys."""

    depth: int
    blocks: Tuple[int, int, int, int]
    bottleneck: bool
    deform_layers: Tuple[int, ...] = ()  # layer indices (1-4) whose 3x3 convs are DCNv1

    def expected_keys(self) -> Tuple[Set[str], Set[str]]:
        """(required, optional) torchvision-style keys; optional = BN ``num_batches_tracked``."""
        required: Set[str] = {"conv1.weight"} | {f"bn1.{p}" for p in BN_PARAMS}
        optional: Set[str] = {f"bn1.{BN_BUFFER_OPTIONAL}"}
        convs = (1, 2, 3) if self.bottleneck else (1, 2)
        for layer, num_blocks in enumerate(self.blocks, start=1):
            for i in range(num_blocks):
                p = f"layer{layer}.{i}."
                for k in convs:
                    required.add(f"{p}conv{k}.weight")
                    required |= {f"{p}bn{k}.{q}" for q in BN_PARAMS}
                    optional.add(f"{p}bn{k}.{BN_BUFFER_OPTIONAL}")
                # bottleneck layer1 changes the width (64 -> 256); BasicBlock layer1 does not
                if i == 0 and (layer > 1 or self.bottleneck):
                    required.add(f"{p}downsample.0.weight")
                    required |= {f"{p}downsample.1.{q}" for q in BN_PARAMS}
                    optional.add(f"{p}downsample.1.{BN_BUFFER_OPTIONAL}")
                if layer in self.deform_layers:
                    required |= {f"{p}conv2.conv_offset.weight", f"{p}conv2.conv_offset.bias"}
        return required, optional


def detect_resnet_layout(keys: Iterable[str]) -> ResNetLayout:
    """Read depth, block type and DCN stages from torchvision-style ResNet keys."""
    keys = list(keys)
    blocks = []
    for layer in range(1, 5):
        idx = {int(m.group(1)) for k in keys if (m := re.match(rf"^layer{layer}\.(\d+)\.", k))}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = any(re.match(r"^layer\d\.\d+\.conv3\.weight$", k) for k in keys)
    depth = RESNET_DEPTHS.get((tuple(blocks), bottleneck))
    if depth is None:
        raise UnsupportedCheckpointError(
            f"Unrecognised ResNet: blocks per stage {tuple(blocks)}, "
            f"{'bottleneck' if bottleneck else 'basic'} blocks. Supported depths: "
            f"{sorted(set(RESNET_DEPTHS.values()))}."
        )
    offsets = [re.match(r"^layer(\d)\.\d+\.conv2\.conv_offset\.", k) for k in keys]
    deform = tuple(sorted({int(m.group(1)) for m in offsets if m}))
    return ResNetLayout(depth, tuple(blocks), bottleneck, deform)  # type: ignore[arg-type]


def _keep_buffer(key: str, target_keys: Optional[Set[str]]) -> bool:
    """BN ``num_batches_tracked`` is kept only when the target model has that buffer."""
    if not key.endswith(BN_BUFFER_OPTIONAL):
        return True
    return target_keys is not None and key in target_keys


def _convert_resnet(
    state_dict: Mapping[str, torch.Tensor],
    out_prefix: str,
    target_keys: Optional[Set[str]],
    what: str,
    ignore_prefixes: Tuple[str, ...] = (),
) -> Tuple[Dict[str, torch.Tensor], ResNetLayout]:
    """Strictly convert torchvision-named ResNet keys (without any model prefix)."""
    keys = [k for k in state_dict if not k.startswith(ignore_prefixes)]
    unknown = {k for k in keys if resnet_key_to_detectron2(k) is None}
    layout = detect_resnet_layout(k for k in keys if k not in unknown)
    required, optional = layout.expected_keys()
    unknown |= set(keys) - required - optional
    _raise_on_key_problems(unknown, required - set(keys), what)
    out = {}
    for k in keys:
        new_key = out_prefix + resnet_key_to_detectron2(k)  # type: ignore[operator]
        if _keep_buffer(new_key, target_keys):
            out[new_key] = state_dict[k]
    return out, layout


def convert_torchvision_resnet_state_dict(
    state_dict: Mapping[str, Any],
    target_keys: Optional[Iterable[str]] = None,
    prefix: str = BACKBONE_PREFIX,
) -> Dict[str, torch.Tensor]:
    """Convert a torchvision ImageNet ResNet state dict to this project's backbone names.

    Same renaming as Detectron2's ``tools/convert-torchvision-to-d2.py``, with an explicit
    ``prefix`` (``backbone.bottom_up.``) instead of name-matching heuristics; the classifier
    ``fc.*`` is dropped. Use ``MODEL.RESNETS.STRIDE_IN_1X1=False`` with these weights.

    Args:
        state_dict: ``torchvision.models.resnetXX().state_dict()`` (or a dict holding it under
            ``"state_dict"``).
        target_keys: keys of the model to load into; BN ``num_batches_tracked`` buffers are
            kept only if listed there (Detectron2's FrozenBN has none).
        prefix: prepended to every Detectron2 ResNet key.

    Returns:
        {prefix + Detectron2 key: tensor}, tensors unchanged.
    """
    sd, _ = _unwrap_state_dict(state_dict)
    targets = set(target_keys) if target_keys is not None else None
    out, _ = _convert_resnet(
        sd, prefix, targets, "torchvision ResNet state dict", ignore_prefixes=("fc.",)
    )
    return out


# ------------------------------------------------------------------------------- K-Net heads
def _stage_renames(num_cls_fcs: int, num_mask_fcs: int) -> List[Tuple[str, str]]:
    """(official suffix, our suffix) pairs of one ``roi_head.mask_head.{s}`` stage."""
    pairs = [
        ("attention.attn.in_proj_weight", "attention.in_proj_weight"),
        ("attention.attn.in_proj_bias", "attention.in_proj_bias"),
        ("attention.attn.out_proj.weight", "attention.out_proj.weight"),
        ("attention.attn.out_proj.bias", "attention.out_proj.bias"),
        ("feat_transform.conv.weight", "feat_transform.weight"),
        ("feat_transform.conv.bias", "feat_transform.bias"),
        ("ffn.layers.0.0.weight", "ffn.0.weight"),
        ("ffn.layers.0.0.bias", "ffn.0.bias"),
        ("ffn.layers.1.weight", "ffn.3.weight"),
        ("ffn.layers.1.bias", "ffn.3.bias"),
    ]
    same = ["attention_norm", "ffn_norm", "fc_mask", "fc_cls"]
    same += [f"kernel_update_conv.{n}" for n in ("dynamic_layer", "input_layer", "input_gate")]
    same += [f"kernel_update_conv.{n}" for n in ("update_gate", "fc_layer", "fc_norm")]
    same += [f"kernel_update_conv.{n}" for n in ("norm_in", "norm_out", "input_norm_in")]
    same += ["kernel_update_conv.input_norm_out"]
    for branch, count in (("cls_fcs", num_cls_fcs), ("mask_fcs", num_mask_fcs)):
        for i in range(count):  # Sequential of (Linear without bias, LayerNorm, ReLU) x count
            pairs.append((f"{branch}.{3 * i}.weight", f"{branch}.{3 * i}.weight"))
            same.append(f"{branch}.{3 * i + 1}")
    for name in same:
        pairs += [(f"{name}.weight", f"{name}.weight"), (f"{name}.bias", f"{name}.bias")]
    return pairs


def _rpn_renames() -> List[Tuple[str, str]]:
    """(official key, our key) pairs of ``rpn_head.*`` (ConvKernelHead + localization FPN)."""

    def conv_module(official: str, ours: str) -> List[Tuple[str, str]]:
        return [
            (f"{official}.conv.weight", f"{ours}.weight"),
            (f"{official}.gn.weight", f"{ours}.norm.weight"),
            (f"{official}.gn.bias", f"{ours}.norm.bias"),
        ]

    fpn, head = "rpn_head.localization_fpn.", "rpn_head."
    pairs = []
    for level in range(4):
        for j in range(max(level, 1)):
            name = f"convs_all_levels.{level}.conv{j}"
            pairs += conv_module(fpn + name, OUR_DECODER_PREFIX + name)
    pairs += conv_module(fpn + "conv_pred", OUR_DECODER_PREFIX + "conv_pred")
    pairs += conv_module(fpn + "aux_convs.0", OUR_DECODER_PREFIX + "aux_conv")
    pairs += conv_module(head + "loc_convs.0", OUR_INITIAL_HEAD_PREFIX + "loc_convs.0")
    pairs += conv_module(head + "seg_convs.0", OUR_INITIAL_HEAD_PREFIX + "seg_convs.0")
    pairs += [
        (head + "init_kernels.weight", OUR_INITIAL_HEAD_PREFIX + "init_kernels.weight"),
        (head + "conv_seg.weight", OUR_INITIAL_HEAD_PREFIX + "conv_seg.weight"),
        (head + "conv_seg.bias", OUR_INITIAL_HEAD_PREFIX + "conv_seg.bias"),
    ]
    return pairs


def _neck_renames() -> List[Tuple[str, str]]:
    """(official key, our key) pairs of the MMDet FPN neck -> Detectron2 FPN."""
    pairs = []
    for i in range(4):
        for p in ("weight", "bias"):
            pairs.append(
                (f"neck.lateral_convs.{i}.conv.{p}", f"{OUR_FPN_PREFIX}fpn_lateral{i + 2}.{p}")
            )
            pairs.append((f"neck.fpn_convs.{i}.conv.{p}", f"{OUR_FPN_PREFIX}fpn_output{i + 2}.{p}"))
    return pairs


@dataclass
class OfficialKNetInfo:
    """Architecture of an official K-Net checkpoint, read from its keys and shapes."""

    depth: int
    deform_layers: Tuple[int, ...]  # torchvision layer indices (1-4) with DCNv1 3x3 convs
    num_stages: int
    num_classes: int
    num_proposals: int
    channels: int
    num_cls_fcs: int
    num_mask_fcs: int
    classes: Tuple[str, ...] = field(default_factory=tuple)  # meta["CLASSES"], if stored

    def detectron2_options(self) -> List[str]:
        """Config overrides (``KEY VALUE`` list) that build the matching model."""
        opts = [
            "MODEL.RESNETS.DEPTH", str(self.depth),
            "MODEL.KNET.NUM_STAGES", str(self.num_stages),
            "MODEL.KNET.STAGE_LOSS_WEIGHTS", str([1.0] * self.num_stages),
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(self.num_classes),
            "MODEL.KNET.NUM_PROPOSALS", str(self.num_proposals),
            "MODEL.KNET.HIDDEN_DIM", str(self.channels),
            "MODEL.KNET.NUM_CLS_FCS", str(self.num_cls_fcs),
            "MODEL.KNET.NUM_MASK_FCS", str(self.num_mask_fcs),
        ]  # fmt: skip
        if self.deform_layers:
            on = [layer in self.deform_layers for layer in range(1, 5)]
            opts += ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", str(on)]
            opts += ["MODEL.RESNETS.DEFORM_MODULATED", "False"]
        return opts


def _check_unsupported(keys: Sequence[str]) -> None:
    """Raise UnsupportedCheckpointError for official variants that have no port here."""
    swin = [k for k in keys if k.startswith(("backbone.patch_embed.", "backbone.stages."))]
    if swin:
        raise UnsupportedCheckpointError(
            "Swin Transformer backbones (e.g. knet_s3_swin-l_fpn_ms-3x_16x2_coco-panoptic) are "
            f"not supported yet; found Swin keys such as {swin[0]!r}. Only ResNet-50/101 "
            "(optionally with DCN in res3-res5) K-Net checkpoints can be converted."
        )
    semantic = [k for k in keys if k.startswith(("decode_head.", "auxiliary_head."))]
    if semantic:
        raise UnsupportedCheckpointError(
            "Semantic-segmentation (MMSeg, ADE20K) K-Net checkpoints are not supported yet; "
            f"found keys such as {semantic[0]!r}. Only the COCO instance/panoptic checkpoints "
            "(backbone/neck/rpn_head/roi_head) can be converted."
        )
    deep_stem = [k for k in keys if k.startswith("backbone.stem.")]
    if deep_stem:
        raise UnsupportedCheckpointError(
            f"ResNetV1c deep-stem backbones are not supported; found {deep_stem[0]!r}."
        )


def _count_fcs(state_dict: Mapping[str, torch.Tensor], stage_prefix: str, branch: str) -> int:
    idx = [
        int(m.group(1))
        for k in state_dict
        if (m := re.match(rf"^{re.escape(stage_prefix)}{branch}\.(\d+)\.weight$", k))
        and int(m.group(1)) % 3 == 0
    ]
    return max(idx) // 3 + 1 if idx else 0


def _detect_stages(keys: Iterable[str]) -> int:
    stages = {int(m.group(1)) for k in keys if (m := re.match(r"^roi_head\.mask_head\.(\d+)\.", k))}
    if not stages:
        return 0
    if stages != set(range(max(stages) + 1)):
        raise CheckpointKeyError(f"Update-head stages are not contiguous: {sorted(stages)}")
    return max(stages) + 1


def describe_official_knet_state_dict(checkpoint: Mapping[str, Any]) -> OfficialKNetInfo:
    """Read the architecture (depth, DCN, stages, classes, proposals, width) of a checkpoint."""
    sd, meta = _unwrap_state_dict(checkpoint)
    _check_unsupported(list(sd))
    bb_keys = [k[len("backbone.") :] for k in sd if k.startswith("backbone.")]
    layout = detect_resnet_layout(bb_keys)
    num_stages = _detect_stages(sd)
    if num_stages == 0:
        raise CheckpointKeyError(
            "No update-head keys (roi_head.mask_head.{s}.*) found: not a K-Net checkpoint?"
        )

    def shape(key: str) -> Tuple[int, ...]:
        if key not in sd:
            raise CheckpointKeyError(f"Cannot convert official K-Net checkpoint: missing {key!r}")
        return tuple(sd[key].shape)

    num_proposals, channels = shape("rpn_head.init_kernels.weight")[:2]
    num_classes = shape("rpn_head.conv_seg.weight")[0]
    stage0 = f"{OFFICIAL_STAGE_PREFIX}0."
    in_proj = shape(stage0 + "attention.attn.in_proj_weight")
    if in_proj != (3 * channels, channels):
        raise CheckpointKeyError(
            f"{stage0}attention.attn.in_proj_weight has shape {in_proj}; expected stacked q|k|v "
            f"of shape {(3 * channels, channels)}"
        )
    for s in range(num_stages):
        rows = shape(f"{OFFICIAL_STAGE_PREFIX}{s}.fc_cls.weight")[0]
        if rows != num_classes:
            raise CheckpointKeyError(
                f"Stage {s} classifies {rows} classes but rpn_head.conv_seg has {num_classes}"
            )
    classes = tuple(meta.get("CLASSES") or ())
    return OfficialKNetInfo(
        depth=layout.depth,
        deform_layers=layout.deform_layers,
        num_stages=num_stages,
        num_classes=num_classes,
        num_proposals=num_proposals,
        channels=channels,
        num_cls_fcs=_count_fcs(sd, stage0, "cls_fcs"),
        num_mask_fcs=_count_fcs(sd, stage0, "mask_fcs"),
        classes=classes,
    )


def convert_official_knet_state_dict(
    checkpoint: Mapping[str, Any], target_keys: Optional[Iterable[str]] = None
) -> Dict[str, torch.Tensor]:
    """Convert an official K-Net (MMDet) COCO checkpoint to this project's state-dict names.

    Supports ResNet-50/101 (depth read from the layer3 block count; DCNv1 3x3 convs map to
    Detectron2's ``conv2_offset``) with any number of update stages (read from the
    ``roi_head.mask_head.{s}`` keys). Swin and MMSeg semantic checkpoints raise
    :class:`UnsupportedCheckpointError`.

    Args:
        checkpoint: the official ``state_dict``, or the whole checkpoint dict
            (``{"meta": ..., "state_dict": ...}``) as returned by ``torch.load``.
        target_keys: keys of the model to load into; BN ``num_batches_tracked`` buffers are
            kept only if listed there (Detectron2's FrozenBN has none, plain BN does).

    Returns:
        {our key: tensor}; tensors are the input tensors, unchanged.

    Raises:
        CheckpointKeyError: a key with no mapping, or a key the detected architecture needs
            that the input lacks (at most 20 of each are listed).
        UnsupportedCheckpointError: Swin / semantic / deep-stem checkpoints.
    """
    sd, _ = _unwrap_state_dict(checkpoint)
    info = describe_official_knet_state_dict(sd)
    targets = set(target_keys) if target_keys is not None else None

    bb = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    required_bb, optional_bb = detect_resnet_layout(bb).expected_keys()

    pairs = _neck_renames() + _rpn_renames()
    for s in range(info.num_stages):
        pairs += [
            (f"{OFFICIAL_STAGE_PREFIX}{s}.{a}", f"{OUR_STAGE_PREFIX}{s}.{b}")
            for a, b in _stage_renames(info.num_cls_fcs, info.num_mask_fcs)
        ]
    rename = dict(pairs)

    head_keys = {k for k in sd if not k.startswith("backbone.")}
    unknown = {f"backbone.{k}" for k in set(bb) - required_bb - optional_bb}
    unknown |= head_keys - set(rename)
    missing = {f"backbone.{k}" for k in required_bb - set(bb)} | (set(rename) - head_keys)
    _raise_on_key_problems(
        unknown,
        missing,
        f"official K-Net checkpoint (detected ResNet-{info.depth}, {info.num_stages} stages, "
        f"{info.num_classes} classes)",
    )

    out, _ = _convert_resnet(bb, BACKBONE_PREFIX, targets, "official K-Net backbone")
    for old, new in pairs:
        out[new] = sd[old]
    return out


# ------------------------------------------------------------------------ checks and files
@dataclass
class StateDictDiff:
    """Differences between a converted state dict and a model's own state dict."""

    missing: List[str]  # in the model, not in the converted dict
    unexpected: List[str]  # in the converted dict, not in the model
    shape_mismatch: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]  # (key, ours, model)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def format(self, limit: int = MAX_KEYS_SHOWN) -> str:
        lines = []
        if self.missing:
            lines.append(f"missing in the converted weights: {_format_keys(self.missing, limit)}")
        if self.unexpected:
            lines.append(f"not in the model: {_format_keys(self.unexpected, limit)}")
        if self.shape_mismatch:
            shown = [f"{k}: converted {a} vs model {b}" for k, a, b in self.shape_mismatch]
            lines.append(f"shape mismatches: {_format_keys(shown, limit)}")
        return "\n".join(lines) if lines else "all keys and shapes match"


def compare_state_dicts(
    converted: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> StateDictDiff:
    """Key-by-key and shape-by-shape comparison with ``model.state_dict()``."""
    shapes = [
        (k, tuple(converted[k].shape), tuple(reference[k].shape))
        for k in sorted(set(converted) & set(reference))
        if tuple(converted[k].shape) != tuple(reference[k].shape)
    ]
    return StateDictDiff(
        missing=sorted(set(reference) - set(converted)),
        unexpected=sorted(set(converted) - set(reference)),
        shape_mismatch=shapes,
    )


def check_coco_class_names(classes: Sequence[str]) -> List[str]:
    """Compare a checkpoint's class order with Detectron2's COCO contiguous ids.

    Args:
        classes: ``meta["CLASSES"]`` of the checkpoint: 80 thing classes (instance) or 80 things
            followed by 53 stuff classes (panoptic).

    Returns:
        One line per position where the names differ (empty when the order matches, so that
        ``fc_cls``/``conv_seg`` rows need no re-indexing).
    """
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    things = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
    stuff = [c["name"] for c in COCO_CATEGORIES if not c["isthing"]]
    if len(classes) == len(things):
        expected = things
    elif len(classes) == len(things) + len(stuff):
        expected = things + stuff
    else:
        return [
            f"{len(classes)} classes; Detectron2's COCO has {len(things)} things "
            f"(+{len(stuff)} stuff)"
        ]
    return [
        f"class {i}: checkpoint {a!r} vs Detectron2 {b!r}"
        for i, (a, b) in enumerate(zip(classes, expected))
        if a != b
    ]


def load_checkpoint_file(path: str, allow_pickle: bool = False) -> Dict[str, Any]:
    """``torch.load`` on CPU, restricted to tensors and plain containers by default.

    Args:
        path: a ``.pth`` file (official K-Net, torchvision ImageNet weights, ...).
        allow_pickle: fall back to full unpickling (``weights_only=False``) for files whose
            metadata holds arbitrary Python objects. Only use this for trusted files.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise pickle.UnpicklingError(
                f"{path} holds objects other than tensors and plain containers; if you trust "
                f"the file, load it with allow_pickle=True (CLI: --allow-pickle). Cause: {e}"
            ) from e
        return torch.load(path, map_location="cpu", weights_only=False)


def save_detectron2_checkpoint(
    state_dict: Mapping[str, torch.Tensor], path: str, author: str
) -> None:
    """Write ``{"model": ..., "__author__": author, "matching_heuristics": False}``.

    ``.pth``/``.pt`` files are written with ``torch.save`` (loadable with ``weights_only=True``,
    the default of ``torch.load`` since torch 2.6); ``.pkl`` files hold numpy arrays, the format
    of Detectron2's model zoo. Both load with ``DetectionCheckpointer(model).load(path)``.
    """
    if path.endswith(".pkl"):
        model = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
        with open(path, "wb") as f:
            pickle.dump({"model": model, "__author__": author, "matching_heuristics": False}, f)
    elif path.endswith((".pth", ".pt")):
        model = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        torch.save({"model": model, "__author__": author, "matching_heuristics": False}, path)
    else:
        raise ValueError(f"Output must end with .pth, .pt or .pkl, got {path!r}")
