"""Conversion of official K-Net / MMSeg checkpoints and ImageNet backbones to this project.

Official instance/panoptic checkpoints (``ZwwWayne/K-Net``, MMDetection 2.x) hold::

    backbone.*                 ResNet (torchvision names, DCN offsets ``conv2.conv_offset``)
                               or MMDet Swin (``patch_embed.projection``, ``stages.i.blocks.j``)
    neck.*                     MMDet FPN
    rpn_head.*                 initial kernel head and its localization FPN
    roi_head.mask_head.{s}.*   one kernel update stage each

Official Video K-Net checkpoints (``lxtGH/Video-K-Net``) add ``embed_fcs.*``, ``fc_embed.*``,
``track_head.*`` (the association embedding) and ``roi_head.mask_head.{s}.attention_previous*`` /
``link_ffn*`` (kernel linking, used in the last stage only; the other stages' copies are dropped);
semantic ones (MMSeg, ADE20K) hold ``backbone.*`` (ResNetV1c or Swin),
``decode_head.kernel_generate_head.*`` (UPerNet / FCN / PSPNet / ASPP),
``decode_head.kernel_update_head.{s}.*`` and ``auxiliary_head.*``. The architecture is read from
the keys (:func:`describe_official_knet_state_dict`), the names are rewritten by the rule tables
of :mod:`knet.conversion.rules` and checked, key by key and shape by shape, against the model a
config builds.
"""

import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint.checkpointer import RESNET_DEPTHS, SWIN_NAMES
from ..checkpoint.safe_load import UnsafeCheckpointError, load_weights_file
from .rules import (
    KNET_MMDET,
    KNET_MMSEG,
    KNET_TRACK_MMDET,
    RESNET,
    SWIN_MICROSOFT,
    SWIN_MMDET,
    VIDEO_KNET_MMDET,
    CheckpointKeyError,
    Rule,
    Section,
    check_against_model,
    rename_state_dict,
)

# Sub-modules that identify an MMSeg decode head (checked in this order: UPerNet has a PPM too).
DECODE_HEAD_SIGNATURES = (
    ("upernet", ("fpn_bottleneck", "lateral_convs", "fpn_convs")),
    ("aspp", ("aspp_modules", "image_pool")),
    ("psp", ("psp_modules",)),
    ("fcn", ("convs", "conv_cat")),
)
COCO_TASKS = {133: "panoptic", 80: "instance"}
VIDEO_TASK = "video panoptic"
VIDEO_INSTANCE_TASK = "video instance"
# the modules of VideoKNet / VideoKNetClip that image K-Net lacks
VIDEO_HEADS = r"^(kernel_link|association_head|clip_head)\."
# Model keys ImageNet weights do not provide: zero-initialised DCN offsets, Swin output norms.
NOT_IN_IMAGENET_WEIGHTS = r"(\.conv2_offset\.|^norm\d\.)"


class UnsupportedCheckpointError(ValueError):
    """The checkpoint belongs to a model variant this project does not implement."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Architecture of a checkpoint, read from its keys and shapes."""

    task: str  # "panoptic" | "instance" | "semantic" | "video panoptic" | "video instance" | ""
    backbone: str  # "R-50", "R-101-DCN", "R-50-V1c", "Swin-T", "Swin-L", ...
    decode_head: str = ""  # semantic: "upernet" | "fcn" | "psp" | "aspp"
    channels: int = 0  # kernel width
    num_classes: int = 0
    num_stages: int = 0
    classes: tuple[str, ...] = field(default_factory=tuple)  # meta["CLASSES"], if stored

    @property
    def architecture(self) -> tuple[str, str, str, int]:
        """What :func:`knet.checkpoint.model_zoo.find_model_zoo_entry` matches on."""
        return (self.task, self.backbone, self.decode_head, self.channels)

    def summary(self) -> str:
        head = f" + {self.decode_head} decode head" if self.decode_head else ""
        return (
            f"{self.task or 'K-Net'} K-Net, {self.backbone}{head}, {self.num_stages} stages, "
            f"{self.num_classes} classes, {self.channels}-d kernels"
        )


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of a bare state dict or of ``{"state_dict"|"model": sd, "meta": m}``."""
    meta: Mapping = {}
    for name in ("state_dict", "model"):
        if isinstance(checkpoint.get(name), Mapping):
            meta = checkpoint.get("meta") or {}
            checkpoint = checkpoint[name]
            break
    not_tensors = sorted(k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointKeyError(
            "Expected a state dict of tensors (or a checkpoint with a 'state_dict' or 'model' "
            f"entry); these {len(not_tensors)} entries are not tensors: {not_tensors[:10]}"
        )
    return dict(checkpoint), dict(meta)


def _count(keys: Iterable[str], pattern: str) -> int:
    """1 + the largest integer captured by ``pattern`` in the keys (0 if none matches)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def describe_backbone(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, tuple[Rule, ...]]:
    """(name, rename rules) of a ResNet (torchvision / MMDet names, MMCV ResNetV1c deep stem,
    DCNv1 offsets) or Swin (MMDet or Microsoft layout) state dict without prefix. Names:
    "R-101-DCN" (DCN in res3-res5), "R-50-V1c", "Swin-L" (with "-W12" for windows other than 7)."""
    keys = list(state_dict)
    if any(k.startswith("patch_embed.") for k in keys):
        return _describe_swin(state_dict)
    blocks = tuple(_count(keys, rf"^layer{i}\.(\d+)\.") for i in range(1, 5))
    bottleneck = any(re.match(r"^layer\d\.\d+\.conv3\.weight$", k) for k in keys)
    depth = RESNET_DEPTHS.get((blocks, bottleneck))
    if depth is None:
        raise UnsupportedCheckpointError(
            f"Unrecognised backbone: no Swin keys (patch_embed.*), and a ResNet with blocks per "
            f"stage {blocks} ({'bottleneck' if bottleneck else 'basic'} blocks) has no known "
            f"depth; supported: {sorted(set(RESNET_DEPTHS.values()))}"
        )
    name = f"R-{depth}" + ("-V1c" if any(k.startswith("stem.") for k in keys) else "")
    dcn = sorted({int(k[5]) + 1 for k in keys if ".conv2.conv_offset." in k})
    if dcn:
        name += "-DCN" if dcn == [3, 4, 5] else f"-DCN-c{dcn[0]}-c{dcn[-1]}"
    return name, RESNET


def _describe_swin(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, tuple[Rule, ...]]:
    """Swin in the MMDet/MMSeg layout (``patch_embed.projection``, ``stages``, ``w_msa``) or
    Microsoft's (``patch_embed.proj``, ``layers``); the window size is read from the bias
    table, (2 w - 1)^2 rows."""
    mmdet = "patch_embed.projection.weight" in state_dict
    stage, embed_key, attn = ("stages", "projection", "w_msa.") if mmdet else ("layers", "proj", "")
    depths = tuple(_count(state_dict, rf"^{stage}\.{i}\.blocks\.(\d+)\.") for i in range(4))
    embed = state_dict[f"patch_embed.{embed_key}.weight"].shape[0]
    name = SWIN_NAMES.get((embed, depths), f"Swin(embed {embed}, depths {list(depths)})")
    table = state_dict.get(f"{stage}.0.blocks.0.attn.{attn}relative_position_bias_table")
    window = (round(table.shape[0] ** 0.5) + 1) // 2 if table is not None else 7
    suffix = f"-W{window}" if window != 7 else ""
    return name + suffix, SWIN_MMDET if mmdet else SWIN_MICROSOFT


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _decode_head_type(keys: Iterable[str]) -> str:
    modules = {k.split(".")[0] for k in keys}
    for name, signature in DECODE_HEAD_SIGNATURES:
        if modules & set(signature):
            return name
    raise UnsupportedCheckpointError(
        f"Unsupported kernel-generating decode head with sub-modules {sorted(modules)}: "
        "supported are the UPerNet, FCN, PSPNet and ASPP heads of MMSeg's K-Net"
    )


def describe_official_knet_state_dict(checkpoint: Mapping[str, Any]) -> CheckpointInfo:
    """Architecture of an official K-Net (MMDet) or MMSeg K-Net checkpoint. Instance vs panoptic
    is read from the class count (80 / 133 COCO classes); other counts give the task
    "instance/panoptic", which no shipped config matches."""
    sd, meta = unwrap_state_dict(checkpoint)
    backbone, _ = describe_backbone(_strip(sd, "backbone."))
    if any(k.startswith("decode_head.") for k in sd):
        head = _strip(sd, "decode_head.kernel_generate_head.")
        if "conv_seg.weight" not in head:
            raise CheckpointKeyError(
                "Semantic checkpoint without decode_head.kernel_generate_head.conv_seg.weight "
                "(the initial kernels): not a K-Net checkpoint?"
            )
        task, decode_head = "semantic", _decode_head_type(head)
        num_classes, channels = head["conv_seg.weight"].shape[:2]
        stages = _count(sd, r"^decode_head\.kernel_update_head\.(\d+)\.")
    elif "rpn_head.conv_seg.weight" in sd and "rpn_head.init_kernels.weight" in sd:
        num_classes = sd["rpn_head.conv_seg.weight"].shape[0]
        task, decode_head = COCO_TASKS.get(num_classes, "instance/panoptic"), ""
        if any(k.startswith(("embed_fcs.", "track_head.")) for k in sd):
            task = VIDEO_TASK
        elif any(k.startswith("tracker.mask_head.") for k in sd):
            task = VIDEO_INSTANCE_TASK
        channels = sd["rpn_head.init_kernels.weight"].shape[1]
        stages = _count(sd, r"^roi_head\.mask_head\.(\d+)\.")
    else:
        raise CheckpointKeyError(
            "Neither decode_head.* (semantic K-Net) nor rpn_head.conv_seg / init_kernels "
            "(instance/panoptic K-Net) keys found: not a K-Net checkpoint?"
        )
    classes = tuple(meta.get("CLASSES") or ())
    return CheckpointInfo(task, backbone, decode_head, channels, num_classes, stages, classes)


def convert_official_knet_state_dict(
    checkpoint: Mapping[str, Any], model_shapes: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Official K-Net (MMDetection) or MMSeg K-Net checkpoint (the ``state_dict`` or the whole
    file) -> {model key: tensor} for the model of ``model_shapes`` ({key: shape},
    ``model_state_shapes(cfg)``), whose every key must be produced (BN counters optional) with its
    shape. Tensors are the input ones, except Swin's patch-merging weights (channels permuted
    from ``nn.Unfold`` order).

    Raises:
        CheckpointKeyError: unknown keys, missing keys or shape mismatches (all listed).
        UnsupportedCheckpointError: an architecture this project does not implement.
    """
    sd, _ = unwrap_state_dict(checkpoint)
    info = describe_official_knet_state_dict(sd)
    _, backbone_rules = describe_backbone(_strip(sd, "backbone."))
    if info.task == "semantic":
        layout = KNET_MMSEG(backbone_rules)
    elif info.task == VIDEO_TASK:
        layout = VIDEO_KNET_MMDET(backbone_rules, info.num_stages)
    elif info.task == VIDEO_INSTANCE_TASK:
        layout = KNET_TRACK_MMDET(backbone_rules)
    else:
        layout = KNET_MMDET(backbone_rules)
    converted, origin = rename_state_dict(sd, layout)
    # an image checkpoint initialises a video model: its video heads keep their initial values
    may_miss = VIDEO_HEADS if info.task not in (VIDEO_TASK, VIDEO_INSTANCE_TASK) else None
    what = f"the checkpoint ({info.summary()})"
    check_against_model(converted, origin, model_shapes, what, may_miss)
    return converted


def convert_pretrained_backbone(
    checkpoint: Mapping[str, Any], model_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """ImageNet weights -> backbone-body keys (``res2.0.conv1.weight``, ``layers.0.blocks...``).

    Torchvision ResNets, MMCV's ResNetV1c, Microsoft's Swin checkpoints (``{"model": ...}``)
    and MMSeg's converted Swin pretrains are recognised from their keys; the classifier and
    recomputed buffers are dropped. The keys carry no model prefix, so one file serves a
    backbone under an FPN (``backbone.bottom_up.``) and a plain one (``backbone.``):
    :func:`save_detectron2_checkpoint` marks it for Detectron2's suffix matching. With
    ``model_shapes``, the keys are checked against that model's body (which may have DCN offsets
    and Swin output norms the ImageNet weights lack).

    Returns:
        ({body key: tensor}, backbone name such as "Swin-L" or "R-101").
    """
    sd, _ = unwrap_state_dict(checkpoint)
    name, rules = describe_backbone(sd)
    converted, origin = rename_state_dict(sd, (Section("", "", rules),))
    if model_shapes is not None:
        fpn = any(k.startswith("backbone.bottom_up.") for k in model_shapes)
        body = _strip(model_shapes, "backbone.bottom_up." if fpn else "backbone.")
        what = f"the {name} ImageNet weights"
        check_against_model(converted, origin, body, what, NOT_IN_IMAGENET_WEIGHTS)
    return converted, name


def model_state_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the state dict of the model a config builds, without allocating it
    (built on the meta device)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_coco_class_names(classes: Sequence[str]) -> list[str]:
    """Compare a checkpoint's ``meta["CLASSES"]`` (80 things, or 80 things and 53 stuff) with
    Detectron2's COCO contiguous ids: one line per position where the names differ (none when
    the order matches, so that ``fc_cls``/``conv_seg`` rows need no re-indexing)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    things = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
    stuff = [c["name"] for c in COCO_CATEGORIES if not c["isthing"]]
    expected = {len(things): things, len(things + stuff): things + stuff}.get(len(classes))
    if expected is None:
        return [
            f"{len(classes)} classes; Detectron2's COCO has {len(things)} things "
            f"(+{len(stuff)} stuff)"
        ]
    return [
        f"class {i}: checkpoint {a!r} vs Detectron2 {b!r}"
        for i, (a, b) in enumerate(zip(classes, expected))
        if a != b
    ]


def load_checkpoint_file(path: str, allow_pickle: bool = False) -> dict[str, Any]:
    """Read a ``.pth`` / ``.pkl`` checkpoint to convert, restricted to tensors and plain
    containers unless ``allow_pickle`` (for trusted files only: unpickling can run code)."""
    try:
        return load_weights_file(path)
    except UnsafeCheckpointError:
        if not allow_pickle:
            raise
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False)


def save_detectron2_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str,
    author: str,
    matching_heuristics: bool = False,
) -> None:
    """Write ``{"model": ..., "__author__": author, "matching_heuristics": ...}`` with
    ``torch.save`` (``.pth``/``.pt``) or as numpy arrays (``.pkl``, Detectron2's model zoo format),
    for ``DetectionCheckpointer(model).load(path)``; with ``matching_heuristics`` Detectron2
    matches the keys to the model's by suffix (backbone weights without a model prefix)."""
    header = {"__author__": author, "matching_heuristics": matching_heuristics}
    if path.endswith(".pkl"):
        model = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
        with open(path, "wb") as f:
            pickle.dump({"model": model, **header}, f)
    elif path.endswith((".pth", ".pt")):
        model = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        torch.save({"model": model, **header}, path)
    else:
        raise ValueError(f"Output must end with .pth, .pt or .pkl, got {path!r}")
