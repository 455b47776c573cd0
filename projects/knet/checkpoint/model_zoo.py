"""The released K-Net checkpoints, the ImageNet weights the configs start from, and the config
that each one loads into: the one source of README's tables (``python
tools/convert_official_knet.py --markdown`` prints them), of the converters' choice of config,
and of the message naming where a missing ``MODEL.WEIGHTS`` file comes from (``import knet`` does
not load this module; :class:`knet.checkpoint.KNetCheckpointer` imports it for that message).
"""

import os
from dataclasses import dataclass
from pathlib import Path

# <KNET_URL or MMSEG_URL>/<config>/<file>.pth: official K-Net (instance / panoptic, MMDetection
# 2.x) and MMSeg's semantic K-Net files (the official semantic ones were never released)
OPENMMLAB = "https://download.openmmlab.com"
KNET_URL = f"{OPENMMLAB}/mim-example/knet/det/knet"
MMSEG_URL = f"{OPENMMLAB}/mmsegmentation/v0.5/knet"
SWIN_URL = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0"
COCO_PANOPTIC = "configs/coco/panoptic-segmentation"
COCO_INSTANCE = "configs/coco/instance-segmentation"
ADE20K = "configs/ade20k/semantic-segmentation"
_REPO = Path(__file__).resolve().parents[3]
# Detectron2's own copies of the torchvision ImageNet ResNets (the COCO R-50 configs use them)
_D2_IMAGENET = {
    "detectron2://ImageNetPretrained/torchvision/R-50.pkl": "R-50",
    "detectron2://ImageNetPretrained/torchvision/R-101.pkl": "R-101",
}
_HEAD_NAMES = {"fcn": "FCN", "psp": "PSPNet", "aspp": "DeepLabV3", "upernet": "UPerNet"}


@dataclass(frozen=True)
class ModelZooEntry:
    """One released checkpoint; ``architecture`` is what
    :func:`knet.conversion.describe_official_knet_state_dict` reads from its keys."""

    task: str  # "panoptic" | "instance" | "semantic"
    backbone: str  # e.g. "R-50", "R-101-DCN", "R-50-V1c", "Swin-L"
    schedule: str
    metric: str  # "PQ" | "mask AP" | "mIoU"
    result: float  # published (COCO val / ADE20K val single-scale)
    file: str  # file name without ".pth"
    config: str  # relative to the repository root
    decode_head: str = ""  # semantic: "upernet" | "fcn" | "psp" | "aspp"
    channels: int = 256  # kernel width

    @property
    def url(self) -> str:
        base = MMSEG_URL if self.task == "semantic" else KNET_URL
        return f"{base}/{self.folder}/{self.file}.pth"

    @property
    def folder(self) -> str:
        """The file name without its "_<date>_<time>-<hash>" suffix (the config's name)."""
        return self.file.rsplit("_", 2)[0]

    @property
    def architecture(self) -> tuple[str, str, str, int]:
        return (self.task, self.backbone, self.decode_head, self.channels)


@dataclass(frozen=True)
class PretrainedBackbone:
    """ImageNet weights the configs start from: source file, the converted file the configs
    name in ``MODEL.WEIGHTS`` (written by ``tools/convert_pretrained_backbone.py``)."""

    backbone: str
    url: str
    converted: str
    config: str  # a config whose backbone it fits (checked at conversion)


MODEL_ZOO: tuple[ModelZooEntry, ...] = (
    ModelZooEntry("panoptic", "R-50", "1x", "PQ", 44.3,
                  "knet_s3_r50_fpn_1x_coco-panoptic_20211017_151750-395fbcba",
                  f"{COCO_PANOPTIC}/knet_R50_bs16_1x.yaml"),
    ModelZooEntry("panoptic", "R-50", "ms-3x", "PQ", 47.1,
                  "knet_s3_r50_fpn_ms-3x_coco-panoptic_20211017_054613-4375b8be",
                  f"{COCO_PANOPTIC}/knet_R50_bs16_ms3x.yaml"),
    ModelZooEntry("panoptic", "R-101", "ms-3x", "PQ", 48.4,
                  "knet_s3_r101_fpn_ms-3x_coco-panoptic_20211017_054501-9c600b0c",
                  f"{COCO_PANOPTIC}/knet_R101_bs16_ms3x.yaml"),
    ModelZooEntry("panoptic", "R-101-DCN", "ms-3x", "PQ", 49.6,
                  "knet_s3_r101_dcn-c3-c5_fpn_ms-3x_coco-panoptic_20211019_191549-6d13fab7",
                  f"{COCO_PANOPTIC}/knet_R101_DCN_bs16_ms3x.yaml"),
    ModelZooEntry("panoptic", "Swin-L", "ms-3x", "PQ", 54.6,
                  "knet_s3_swin-l_fpn_ms-3x_16x2_coco-panoptic_20211020_062341-62f3bbff",
                  f"{COCO_PANOPTIC}/knet_swin_L_bs32_ms3x.yaml"),
    ModelZooEntry("instance", "R-50", "1x", "mask AP", 34.0,
                  "knet_s3_r50_fpn_1x_coco_20211016_113017-8a8645d4",
                  f"{COCO_INSTANCE}/knet_R50_bs16_1x.yaml"),
    ModelZooEntry("instance", "R-101-DCN", "ms-3x", "mask AP", 40.5,
                  "knet_s3_r101_dcn-c3-c5_fpn_ms-3x_coco_20211017_054515-163a3126",
                  f"{COCO_INSTANCE}/knet_R101_DCN_bs16_ms3x.yaml"),
    ModelZooEntry("semantic", "R-50-V1c", "80k", "mIoU", 43.60,
                  "knet_s3_fcn_r50-d8_8x2_512x512_adamw_80k_ade20k_20220228_043751-abcab920",
                  f"{ADE20K}/knet_s3_fcn_R50_D8_bs16_80k.yaml", "fcn", 512),
    ModelZooEntry("semantic", "R-50-V1c", "80k", "mIoU", 44.18,
                  "knet_s3_pspnet_r50-d8_8x2_512x512_adamw_80k_ade20k_20220228_054634-d2c72240",
                  f"{ADE20K}/knet_s3_pspnet_R50_D8_bs16_80k.yaml", "psp", 512),
    ModelZooEntry("semantic", "R-50-V1c", "80k", "mIoU", 45.06,
                  "knet_s3_deeplabv3_r50-d8_8x2_512x512_adamw_80k_ade20k_20220228_041642-00c8fbeb",
                  f"{ADE20K}/knet_s3_deeplabv3_R50_D8_bs16_80k.yaml", "aspp", 512),
    ModelZooEntry("semantic", "R-50-V1c", "80k", "mIoU", 43.45,
                  "knet_s3_upernet_r50-d8_8x2_512x512_adamw_80k_ade20k_20220304_125657-215753b0",
                  f"{ADE20K}/knet_s3_upernet_R50_bs16_80k.yaml", "upernet", 512),
    ModelZooEntry("semantic", "Swin-T", "80k", "mIoU", 45.84,
                  "knet_s3_upernet_swin-t_8x2_512x512_adamw_80k_ade20k_20220303_133059-7545e1dc",
                  f"{ADE20K}/knet_s3_upernet_swin_T_bs16_80k.yaml", "upernet", 512),
    ModelZooEntry("semantic", "Swin-L", "80k", "mIoU", 52.05,
                  "knet_s3_upernet_swin-l_8x2_512x512_adamw_80k_ade20k_20220303_154559-d8da9a90",
                  f"{ADE20K}/knet_s3_upernet_swin_L_bs16_80k.yaml", "upernet", 512),
    ModelZooEntry("semantic", "Swin-L", "80k, 640x640", "mIoU", 52.21,
                  "knet_s3_upernet_swin-l_8x2_640x640_adamw_80k_ade20k_20220301_220747-8787fc71",
                  f"{ADE20K}/knet_s3_upernet_swin_L_bs16_80k_640x640.yaml", "upernet", 512),
)  # fmt: skip


PRETRAINED_BACKBONES: tuple[PretrainedBackbone, ...] = (
    PretrainedBackbone("R-50", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                       "pretrained/R-50-torchvision.pkl", f"{COCO_PANOPTIC}/knet_R50_bs16_1x.yaml"),
    PretrainedBackbone("R-101", "https://download.pytorch.org/models/resnet101-63fe2227.pth",
                       "pretrained/R-101-torchvision.pkl",
                       f"{COCO_PANOPTIC}/knet_R101_DCN_bs16_ms3x.yaml"),
    PretrainedBackbone("R-50-V1c", f"{OPENMMLAB}/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
                       "pretrained/R-50-V1c.pkl", f"{ADE20K}/knet_s3_upernet_R50_bs16_80k.yaml"),
    PretrainedBackbone("Swin-T", f"{SWIN_URL}/swin_tiny_patch4_window7_224.pth",
                       "pretrained/swin_tiny_patch4_window7_224.pkl",
                       f"{ADE20K}/knet_s3_upernet_swin_T_bs16_80k.yaml"),
    PretrainedBackbone("Swin-L", f"{SWIN_URL}/swin_large_patch4_window7_224_22k.pth",
                       "pretrained/swin_large_patch4_window7_224_22k.pkl",
                       f"{COCO_PANOPTIC}/knet_swin_L_bs32_ms3x.yaml"),
)  # fmt: skip


def find_model_zoo_entry(
    architecture: tuple[str, str, str, int], file_name: str = ""
) -> ModelZooEntry | None:
    """The released checkpoint with this architecture (task, backbone, decode head, kernel
    width); failing that, one with the same task, backbone and head (a narrower or wider
    variant, for which ``--opts`` adapt the config). The file name decides between
    checkpoints of the same architecture (e.g. 1x and ms-3x), else the first is taken."""
    matches = [e for e in MODEL_ZOO if e.architecture == architecture]
    matches = matches or [e for e in MODEL_ZOO if e.architecture[:3] == architecture[:3]]
    for entry in matches:
        if file_name.startswith(entry.folder):
            return entry
    return matches[0] if matches else None


def _link(url: str, text: str = "") -> str:
    return f"[{text or os.path.basename(url)}]({url})"


def markdown_tables() -> tuple[str, str]:
    """README's two tables: (model zoo, ImageNet weights for training)."""
    zoo = [
        "| task | backbone | schedule | published | file | config |",
        "|---|---|---|---|---|---|",
    ]
    for e in MODEL_ZOO:
        head = f" + {_HEAD_NAMES[e.decode_head]}" if e.decode_head else ""
        result = f"{e.result:.{2 if e.metric == 'mIoU' else 1}f}"  # as published
        config = _link(e.config, Path(e.config).stem)
        zoo.append(
            f"| {e.task} | {e.backbone}{head} | {e.schedule} | {e.metric} {result} | "
            f"{_link(e.url)} | {config} |"
        )
    backbones = ["| backbone | source | converted file |", "|---|---|---|"]
    backbones += [
        f"| {b.backbone} | {_link(b.url)} | `{b.converted}` |" for b in PRETRAINED_BACKBONES
    ]
    return "\n".join(zoo), "\n".join(backbones)


def _tool(name: str) -> str:
    path = _REPO / "tools" / name
    if not path.is_file():
        return f"tools/{name}"
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


def _backbone_steps(entry: PretrainedBackbone, target: str) -> str:
    tool = _tool("convert_pretrained_backbone.py")
    return (
        f"download {entry.url} and convert it with\n"
        f"    python {tool} {os.path.basename(entry.url)} {target}\n"
        "(README.md, 'ImageNet weights for training')"
    )


def weights_help(path: str) -> str:
    """Where the weights file ``path`` comes from and the one command that makes it: for the
    files of README's tables the URL to download and the converter's command line; for any
    other file, the two converters."""
    stem = os.path.splitext(os.path.basename(path))[0]
    # a URL's file is converted into a local file, which MODEL.WEIGHTS then names
    target = os.path.join("pretrained", os.path.basename(path)) if "://" in path else path
    then = f", then set MODEL.WEIGHTS {target}" if target != path else ""
    if path in _D2_IMAGENET:
        entry = next(b for b in PRETRAINED_BACKBONES if b.backbone == _D2_IMAGENET[path])
        return (
            f"It is Detectron2's copy of the torchvision {entry.backbone} ImageNet weights. "
            f"Without access to it, {_backbone_steps(entry, entry.converted)}, then set "
            f"MODEL.WEIGHTS {entry.converted}."
        )
    for entry in PRETRAINED_BACKBONES:
        if os.path.basename(entry.converted) == os.path.basename(path):
            steps = _backbone_steps(entry, target)
            return f"It is the {entry.backbone} ImageNet backbone: {steps}{then}."
    for zoo in MODEL_ZOO:
        if stem == zoo.file or (stem and zoo.file.startswith(stem + "_")):
            return (
                f"It is the released K-Net checkpoint {zoo.file} ({zoo.task}, {zoo.backbone}, "
                f"{zoo.schedule}, {zoo.metric} {zoo.result}): download {zoo.url} and convert it "
                f"with\n    python {_tool('convert_official_knet.py')} {zoo.file}.pth {target}\n"
                f"(README.md, 'Model zoo'){then}."
            )
    return (
        "A released K-Net checkpoint or an ImageNet backbone? README.md gives their URLs ('Model "
        "zoo', 'ImageNet weights for training'); convert the download with\n"
        f"    python {_tool('convert_official_knet.py')} FILE.pth {target}    (K-Net checkpoints)\n"
        f"    python {_tool('convert_pretrained_backbone.py')} FILE.pth {target}    (ImageNet "
        f"backbones){then}."
    )
