"""Helpers shared by the K-Net dataset mappers: checked file reads and augmentation lists."""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

__all__ = [
    "KNetDatasetMapperBase",
    "read_image_checked",
    "build_augmentations",
    "image_to_tensor",
]

logger = logging.getLogger(__name__)


def read_image_checked(file_name: str, image_format: str | None, what: str) -> np.ndarray:
    """``detectron2.data.detection_utils.read_image`` with errors that name the file.

    Args:
        file_name: path of the image / label PNG.
        image_format: as for ``read_image`` (e.g. "BGR", "RGB", or None to keep the stored mode).
        what: what the file is ("image", "panoptic PNG", ...), used in error messages.
    Returns:
        (H, W, C) or (H, W) uint8 array.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded (corrupt or truncated).
    """
    try:
        return utils.read_image(file_name, format=image_format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} not found: {file_name}") from e
    except (OSError, SyntaxError, ValueError) as e:
        # PIL raises OSError/UnidentifiedImageError, SyntaxError ("broken PNG") or ValueError.
        raise ValueError(f"Cannot read {what} {file_name}: {e}") from e


def build_augmentations(cfg: CfgNode, is_train: bool) -> List[T.Augmentation]:
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
    label: np.ndarray, image: np.ndarray, label_file: str, dataset_dict: Dict[str, Any]
) -> None:
    """Raise ``ValueError`` naming both files if ``label`` and ``image`` sizes differ."""
    if label.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"Size mismatch: {label_file} is {label.shape[1]}x{label.shape[0]} but image "
            f"{dataset_dict.get('file_name')} is {image.shape[1]}x{image.shape[0]} (WxH)"
        )


class KNetDatasetMapperBase:
    """What every K-Net training mapper shares: augmentations, image format, the image read."""

    def __init__(
        self, is_train: bool, augmentations: List[T.Augmentation | T.Transform], image_format: str
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        mode = "training" if is_train else "inference"
        logger.info(f"[{self.__class__.__name__}] Augmentations used in {mode}: {augmentations}")

    def read_image(self, dataset_dict: Dict[str, Any]) -> np.ndarray:
        """The record's image in ``image_format``, checked against its height/width."""
        image = read_image_checked(dataset_dict["file_name"], self.image_format, "image")
        utils.check_image_size(dataset_dict, image)
        return image
