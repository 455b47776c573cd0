"""Synthetic checkpoints in the layouts of the released K-Net weights (no download needed).

``make_official_state_dict`` writes an official K-Net (MMDetection 2.x) ``state_dict``:
torchvision-style ResNet (optionally with DCNv1 offsets in layer2-4) or MMDet Swin, the MMDet
FPN neck, 36 ``rpn_head`` tensors and 44 tensors per ``roi_head.mask_head`` stage.
``make_mmseg_state_dict`` writes MMSeg's semantic K-Net: ResNetV1c or Swin, an UPerNet / FCN /
PSPNet / ASPP decode head, 39 tensors per update stage and the auxiliary FCN head. Key names and
shapes are written from the published layouts, independently of the project's converter.
"""

from collections.abc import Sequence

import torch

from .swin import mmdet_swin_state_dict

RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# name -> (embed dim, depths, heads) of the Swin variants of the released checkpoints
SWIN_SIZES = {
    "Swin-T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "Swin-L": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
SwinDims = tuple[int, Sequence[int], Sequence[int]]  # embed dim, depths, heads
SEM_CHANNELS = {"upernet": 512, "fcn": 512, "psp": 512, "aspp": 512}
GEN = "decode_head.kernel_generate_head"


class Writer:
    """Fills a state dict with seeded random tensors of given shapes.

    With ``lazy`` every tensor is a stride-0 view of one element: full-size shapes at no
    memory cost, for tests that only look at keys, shapes and tensor identity.
    """

    def __init__(self, seed: int, lazy: bool = False):
        self.sd: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)
        self.lazy = lazy

    def add(self, key: str, *shape: int) -> None:
        assert key not in self.sd, key
        if self.lazy:
            self.sd[key] = torch.randn(1, generator=self.gen).expand(*shape)
        else:
            self.sd[key] = torch.randn(*shape, generator=self.gen)

    def bn(self, prefix: str, n: int) -> None:
        for p in ("weight", "bias", "running_mean"):
            self.add(f"{prefix}.{p}", n)
        self.sd[f"{prefix}.running_var"] = torch.rand(n, generator=self.gen) + 0.5
        self.sd[f"{prefix}.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)

    def conv_bn(self, prefix: str, cout: int, cin: int, k: int) -> None:
        """An MMCV ConvModule with BN: conv.weight (no bias), bn.*."""
        self.add(f"{prefix}.conv.weight", cout, cin, k, k)
        self.bn(f"{prefix}.bn", cout)

    def conv_gn(self, prefix: str, cout: int, cin: int, k: int) -> None:
        """An MMCV ConvModule with GN: conv.weight (no bias), gn.{weight,bias}."""
        self.add(f"{prefix}.conv.weight", cout, cin, k, k)
        self.add(f"{prefix}.gn.weight", cout)
        self.add(f"{prefix}.gn.bias", cout)


def write_resnet(
    w: Writer,
    prefix: str,
    depth: int = 50,
    base_width: int = 64,
    deep_stem: bool = False,
    dcn: bool = False,
) -> list[int]:
    """torchvision / MMDet "pytorch"-style ResNet, or MMCV's ResNetV1c (``deep_stem``); DCNv1
    offsets (``conv2.conv_offset``) on the 3x3 convs of layer2-4. Returns the stage widths."""
    if deep_stem:
        half = base_width // 2
        w.add(f"{prefix}stem.0.weight", half, 3, 3, 3)
        w.bn(f"{prefix}stem.1", half)
        w.add(f"{prefix}stem.3.weight", half, half, 3, 3)
        w.bn(f"{prefix}stem.4", half)
        w.add(f"{prefix}stem.6.weight", base_width, half, 3, 3)
        w.bn(f"{prefix}stem.7", base_width)
    else:
        w.add(f"{prefix}conv1.weight", base_width, 3, 7, 7)
        w.bn(f"{prefix}bn1", base_width)
    bottleneck = depth >= 50
    in_ch, stage_out = base_width, []
    for layer, num_blocks in enumerate(RESNET_BLOCKS[depth], start=1):
        width = base_width * 2 ** (layer - 1)
        out_ch = 4 * width if bottleneck else width
        for i in range(num_blocks):
            p = f"{prefix}layer{layer}.{i}"
            block_in = in_ch if i == 0 else out_ch
            w.add(
                f"{p}.conv1.weight", width, block_in, 1 if bottleneck else 3, 1 if bottleneck else 3
            )
            w.bn(f"{p}.bn1", width)
            w.add(f"{p}.conv2.weight", width, width, 3, 3)
            if dcn and layer > 1:
                w.add(f"{p}.conv2.conv_offset.weight", 18, width, 3, 3)
                w.add(f"{p}.conv2.conv_offset.bias", 18)
            w.bn(f"{p}.bn2", width)
            if bottleneck:
                w.add(f"{p}.conv3.weight", out_ch, width, 1, 1)
                w.bn(f"{p}.bn3", out_ch)
            if i == 0 and block_in != out_ch:
                w.add(f"{p}.downsample.0.weight", out_ch, in_ch, 1, 1)
                w.bn(f"{p}.downsample.1", out_ch)
        in_ch = out_ch
        stage_out.append(out_ch)
    return stage_out


def write_swin(w: Writer, prefix: str, name: str, dims: SwinDims | None = None) -> list[int]:
    """MMDet/MMSeg Swin (``patch_embed.projection``, ``stages``, ``norm0-3``) of the variant
    ``name``, or of ``dims`` = (embed dim, depths, heads): a narrow copy with the same key
    pattern. Returns the stage widths."""
    embed, depths, heads = dims or SWIN_SIZES[name]
    sd = mmdet_swin_state_dict(
        embed, depths, heads, seed=int(w.gen.initial_seed()) + 1, lazy=w.lazy, prefix=prefix
    )
    w.sd.update(sd)
    return [embed * 2**i for i in range(4)]


def write_backbone(
    w: Writer, backbone: str, base_width: int = 64, swin_dims: SwinDims | None = None
) -> list[int]:
    """``backbone.*`` of a released checkpoint: "R-50", "R-101", "R-101-DCN", "R-50-V1c",
    "Swin-T", "Swin-L"."""
    if backbone.startswith("Swin"):
        return write_swin(w, "backbone.", backbone, swin_dims)
    depth = int(backbone.split("-")[1])
    return write_resnet(
        w, "backbone.", depth, base_width, deep_stem="V1c" in backbone, dcn="DCN" in backbone
    )


def write_updator(w: Writer, prefix: str, u: int) -> None:
    """One official ``KernelUpdator`` of width ``u`` (20 tensors)."""
    for name, rows in (
        ("dynamic_layer", 2 * u),
        ("input_layer", 2 * u),
        ("input_gate", u),
        ("update_gate", u),
        ("fc_layer", u),
    ):
        w.add(f"{prefix}.{name}.weight", rows, u)
        w.add(f"{prefix}.{name}.bias", rows)
    for name in ("norm_in", "norm_out", "input_norm_in", "input_norm_out", "fc_norm"):
        w.add(f"{prefix}.{name}.weight", u)
        w.add(f"{prefix}.{name}.bias", u)


def write_attention(w: Writer, attention: str, norm: str, c: int) -> None:
    """One official ``MultiheadAttention`` of width ``c`` and its LayerNorm (6 tensors)."""
    w.add(f"{attention}.attn.in_proj_weight", 3 * c, c)
    w.add(f"{attention}.attn.in_proj_bias", 3 * c)
    w.add(f"{attention}.attn.out_proj.weight", c, c)
    w.add(f"{attention}.attn.out_proj.bias", c)
    w.add(f"{norm}.weight", c)
    w.add(f"{norm}.bias", c)


def write_ffn(w: Writer, ffn: str, norm: str, c: int, hidden: int) -> None:
    """One official two-layer ``FFN`` (c -> hidden -> c) and its LayerNorm (6 tensors)."""
    w.add(f"{ffn}.layers.0.0.weight", hidden, c)
    w.add(f"{ffn}.layers.0.0.bias", hidden)
    w.add(f"{ffn}.layers.1.weight", c, hidden)
    w.add(f"{ffn}.layers.1.bias", c)
    w.add(f"{norm}.weight", c)
    w.add(f"{norm}.bias", c)


def write_update_stage(w: Writer, p: str, c: int, u: int, ffn_channels: int, num_classes: int):
    """One official ``KernelUpdateHead`` (44 tensors; 39 without cls_fcs/fc_cls when
    ``num_classes`` is 0): width ``c``, kernel updator width ``u``."""
    write_attention(w, f"{p}.attention", f"{p}.attention_norm", c)
    write_updator(w, f"{p}.kernel_update_conv", u)
    w.add(f"{p}.feat_transform.conv.weight", c, c, 1, 1)
    w.add(f"{p}.feat_transform.conv.bias", c)
    write_ffn(w, f"{p}.ffn", f"{p}.ffn_norm", c, ffn_channels)
    if num_classes:
        w.add(f"{p}.cls_fcs.0.weight", c, c)
        w.add(f"{p}.cls_fcs.1.weight", c)
        w.add(f"{p}.cls_fcs.1.bias", c)
        w.add(f"{p}.fc_cls.weight", num_classes, c)
        w.add(f"{p}.fc_cls.bias", num_classes)
    w.add(f"{p}.mask_fcs.0.weight", c, c)
    w.add(f"{p}.mask_fcs.1.weight", c)
    w.add(f"{p}.mask_fcs.1.bias", c)
    w.add(f"{p}.fc_mask.weight", c, c)
    w.add(f"{p}.fc_mask.bias", c)


def make_official_state_dict(
    backbone: str = "R-50",
    num_classes: int = 133,
    num_stages: int = 3,
    channels: int = 256,
    ffn_channels: int = 2048,
    num_proposals: int = 100,
    base_width: int = 64,
    swin_dims: SwinDims | None = None,
    seed: int = 0,
    lazy: bool = False,
) -> dict[str, torch.Tensor]:
    """An official instance/panoptic K-Net ``state_dict`` filled with random values.

    With the defaults every shape is the real one (C = 256); smaller ``channels``,
    ``ffn_channels``, ``num_proposals``, ``base_width`` (ResNet) and ``swin_dims`` give a
    small file with the same key pattern.
    """
    w = Writer(seed, lazy)
    stage_out = write_backbone(w, backbone, base_width, swin_dims)
    for i, cin in enumerate(stage_out):  # MMDet FPN neck
        w.add(f"neck.lateral_convs.{i}.conv.weight", channels, cin, 1, 1)
        w.add(f"neck.lateral_convs.{i}.conv.bias", channels)
        w.add(f"neck.fpn_convs.{i}.conv.weight", channels, channels, 3, 3)
        w.add(f"neck.fpn_convs.{i}.conv.bias", channels)
    c = channels
    fpn = "rpn_head.localization_fpn"  # 36 rpn_head tensors
    w.conv_gn(f"{fpn}.convs_all_levels.0.conv0", c, c, 3)
    w.conv_gn(f"{fpn}.convs_all_levels.1.conv0", c, c, 3)
    for j in range(2):
        w.conv_gn(f"{fpn}.convs_all_levels.2.conv{j}", c, c, 3)
    for j in range(3):
        w.conv_gn(f"{fpn}.convs_all_levels.3.conv{j}", c, c, 3)
    w.conv_gn(f"{fpn}.conv_pred", c, c, 1)
    w.conv_gn(f"{fpn}.aux_convs.0", c, c, 1)
    w.add("rpn_head.init_kernels.weight", num_proposals, c, 1, 1)
    w.add("rpn_head.conv_seg.weight", num_classes, c, 1, 1)
    w.add("rpn_head.conv_seg.bias", num_classes)
    w.conv_gn("rpn_head.loc_convs.0", c, c, 1)
    w.conv_gn("rpn_head.seg_convs.0", c, c, 1)
    for s in range(num_stages):
        write_update_stage(w, f"roi_head.mask_head.{s}", c, c, ffn_channels, num_classes)
    return w.sd


def make_video_knet_state_dict(
    num_classes: int = 19,
    num_stages: int = 3,
    channels: int = 256,
    ffn_channels: int = 2048,
    link_ffn_channels: int = 2048,
    seed: int = 0,
    fusion: bool = False,
    link_type: str = "ffn",
    **kwargs,
) -> dict[str, torch.Tensor]:
    """An official Video K-Net (R-50 "ffn" linking) ``state_dict`` with random values: image
    K-Net's keys (:func:`make_official_state_dict` with ``kwargs``), kernel linking in every
    stage, the detector's embedding layers and the track head (47 extra tensors at C = 256);
    with ``fusion``, also kernel fusion in every stage (``update_dynamic_cov``: the ``*_link``
    modules, a KernelUpdator, an attention, two norms and an FFN). ``link_type`` "update" writes
    the tracking link as the Swin configs have it: the ``*_track`` modules and their updator
    ``attention_previous_update_track`` instead of ``attention_previous`` / ``link_ffn``."""
    sd = make_official_state_dict(
        num_classes=num_classes,
        num_stages=num_stages,
        channels=channels,
        ffn_channels=ffn_channels,
        seed=seed,
        **kwargs,
    )
    w = Writer(seed + 1, False)
    c = channels
    for s in range(num_stages):
        p = f"roi_head.mask_head.{s}"
        link = "_track" if link_type == "update" else ""
        for suffix in (link, "_link") if fusion else (link,):
            previous = f"{p}.attention_previous"
            write_attention(w, f"{previous}{suffix}", f"{previous}_norm{suffix}", c)
            ffn = f"{p}.link_ffn"
            write_ffn(w, f"{ffn}{suffix}", f"{ffn}_norm{suffix}", c, link_ffn_channels)
        if fusion:
            write_updator(w, f"{p}.attention_previous_update_link", c)
        if link_type == "update":
            write_updator(w, f"{p}.attention_previous_update_track", c)
    w.add("embed_fcs.0.weight", c, c)
    w.add("embed_fcs.1.weight", c)
    w.add("embed_fcs.1.bias", c)
    w.add("fc_embed.weight", c, c)
    w.add("fc_embed.bias", c)
    for i in range(2):
        w.add(f"track_head.fcs.{i}.weight", c, c)
        w.add(f"track_head.fcs.{i}.bias", c)
    w.add("track_head.fc_embed.weight", c, c)
    w.add("track_head.fc_embed.bias", c)
    return {**sd, **w.sd}


def make_knet_track_state_dict(
    num_classes: int = 40, num_stages: int = 3, clip_stages: int = 2, seed: int = 0, **kwargs
) -> dict[str, torch.Tensor]:
    """An official clip-level Video K-Net for VIS (``KNetTrack``) ``state_dict`` with random
    values: image K-Net's keys (:func:`make_official_state_dict` with ``kwargs``) and the clip
    head's stages ``tracker.mask_head.{s}`` (the image stage layout; the stages from
    ``clip_stages`` on without ``cls_fcs`` / ``fc_cls``: 39 tensors)."""
    sd = make_official_state_dict(
        num_classes=num_classes, num_stages=num_stages, seed=seed, **kwargs
    )
    c = sd["rpn_head.init_kernels.weight"].shape[1]
    ffn_channels = sd["roi_head.mask_head.0.ffn.layers.0.0.weight"].shape[0]
    w = Writer(seed + 2, False)
    for s in range(num_stages):
        classes = num_classes if s < clip_stages else 0
        write_update_stage(w, f"tracker.mask_head.{s}", c, c, ffn_channels, classes)
    return {**sd, **w.sd}


def make_mmseg_state_dict(
    head: str,
    backbone: str = "R-50-V1c",
    num_classes: int = 150,
    num_stages: int = 3,
    channels: int | None = None,
    updator_channels: int = 256,
    ffn_channels: int = 2048,
    base_width: int = 64,
    aux_channels: int | None = 256,
    swin_dims: SwinDims | None = None,
    lazy: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A semantic K-Net ``state_dict`` of an MMSeg ADE20K model.

    Defaults give the real shapes: ResNetV1c-50 (or ``backbone`` "Swin-T"/"Swin-L"), a 512-wide
    decode head (the kernel updator stays 256 wide), 150 classes, 3 stages, auxiliary FCN head
    -> 256 on the third stage output (``aux_channels=None``: no auxiliary head). Tensors are lazy
    (stride-0) unless ``lazy=False``.
    """
    w = Writer(seed, lazy)
    ins = write_backbone(w, backbone, base_width, swin_dims)
    c = channels or SEM_CHANNELS[head]
    if head == "upernet":
        for i in range(4):
            w.conv_bn(f"{GEN}.psp_modules.{i}.1", c, ins[3], 1)
        w.conv_bn(f"{GEN}.bottleneck", c, ins[3] + 4 * c, 3)
        for i in range(3):
            w.conv_bn(f"{GEN}.lateral_convs.{i}", c, ins[i], 1)
        for i in range(3):
            w.conv_bn(f"{GEN}.fpn_convs.{i}", c, c, 3)
        w.conv_bn(f"{GEN}.fpn_bottleneck", c, 4 * c, 3)
    elif head == "fcn":
        w.conv_bn(f"{GEN}.convs.0", c, ins[3], 3)
        w.conv_bn(f"{GEN}.convs.1", c, c, 3)
        w.conv_bn(f"{GEN}.conv_cat", c, ins[3] + c, 3)
    elif head == "psp":
        for i in range(4):
            w.conv_bn(f"{GEN}.psp_modules.{i}.1", c, ins[3], 1)
        w.conv_bn(f"{GEN}.bottleneck", c, ins[3] + 4 * c, 3)
    elif head == "aspp":
        w.conv_bn(f"{GEN}.image_pool.1", c, ins[3], 1)
        for i in range(4):
            w.conv_bn(f"{GEN}.aspp_modules.{i}", c, ins[3], 1 if i == 0 else 3)
        w.conv_bn(f"{GEN}.bottleneck", c, 5 * c, 3)
    w.add(f"{GEN}.conv_seg.weight", num_classes, c, 1, 1)
    w.add(f"{GEN}.conv_seg.bias", num_classes)
    for s in range(num_stages):
        write_update_stage(
            w, f"decode_head.kernel_update_head.{s}", c, updator_channels, ffn_channels, 0
        )
    if aux_channels:
        w.conv_bn("auxiliary_head.convs.0", aux_channels, ins[2], 3)
        w.add("auxiliary_head.conv_seg.weight", num_classes, aux_channels, 1, 1)
        w.add("auxiliary_head.conv_seg.bias", num_classes)
    return w.sd


def make_released_checkpoint(entry, lazy: bool = True) -> dict[str, object]:
    """Full-size synthetic file of a model-zoo row (``knet.checkpoint.model_zoo.ModelZooEntry``):
    ``{"meta": {...}, "state_dict": ...}`` as ``torch.load`` returns the released files."""
    if entry.task == "semantic":
        sd = make_mmseg_state_dict(entry.decode_head, entry.backbone, lazy=lazy)
        return {"meta": {"CLASSES": tuple(f"class{i}" for i in range(150))}, "state_dict": sd}
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    things = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
    stuff = [c["name"] for c in COCO_CATEGORIES if not c["isthing"]]
    classes: tuple[str, ...] = tuple(things + (stuff if entry.task == "panoptic" else []))
    sd = make_official_state_dict(entry.backbone, num_classes=len(classes), lazy=lazy)
    return {"meta": {"CLASSES": classes}, "state_dict": sd}


def tame(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scale every float weight of 2+ dims by 1/sqrt(fan in): N(0, 1) weights written by
    :class:`Writer` would blow activations up through deep networks (and push DCN offsets far
    outside the image); BN statistics and 1-d parameters are kept."""
    return {
        k: v * v[0].numel() ** -0.5 if v.dim() > 1 and v.is_floating_point() else v
        for k, v in state_dict.items()
    }


def head_opts(channels: int, ffn_channels: int, num_proposals: int = 100) -> list[str]:
    """Config overrides for the kernel heads of a narrow official K-Net (MMDet) checkpoint."""
    c = str(channels)
    return [
        "MODEL.FPN.OUT_CHANNELS", c, "MODEL.SEM_SEG_HEAD.CONVS_DIM", c,
        "MODEL.KNET.UPDATOR_DIM", c,
        "MODEL.KNET.DIM_FEEDFORWARD", str(ffn_channels),
        "MODEL.KNET.NUM_PROPOSALS", str(num_proposals),
    ]  # fmt: skip


def resnet_opts(base_width: int) -> list[str]:
    """Config overrides for a ResNet of the given stem / res2 bottleneck width."""
    return [
        "MODEL.RESNETS.STEM_OUT_CHANNELS", str(base_width),
        "MODEL.RESNETS.RES2_OUT_CHANNELS", str(4 * base_width),
        "MODEL.RESNETS.WIDTH_PER_GROUP", str(base_width),
    ]  # fmt: skip


def swin_opts(dims: SwinDims) -> list[str]:
    """Config overrides for a Swin of the given (embed dim, depths, heads)."""
    embed, depths, heads = dims
    return [
        "MODEL.SWIN.EMBED_DIM", str(embed),
        "MODEL.SWIN.DEPTHS", str(list(depths)),
        "MODEL.SWIN.NUM_HEADS", str(list(heads)),
    ]  # fmt: skip
