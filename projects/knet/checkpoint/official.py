"""Conversion of official K-Net / MMSeg checkpoints and ImageNet ResNets to this project.

Official instance/panoptic checkpoints (``ZwwWayne/K-Net``, MMDet 2.x) name the model as::

    backbone.*          torchvision-style ResNet (conv1, bn1, layer1-4, downsample.{0,1})
    neck.*              MMDet FPN (lateral_convs.{0-3}.conv, fpn_convs.{0-3}.conv)
    rpn_head.*          ConvKernelHead incl. the localization FPN (localization_fpn.*)
    roi_head.mask_head.{s}.*   one KernelUpdateHead per stage

and this project names the same tensors ``backbone.bottom_up.*`` / ``backbone.fpn_*`` (Detectron2
ResNet-FPN), ``pixel_decoder.*``, ``kernel_head.initial_head.*`` and ``kernel_head.stages.{s}.*``.

Semantic checkpoints (MMSeg and the official ``knet/seg`` code, ADE20K) name it as::

    backbone.*                               ResNetV1c (deep stem stem.{0,1,3,4,6,7}, layer1-4)
    decode_head.kernel_generate_head.*       an MMSeg decode head (UPerNet, FCN, PSPNet, ASPP)
    decode_head.kernel_update_head.{s}.*     one KernelUpdateHead per stage, no class branch
    auxiliary_head.*                         MMSeg FCNHead on res4

which become ``backbone.*`` (a Detectron2 ResNet without FPN), ``pixel_decoder.*`` (the decode
head without its classifier), ``kernel_head.conv_seg.*`` (the classifier, whose weights are the
initial kernels), ``kernel_head.stages.{s}.*`` and ``auxiliary_head.*``.

Every tensor keeps its layout: the only changes are names (MMCV ``ConvModule`` ``conv``/``gn``/
``bn`` become Detectron2 ``Conv2d`` weight/``norm``, MMCV's attention/FFN wrappers disappear, and
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
    "BACKBONE_PREFIX",
    "SEMANTIC_BACKBONE_PREFIX",
    "SEMANTIC_DECODE_HEADS",
    "SemanticDecodeHead",
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
SEMANTIC_BACKBONE_PREFIX = "backbone."  # semantic K-Net: the ResNet is not wrapped in an FPN
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
# ResNetV1c deep stem: Sequential(conv, BN, ReLU) x 3 -> Detectron2 DeepLabStem conv1-3.
_DEEP_STEM_RE = re.compile(r"^stem\.([013467])\.(\w+)$")
_DEEP_STEM_CONVS = {"0": "conv1", "3": "conv2", "6": "conv3"}
_DEEP_STEM_BNS = {"1": "conv1", "4": "conv2", "7": "conv3"}
_BLOCK_RE = re.compile(
    r"^layer([1-4])\.(\d+)\."
    r"(?:conv([1-3])\.weight|bn([1-3])\.(\w+)|downsample\.0\.weight|downsample\.1\.(\w+)"
    r"|conv2\.conv_offset\.(weight|bias))$"
)


def resnet_key_to_detectron2(key: str) -> Optional[str]:
    """Map one torchvision/MMCV ResNet key to Detectron2's ResNet naming (None if unknown).

    ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; the ResNetV1c deep stem
    ``stem.{0,3,6}`` / ``stem.{1,4,7}`` -> ``stem.conv{1,2,3}`` / ``stem.conv{1,2,3}.norm``
    (Detectron2's ``DeepLabStem``); ``layerN.i`` -> ``res{N+1}.i``;
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
    m = _DEEP_STEM_RE.match(key)
    if m:
        index, param = m.groups()
        if index in _DEEP_STEM_CONVS:
            return f"stem.{_DEEP_STEM_CONVS[index]}.weight" if param == "weight" else None
        return f"stem.{_DEEP_STEM_BNS[index]}.norm.{param}" if _is_bn_entry(param) else None
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
    deep_stem: bool = False  # ResNetV1c: stem.{0,1,3,4,6,7} instead of conv1/bn1

    def expected_keys(self) -> Tuple[Set[str], Set[str]]:
        """(required, optional) torchvision-style keys; optional = BN ``num_batches_tracked``."""
        if self.deep_stem:
            required: Set[str] = {f"stem.{i}.weight" for i in _DEEP_STEM_CONVS}
            required |= {f"stem.{i}.{p}" for i in _DEEP_STEM_BNS for p in BN_PARAMS}
            optional: Set[str] = {f"stem.{i}.{BN_BUFFER_OPTIONAL}" for i in _DEEP_STEM_BNS}
        else:
            required = {"conv1.weight"} | {f"bn1.{p}" for p in BN_PARAMS}
            optional = {f"bn1.{BN_BUFFER_OPTIONAL}"}
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
    """Read depth, block type, DCN stages and stem type from torchvision-style ResNet keys."""
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
    deep_stem = any(k.startswith("stem.") for k in keys)
    return ResNetLayout(
        depth,
        tuple(blocks),
        bottleneck,
        deform,
        deep_stem,  # type: ignore[arg-type]
    )


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
    """Convert an ImageNet ResNet state dict (torchvision or MMCV V1c) to this project's names.

    Same renaming as Detectron2's ``tools/convert-torchvision-to-d2.py``, with an explicit
    ``prefix`` instead of name-matching heuristics; the classifier ``fc.*`` is dropped. MMCV's
    ResNetV1c weights (``open-mmlab://resnet50_v1c``: deep stem ``stem.{0,1,3,4,6,7}``) map to
    Detectron2's ``DeepLabStem`` (``MODEL.RESNETS.STEM_TYPE=deeplab``). Use
    ``MODEL.RESNETS.STRIDE_IN_1X1=False`` with these weights.

    Args:
        state_dict: ``torchvision.models.resnetXX().state_dict()`` or an MMCV ImageNet
            checkpoint (or a dict holding either under ``"state_dict"``).
        target_keys: keys of the model to load into; BN ``num_batches_tracked`` buffers are
            kept only if listed there (Detectron2's FrozenBN has none).
        prefix: prepended to every Detectron2 ResNet key: ``backbone.bottom_up.``
            (``BACKBONE_PREFIX``, ResNet-FPN of instance/panoptic K-Net) or ``backbone.``
            (``SEMANTIC_BACKBONE_PREFIX``, the plain ResNet of semantic K-Net).

    Returns:
        {prefix + Detectron2 key: tensor}, tensors unchanged.
    """
    sd, _ = _unwrap_state_dict(state_dict)
    targets = set(target_keys) if target_keys is not None else None
    out, _ = _convert_resnet(
        sd, prefix, targets, "ImageNet ResNet state dict", ignore_prefixes=("fc.",)
    )
    return out


# ------------------------------------------------------------------------------- K-Net heads
def _stage_renames(
    num_cls_fcs: int, num_mask_fcs: int, with_cls: bool = True
) -> List[Tuple[str, str]]:
    """(official suffix, our suffix) pairs of one update stage (``KernelUpdateHead``).

    Instance/panoptic stages (``roi_head.mask_head.{s}``) have 44 tensors with one cls_fc;
    semantic stages (``decode_head.kernel_update_head.{s}``) have no class branch
    (``num_cls_fcs=0``, ``with_cls=False``): 39 tensors.
    """
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
    same = ["attention_norm", "ffn_norm", "fc_mask"] + (["fc_cls"] if with_cls else [])
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


# ---------------------------------------------------------------- semantic (MMSeg) K-Net heads
SEM_GENERATE_PREFIX = "decode_head.kernel_generate_head."
SEM_STAGE_PREFIX = "decode_head.kernel_update_head."
SEM_AUX_PREFIX = "auxiliary_head."
OUR_SEM_CONV_SEG_PREFIX = "kernel_head.conv_seg."
OUR_AUX_PREFIX = "auxiliary_head."

# Hyper-parameters the weights cannot tell (pool sizes, dilations): those of every MMSeg /
# official K-Net ADE20K config. The module counts are checked against the keys.
SEM_POOL_SCALES = (1, 2, 3, 6)
SEM_ASPP_DILATIONS = (1, 12, 24, 36)
SEM_UPER_NUM_INPUTS = 4  # res2-res5
SEM_D8_DILATIONS = (2, 4)  # res4, res5 of the FCN/PSP/ASPP models (ResNetV1c-50-D8)


@dataclass(frozen=True)
class SemanticDecodeHead:
    """An MMSeg decode head used as the kernel-generating head, and its port here."""

    name: str  # MMSeg-style short name: "upernet", "fcn", "psp", "aspp"
    pixel_decoder: str  # MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    in_features: Tuple[str, ...]  # MODEL.SEM_SEG_HEAD.IN_FEATURES
    dilated: bool  # trained on the dilated R50-D8 (res4/res5 at stride 8)
    signature: Tuple[str, ...]  # top-level sub-modules that identify the head (any of them)


SEMANTIC_DECODE_HEADS: Dict[str, SemanticDecodeHead] = {
    h.name: h
    for h in (  # checked in this order: UPerNet also has psp_modules
        SemanticDecodeHead(
            "upernet",
            "KNetUPerHead",
            ("res2", "res3", "res4", "res5"),
            False,
            ("fpn_bottleneck", "lateral_convs", "fpn_convs"),
        ),
        SemanticDecodeHead("aspp", "KNetASPPHead", ("res5",), True, ("aspp_modules", "image_pool")),
        SemanticDecodeHead("psp", "KNetPSPHead", ("res5",), True, ("psp_modules",)),
        SemanticDecodeHead("fcn", "KNetFCNHead", ("res5",), True, ("convs", "conv_cat")),
    )
}


def _bn_conv_module_renames(
    official: str, ours: str
) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(required, optional) pairs of an MMCV ``ConvModule`` with BN and no conv bias."""
    required = [(f"{official}.conv.weight", f"{ours}.weight")]
    required += [(f"{official}.bn.{p}", f"{ours}.norm.{p}") for p in BN_PARAMS]
    optional = [(f"{official}.bn.{BN_BUFFER_OPTIONAL}", f"{ours}.norm.{BN_BUFFER_OPTIONAL}")]
    return required, optional


def _decode_head_conv_modules(head: str, fcn_num_convs: int, fcn_concat_input: bool) -> List[str]:
    """Names of the ConvModules of an MMSeg decode head (without ``conv_seg``)."""
    psp = [f"psp_modules.{i}.1" for i in range(len(SEM_POOL_SCALES))]  # (pool, ConvModule)
    if head == "upernet":
        levels = range(SEM_UPER_NUM_INPUTS - 1)  # the last level goes through the PPM
        return (
            psp
            + ["bottleneck"]
            + [f"lateral_convs.{i}" for i in levels]
            + [f"fpn_convs.{i}" for i in levels]
            + ["fpn_bottleneck"]
        )
    if head == "psp":
        return psp + ["bottleneck"]
    if head == "aspp":
        aspp = [f"aspp_modules.{i}" for i in range(len(SEM_ASPP_DILATIONS))]
        return ["image_pool.1"] + aspp + ["bottleneck"]
    if head == "fcn":
        return [f"convs.{i}" for i in range(fcn_num_convs)] + (
            ["conv_cat"] if fcn_concat_input else []
        )
    raise ValueError(f"unknown decode head {head!r}")


def _count_indexed(keys: Iterable[str], prefix: str) -> int:
    """1 + the largest i of keys ``{prefix}{i}.*`` (0 if there is none)."""
    idx = [int(m.group(1)) for k in keys if (m := re.match(rf"^{re.escape(prefix)}(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def _top_modules(keys: Iterable[str]) -> Set[str]:
    return {k.split(".")[0] for k in keys}


def _detect_decode_head(generate_keys: Sequence[str]) -> str:
    """MMSeg decode head type from the keys under ``decode_head.kernel_generate_head.``."""
    modules = _top_modules(generate_keys)
    for head in SEMANTIC_DECODE_HEADS.values():
        if modules & set(head.signature):
            return head.name
    raise UnsupportedCheckpointError(
        "Unsupported kernel-generating decode head: sub-modules "
        f"{sorted(modules) or 'none'} under {SEM_GENERATE_PREFIX!r}. Supported: UPerNet, FCN, "
        "PSPNet and ASPP (DeepLabV3) heads as in the MMSeg K-Net configs."
    )


# ---------------------------------------------------------------------------- architecture
@dataclass
class OfficialKNetInfo:
    """Architecture of an official K-Net checkpoint, read from its keys and shapes.

    ``head_type`` is empty for instance/panoptic (MMDet) checkpoints and names the MMSeg decode
    head ("upernet", "fcn", "psp", "aspp") of semantic ones; the fields after it are filled
    for semantic checkpoints only.
    """

    depth: int
    deform_layers: Tuple[int, ...]  # torchvision layer indices (1-4) with DCNv1 3x3 convs
    num_stages: int
    num_classes: int
    num_proposals: int
    channels: int
    num_cls_fcs: int
    num_mask_fcs: int
    classes: Tuple[str, ...] = field(default_factory=tuple)  # meta["CLASSES"], if stored
    head_type: str = ""
    deep_stem: bool = False  # ResNetV1c
    updator_channels: int = 0  # KernelUpdator width (256 also for the 512-wide heads)
    ffn_channels: int = 0
    fcn_num_convs: int = 0
    fcn_concat_input: bool = False
    aux_in_channels: int = 0  # 0: no auxiliary head
    aux_in_feature: str = ""  # backbone stage with aux_in_channels outputs, e.g. "res4"
    aux_channels: int = 0
    aux_num_convs: int = 0

    @property
    def is_semantic(self) -> bool:
        return bool(self.head_type)

    def summary(self) -> str:
        """One line describing the architecture."""
        if not self.is_semantic:
            dcn = f" with DCN in layers {self.deform_layers}" if self.deform_layers else ""
            return (
                f"ResNet-{self.depth}{dcn}, {self.num_stages} stages, {self.num_classes} classes, "
                f"{self.num_proposals} proposals, {self.channels} channels"
            )
        head = SEMANTIC_DECODE_HEADS[self.head_type]
        backbone = f"ResNet{'V1c' if self.deep_stem else ''}-{self.depth}"
        backbone += "-D8" if head.dilated else ""
        aux = (
            f"auxiliary FCN head {self.aux_in_channels} -> {self.aux_channels} on "
            f"{self.aux_in_feature}"
            if self.aux_in_channels
            else "no auxiliary head"
        )
        return (
            f"semantic, {backbone}, {self.head_type} decode head ({head.pixel_decoder}), "
            f"{self.num_stages} stages, {self.num_classes} classes, {self.channels} channels "
            f"(kernel updator {self.updator_channels}), {aux}"
        )

    def detectron2_options(self) -> List[str]:
        """Config overrides (``KEY VALUE`` list) that build the matching model.

        For semantic checkpoints the backbone dilations (R50-D8 for FCN/PSP/ASPP, none for
        UPerNet), pool scales (1, 2, 3, 6) and ASPP dilations (1, 12, 24, 36) are those of the
        MMSeg K-Net configs: the weights do not store them. The decode and auxiliary heads use
        BN (``SyncBN`` as in training), which gives the checkpoint's BN keys.
        """
        if self.is_semantic:
            return self._semantic_options()
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

    def _semantic_options(self) -> List[str]:
        head = SEMANTIC_DECODE_HEADS[self.head_type]
        res4_dil, res5_dil = SEM_D8_DILATIONS if head.dilated else (1, 1)
        out_features = set(head.in_features)
        if self.aux_in_channels:
            out_features.add(self.aux_in_feature)
        opts = [
            "MODEL.BACKBONE.NAME", "build_knet_resnet_backbone",
            "MODEL.RESNETS.DEPTH", str(self.depth),
            "MODEL.RESNETS.STEM_TYPE", "deeplab" if self.deep_stem else "basic",
            "MODEL.RESNETS.STRIDE_IN_1X1", "False",
            "MODEL.RESNETS.RES4_DILATION", str(res4_dil),
            "MODEL.RESNETS.RES5_DILATION", str(res5_dil),
            "MODEL.RESNETS.CONTRACT_DILATION", "True",
            "MODEL.RESNETS.OUT_FEATURES", str(sorted(out_features)),
            "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", head.pixel_decoder,
            "MODEL.SEM_SEG_HEAD.IN_FEATURES", str(list(head.in_features)),
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", str(self.channels),
            "MODEL.SEM_SEG_HEAD.NORM", "SyncBN",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(self.num_classes),
            "MODEL.KNET.KERNEL_HEAD_NAME", "KNetSemanticKernelHead",
            "MODEL.KNET.NUM_STAGES", str(self.num_stages),
            "MODEL.KNET.STAGE_LOSS_WEIGHTS", str([1.0] * self.num_stages),
            "MODEL.KNET.HIDDEN_DIM", str(self.channels),
            "MODEL.KNET.UPDATOR_DIM", str(self.updator_channels),
            "MODEL.KNET.DIM_FEEDFORWARD", str(self.ffn_channels),
            "MODEL.KNET.NUM_MASK_FCS", str(self.num_mask_fcs),
        ]  # fmt: skip
        if self.head_type in ("upernet", "psp"):
            opts += ["MODEL.KNET.DECODE_HEAD.POOL_SCALES", str(list(SEM_POOL_SCALES))]
        if self.head_type == "aspp":
            opts += ["MODEL.KNET.DECODE_HEAD.DILATIONS", str(list(SEM_ASPP_DILATIONS))]
        if self.head_type == "fcn":
            opts += ["MODEL.KNET.DECODE_HEAD.NUM_CONVS", str(self.fcn_num_convs)]
            opts += ["MODEL.KNET.DECODE_HEAD.CONCAT_INPUT", str(self.fcn_concat_input)]
        if self.aux_in_channels:
            opts += [
                "MODEL.KNET.AUX_HEAD.LOSS_WEIGHT", "0.4",
                "MODEL.KNET.AUX_HEAD.IN_FEATURE", self.aux_in_feature,
                "MODEL.KNET.AUX_HEAD.CHANNELS", str(self.aux_channels),
                "MODEL.KNET.AUX_HEAD.NUM_CONVS", str(self.aux_num_convs),
            ]  # fmt: skip
        else:
            opts += ["MODEL.KNET.AUX_HEAD.LOSS_WEIGHT", "0.0"]  # 0: the model has no aux head
        return opts


def _is_semantic(keys: Iterable[str]) -> bool:
    return any(k.startswith(("decode_head.", SEM_AUX_PREFIX)) for k in keys)


def _check_unsupported(keys: Sequence[str], semantic: bool = False) -> None:
    """Raise UnsupportedCheckpointError for official variants that have no port here."""
    swin = [k for k in keys if k.startswith(("backbone.patch_embed.", "backbone.stages."))]
    if swin:
        raise UnsupportedCheckpointError(
            "Swin Transformer backbones (e.g. knet_s3_swin-l_fpn_ms-3x_16x2_coco-panoptic) are "
            f"not supported yet; found Swin keys such as {swin[0]!r}. Only ResNet K-Net "
            "checkpoints can be converted (instance/panoptic: ResNet-50/101, optionally with "
            "DCN in res3-res5; semantic: ResNet(V1c) with an UPerNet/FCN/PSP/ASPP head)."
        )
    deep_stem = [k for k in keys if k.startswith("backbone.stem.")]
    if deep_stem and not semantic:
        raise UnsupportedCheckpointError(
            "ResNetV1c deep-stem backbones are supported for semantic K-Net only; found "
            f"{deep_stem[0]!r} in an instance/panoptic checkpoint."
        )


def _count_fcs(state_dict: Mapping[str, torch.Tensor], stage_prefix: str, branch: str) -> int:
    idx = [
        int(m.group(1))
        for k in state_dict
        if (m := re.match(rf"^{re.escape(stage_prefix)}{branch}\.(\d+)\.weight$", k))
        and int(m.group(1)) % 3 == 0
    ]
    return max(idx) // 3 + 1 if idx else 0


def _detect_stages(keys: Iterable[str], prefix: str = OFFICIAL_STAGE_PREFIX) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    stages = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not stages:
        return 0
    if stages != set(range(max(stages) + 1)):
        raise CheckpointKeyError(f"Update-head stages are not contiguous: {sorted(stages)}")
    return max(stages) + 1


def _shape_getter(sd: Mapping[str, torch.Tensor], what: str):
    def shape(key: str) -> Tuple[int, ...]:
        if key not in sd:
            raise CheckpointKeyError(f"Cannot convert {what}: missing {key!r}")
        return tuple(sd[key].shape)

    return shape


def describe_official_knet_state_dict(checkpoint: Mapping[str, Any]) -> OfficialKNetInfo:
    """Read the architecture of an official K-Net or MMSeg K-Net checkpoint.

    Instance/panoptic: depth, DCN, stages, classes, proposals, width. Semantic (any
    ``decode_head.*`` / ``auxiliary_head.*`` key): depth and stem, decode head type, stages,
    classes, widths of the head, kernel updator and FFN, and the auxiliary head.
    """
    sd, meta = _unwrap_state_dict(checkpoint)
    if _is_semantic(sd):
        return _describe_semantic(sd, meta)
    _check_unsupported(list(sd))
    bb_keys = [k[len("backbone.") :] for k in sd if k.startswith("backbone.")]
    layout = detect_resnet_layout(bb_keys)
    num_stages = _detect_stages(sd)
    if num_stages == 0:
        raise CheckpointKeyError(
            "No update-head keys (roi_head.mask_head.{s}.*) found: not a K-Net checkpoint?"
        )
    shape = _shape_getter(sd, "official K-Net checkpoint")
    num_proposals, channels = shape("rpn_head.init_kernels.weight")[:2]
    num_classes = shape("rpn_head.conv_seg.weight")[0]
    stage0 = f"{OFFICIAL_STAGE_PREFIX}0."
    _check_in_proj(shape(stage0 + "attention.attn.in_proj_weight"), channels, stage0)
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


def _check_in_proj(in_proj: Tuple[int, ...], channels: int, stage0: str) -> None:
    if in_proj != (3 * channels, channels):
        raise CheckpointKeyError(
            f"{stage0}attention.attn.in_proj_weight has shape {in_proj}; expected stacked q|k|v "
            f"of shape {(3 * channels, channels)}"
        )


def _describe_semantic(sd: Mapping[str, torch.Tensor], meta: Mapping) -> OfficialKNetInfo:
    _check_unsupported(list(sd), semantic=True)
    layout = detect_resnet_layout(k[len("backbone.") :] for k in sd if k.startswith("backbone."))
    generate_keys = [k[len(SEM_GENERATE_PREFIX) :] for k in sd if k.startswith(SEM_GENERATE_PREFIX)]
    if not generate_keys:
        raise CheckpointKeyError(
            f"No kernel-generating head keys ({SEM_GENERATE_PREFIX}*) found: not a semantic K-Net "
            "checkpoint? (plain MMSeg decode heads are not supported)"
        )
    head_type = _detect_decode_head(generate_keys)
    num_stages = _detect_stages(sd, SEM_STAGE_PREFIX)
    if num_stages == 0:
        raise CheckpointKeyError(
            f"No update-head keys ({SEM_STAGE_PREFIX}{{s}}.*) found: not a K-Net checkpoint?"
        )
    what = f"semantic K-Net checkpoint ({head_type} decode head)"
    shape = _shape_getter(sd, what)
    num_classes, channels = shape(SEM_GENERATE_PREFIX + "conv_seg.weight")[:2]
    stage0 = f"{SEM_STAGE_PREFIX}0."
    _check_in_proj(shape(stage0 + "attention.attn.in_proj_weight"), channels, stage0)

    aux_keys = [k[len(SEM_AUX_PREFIX) :] for k in sd if k.startswith(SEM_AUX_PREFIX)]
    aux_in = aux_channels = aux_num_convs = 0
    aux_in_feature = ""
    if aux_keys:
        aux_num_convs = _count_indexed(aux_keys, "convs.")
        aux_channels, aux_in = shape(SEM_AUX_PREFIX + "convs.0.conv.weight")[:2]
        last_conv = 3 if layout.bottleneck else 2
        widths = {
            shape(f"backbone.layer{n}.0.conv{last_conv}.weight")[0]: f"res{n + 1}"
            for n in range(1, 5)
        }
        if aux_in not in widths:
            raise UnsupportedCheckpointError(
                f"The auxiliary head reads {aux_in} channels, which is no backbone stage "
                f"output width {sorted(widths)}"
            )
        aux_in_feature = widths[aux_in]
        aux_classes = shape(SEM_AUX_PREFIX + "conv_seg.weight")[0]
        if aux_classes != num_classes:
            raise CheckpointKeyError(
                f"The auxiliary head classifies {aux_classes} classes but the decode head "
                f"{num_classes}"
            )
    return OfficialKNetInfo(
        depth=layout.depth,
        deform_layers=layout.deform_layers,
        num_stages=num_stages,
        num_classes=num_classes,
        num_proposals=num_classes,  # one kernel per class
        channels=channels,
        num_cls_fcs=0,
        num_mask_fcs=_count_fcs(sd, stage0, "mask_fcs"),
        classes=tuple(meta.get("CLASSES") or ()),
        head_type=head_type,
        deep_stem=layout.deep_stem,
        updator_channels=shape(stage0 + "kernel_update_conv.dynamic_layer.weight")[1],
        ffn_channels=shape(stage0 + "ffn.layers.0.0.weight")[0],
        fcn_num_convs=_count_indexed(generate_keys, "convs.") if head_type == "fcn" else 0,
        fcn_concat_input=head_type == "fcn" and "conv_cat" in _top_modules(generate_keys),
        aux_in_channels=aux_in,
        aux_in_feature=aux_in_feature,
        aux_channels=aux_channels,
        aux_num_convs=aux_num_convs,
    )


def _semantic_head_renames(
    info: OfficialKNetInfo,
) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(required, optional) (official key, our key) pairs of the semantic heads.

    Optional pairs are the BN ``num_batches_tracked`` buffers.
    """
    required: List[Tuple[str, str]] = []
    optional: List[Tuple[str, str]] = []

    def add(pairs: Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]) -> None:
        required.extend(pairs[0])
        optional.extend(pairs[1])

    modules = _decode_head_conv_modules(info.head_type, info.fcn_num_convs, info.fcn_concat_input)
    for name in modules:
        add(_bn_conv_module_renames(SEM_GENERATE_PREFIX + name, OUR_DECODER_PREFIX + name))
    for p in ("weight", "bias"):
        required.append((f"{SEM_GENERATE_PREFIX}conv_seg.{p}", f"{OUR_SEM_CONV_SEG_PREFIX}{p}"))
    for s in range(info.num_stages):
        required += [
            (f"{SEM_STAGE_PREFIX}{s}.{a}", f"{OUR_STAGE_PREFIX}{s}.{b}")
            for a, b in _stage_renames(0, info.num_mask_fcs, with_cls=False)
        ]
    if info.aux_in_channels:
        for i in range(info.aux_num_convs):
            name = f"convs.{i}"
            add(_bn_conv_module_renames(SEM_AUX_PREFIX + name, OUR_AUX_PREFIX + name))
        for p in ("weight", "bias"):
            required.append((f"{SEM_AUX_PREFIX}conv_seg.{p}", f"{OUR_AUX_PREFIX}conv_seg.{p}"))
    return required, optional


# ------------------------------------------------------------------------------- conversion
def convert_official_knet_state_dict(
    checkpoint: Mapping[str, Any], target_keys: Optional[Iterable[str]] = None
) -> Dict[str, torch.Tensor]:
    """Convert an official K-Net checkpoint (MMDet COCO or MMSeg ADE20K) to this project's names.

    Instance/panoptic (MMDet): ResNet-50/101 (depth read from the layer3 block count; DCNv1 3x3
    convs map to Detectron2's ``conv2_offset``) with any number of update stages (read from the
    ``roi_head.mask_head.{s}`` keys). Semantic (MMSeg, detected from ``decode_head.*``): a
    ResNet(V1c) backbone under ``backbone.*`` (no ``bottom_up``: there is no FPN), an UPerNet /
    FCN / PSPNet / ASPP decode head (type read from its keys) under ``pixel_decoder.*`` with its
    classifier as ``kernel_head.conv_seg.*``, ``kernel_head.stages.{s}.*`` and the auxiliary
    FCN head as ``auxiliary_head.*``. Swin checkpoints raise :class:`UnsupportedCheckpointError`.

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
        UnsupportedCheckpointError: Swin backbones, deep-stem instance/panoptic checkpoints,
            decode heads other than UPerNet/FCN/PSPNet/ASPP.
    """
    sd, _ = _unwrap_state_dict(checkpoint)
    info = describe_official_knet_state_dict(sd)
    targets = set(target_keys) if target_keys is not None else None

    if info.is_semantic:
        required, optional = _semantic_head_renames(info)
        out_backbone_prefix = SEMANTIC_BACKBONE_PREFIX
        what = f"semantic K-Net checkpoint (detected {info.summary()})"
    else:
        required = _neck_renames() + _rpn_renames()
        for s in range(info.num_stages):
            required += [
                (f"{OFFICIAL_STAGE_PREFIX}{s}.{a}", f"{OUR_STAGE_PREFIX}{s}.{b}")
                for a, b in _stage_renames(info.num_cls_fcs, info.num_mask_fcs)
            ]
        optional = []
        out_backbone_prefix = BACKBONE_PREFIX
        what = (
            f"official K-Net checkpoint (detected ResNet-{info.depth}, {info.num_stages} stages, "
            f"{info.num_classes} classes)"
        )

    bb = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    required_bb, optional_bb = detect_resnet_layout(bb).expected_keys()
    head_keys = {k for k in sd if not k.startswith("backbone.")}
    known_head_keys = {old for old, _ in required} | {old for old, _ in optional}
    unknown = {f"backbone.{k}" for k in set(bb) - required_bb - optional_bb}
    unknown |= head_keys - known_head_keys
    missing = {f"backbone.{k}" for k in required_bb - set(bb)}
    missing |= {old for old, _ in required} - head_keys
    _raise_on_key_problems(unknown, missing, what)

    out, _ = _convert_resnet(bb, out_backbone_prefix, targets, f"{what} backbone")
    for old, new in required:
        out[new] = sd[old]
    for old, new in optional:
        if old in sd and _keep_buffer(new, targets):
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
