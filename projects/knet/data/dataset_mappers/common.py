"""Helpers shared by the K-Net dataset mappers: checked file reads and augmentation lists."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = [
    "KNetDatasetMapperBase",
    "read_image_checked",
    "build_augmentations",
    "image_to_tensor",
]

logger = logging.getLogger(__name__)


def read_image_checked(file_name: str, image_format: str | None, what: str) -> np.ndarray:
    """Read an image or label PNG like ``detectron2.data.detection_utils.read_image``, but fail
    loudly on any decode error.

    Detectron2's ``read_image`` applies the EXIF orientation inside a ``try/except Exception``:
    for a PNG, ``getexif()`` decodes the pixels first, so a corrupt file's decode error is
    swallowed there, and PIL then returns the partly decoded pixels without raising. Here the
    pixels are decoded explicitly (``image.load()``) before anything else, then the EXIF
    orientation is applied (``PIL.ImageOps.exif_transpose``) and the result converted with
    Detectron2's ``convert_PIL_to_numpy``, so a good file gives exactly what ``read_image``
    gives and a bad one raises. (This relies on PIL's default
    ``ImageFile.LOAD_TRUNCATED_IMAGES = False``.)

    Args:
        file_name: path of the image / label PNG (anything ``PathManager`` can open).
        image_format: as for ``read_image`` (e.g. "BGR", "RGB", or None to keep the stored mode).
        what: what the file is ("image", "panoptic PNG", ...), used in error messages.
    Returns:
        (H, W, C) or (H, W) uint8 array.
    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file cannot be decoded, e.g. corrupt or truncated (the message names it).
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, so that a corrupt file raises here and nowhere else
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when upright
            return utils.convert_PIL_to_numpy(image, image_format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} not found: {file_name}") from e
    except MemoryError:
        raise
    except Exception as e:
        # PIL raises OSError / UnidentifiedImageError, SyntaxError ("broken PNG"), ValueError,
        # EOFError, struct.error, DecompressionBombError, ... depending on the format and damage.
        raise ValueError(f"Cannot read {what} {file_name}: {type(e).__name__}: {e}") from e


def build_augmentations(cfg: CfgNode, is_train: bool) -> list[T.Augmentation]:
    """Detectron2's default resize (+ flip when training), preceded by ``T.RandomCrop`` when
    ``INPUT.CROP.ENABLED`` during training, like Detectron2's ``DatasetMapper``."""
    augs = utils.build_augmentation(cfg, is_train)
    if is_train and cfg.INPUT.CROP.ENABLED:
        augs.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    return augs


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 array -> (C, H, W) uint8 tensor."""
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def check_same_size(
    label: np.ndarray, image: np.ndarray, label_file: str, dataset_dict: dict[str, Any]
) -> None:
    """Raise ``ValueError`` naming both files if ``label`` and ``image`` sizes differ."""
    if label.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"Size mismatch: {label_file} is {label.shape[1]}x{label.shape[0]} but image "
            f"{dataset_dict.get('file_name')} is {image.shape[1]}x{image.shape[0]} (WxH)"
        )


class KNetDatasetMapperBase:
    """What every K-Net mapper (training and test) shares: augmentations, image format, the
    checked image read."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list[T.Augmentation | T.Transform],
        image_format: str,
    ):
        """
        Args:
            is_train: whether the mapper is used for training (only affects logging here).
            augmentations: geometric augmentations applied to the image and its labels.
            image_format: channel order for ``read_image`` ("BGR" or "RGB").
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        mode = "training" if is_train else "inference"
        logger.info(f"[{self.__class__.__name__}] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def read_image(self, dataset_dict: dict[str, Any]) -> np.ndarray:
        """The record's image in ``image_format``, checked against its height/width."""
        image = read_image_checked(dataset_dict["file_name"], self.image_format, "image")
        utils.check_image_size(dataset_dict, image)
        return image
