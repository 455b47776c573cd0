"""A ``MODEL.WEIGHTS`` file that is missing or cannot be downloaded: say where it comes from.

Importing ``knet`` calls :func:`install_weights_check`, which makes Detectron2's
``DetectionCheckpointer.load`` (used by ``DefaultTrainer``, ``DefaultPredictor``, the demo and
``train_net.py --eval-only``) check a K-Net model's weights file first. A local file that does
not exist, or a URL (``https://``, ``detectron2://``) that cannot be fetched, raises
:class:`WeightsNotFoundError` whose message names, for the files of the README's tables (the
converted ImageNet backbones and the released K-Net checkpoints), the URL to download and the
one command that converts it; for any other file, the two converters.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer

from .model_zoo import MODEL_ZOO, PRETRAINED_BACKBONES, PretrainedBackbone

__all__ = ["WeightsNotFoundError", "install_weights_check", "weights_help"]

_PACKAGE = __name__.split(".")[0]
_REPO = Path(__file__).resolve().parents[3]
# Detectron2's own copies of the torchvision ImageNet ResNets (the COCO R-50 configs use them)
_D2_IMAGENET = {
    "detectron2://ImageNetPretrained/torchvision/R-50.pkl": "R-50",
    "detectron2://ImageNetPretrained/torchvision/R-101.pkl": "R-101",
}


class WeightsNotFoundError(FileNotFoundError):
    """``MODEL.WEIGHTS`` names a file that does not exist or cannot be downloaded."""


def _tool(name: str) -> str:
    path = _REPO / "tools" / name
    if not path.is_file():
        return f"tools/{name}"
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


def _file_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _backbone_steps(entry: PretrainedBackbone, target: str) -> str:
    return (
        f"download {entry.url} and convert it with\n"
        f"    python {_tool('convert_pretrained_backbone.py')} {_file_name(entry.url)} {target}\n"
        "(README.md, 'ImageNet weights for training')"
    )


def weights_help(path: str) -> str:
    """Where the weights file ``path`` comes from and the one command that makes it."""
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


def _is_knet_model(model: object) -> bool:
    model = getattr(model, "module", model)
    return type(model).__module__.startswith(_PACKAGE + ".")


def check_weights_file(checkpointer: DetectionCheckpointer, path: str) -> None:
    """Raise :class:`WeightsNotFoundError` if ``path`` is neither a file nor downloadable."""
    if os.path.isfile(path):
        return
    save_dir = getattr(checkpointer, "save_dir", "")
    if save_dir and os.path.dirname(os.path.abspath(path)) == os.path.abspath(save_dir):
        raise WeightsNotFoundError(f"Checkpoint not found: {path}")  # written by training
    tail = " Or set MODEL.WEIGHTS to another file, or to '' to start from random weights."
    if "://" in path:
        try:
            local = checkpointer.path_manager.get_local_path(path)
        except Exception as e:  # network and HTTP errors of every kind
            raise WeightsNotFoundError(
                f"MODEL.WEIGHTS {path} cannot be downloaded ({type(e).__name__}: {e}). "
                + weights_help(path)
                + tail
            ) from e
        if os.path.isfile(local):
            return
    raise WeightsNotFoundError(
        f"MODEL.WEIGHTS file not found: {path} (working directory {os.getcwd()}). "
        + weights_help(path)
        + tail
    )


_load_detectron2 = DetectionCheckpointer.load


@functools.wraps(_load_detectron2)
def _load(self: DetectionCheckpointer, path: str, *args, **kwargs):
    if path and _is_knet_model(self.model):
        check_weights_file(self, path)
    return _load_detectron2(self, path, *args, **kwargs)


def install_weights_check() -> None:
    """Make ``DetectionCheckpointer.load`` check a K-Net model's weights file (module doc)."""
    DetectionCheckpointer.load = _load
