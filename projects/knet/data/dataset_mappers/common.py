"""Helpers shared by the K-Net dataset mappers: checked file reads, augmentation lists, and
reads that resize a large image (and its label map) before converting it to an array."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)


def decode_image_checked(file_name: str, image_format: str | None, what: str) -> Image.Image:
    """The decoded, EXIF-oriented PIL image of :func:`read_image_checked`, before its conversion
    to ``image_format`` and to an array (same checks, same errors)."""
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, so that a corrupt file raises here and nowhere else
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when upright
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} not found: {file_name}") from e
    except MemoryError:
        raise
    except Exception as e:
        # PIL raises OSError / UnidentifiedImageError, SyntaxError ("broken PNG"), ValueError,
        # EOFError, struct.error, DecompressionBombError, ... depending on the format and damage.
        raise ValueError(f"Cannot read {what} {file_name}: {type(e).__name__}: {e}") from e
    if image_format and image.mode.startswith(("I", "F")):  # converting would clip to 8 bits
        raise ValueError(
            f"{what} {file_name} is a {image.mode} (16/32-bit) image; expected 8-bit RGB or "
            "grayscale: scale it to 0-255 and save it as 8-bit"
        )
    return image


def read_image_checked(file_name: str, image_format: str | None, what: str) -> np.ndarray:
    """Read an image or label PNG as ``detectron2.data.detection_utils.read_image`` does, but
    raise on any decode error.

    ``read_image`` applies the EXIF orientation inside a ``try/except Exception``; for a PNG,
    ``getexif()`` decodes the pixels first, so a corrupt file's decode error is swallowed there
    and PIL then returns the partly decoded pixels. Here the pixels are decoded first, then
    oriented and converted by Detectron2's ``convert_PIL_to_numpy``: a good file gives exactly
    what ``read_image`` gives, a bad one raises.

    Args:
        image_format: as for ``read_image`` ("BGR", "RGB", or None to keep the stored mode).
        what: what the file is ("image", "panoptic PNG", ...), for error messages.
    Returns:
        (H, W, C) or (H, W) uint8 array.
    Raises:
        FileNotFoundError / ValueError: the file is missing / cannot be decoded (named).
    """
    image = decode_image_checked(file_name, image_format, what)
    return utils.convert_PIL_to_numpy(image, image_format)


# ----------------------------------------------------------------------------- resized reads
# Augmentations whose transform depends only on the image size (and the random state): they
# are sampled before the pixels become an array. Exact types: a subclass may read pixels.
_SIZE_ONLY_AUGMENTATIONS = (T.RandomCrop, T.ResizeShortestEdge, T.Resize, T.RandomFlip)
# PIL modes whose crop / resize equals Detectron2's on the array ``convert_PIL_to_numpy`` makes
# (``ResizeTransform.apply_image`` resizes a uint8 array as a PIL image of the same mode; each
# band is resampled alone, so resizing before the flip to BGR is the same). "P": the palette
# indices of a label map, resampled as such by the nearest-neighbour resize of segmentations.
_PIL_IMAGE_MODES = ("RGB", "L")
_PIL_LABEL_MODES = ("RGB", "L", "P")


def size_placeholder(height: int, width: int) -> np.ndarray:
    """A read-only (height, width, 3) uint8 array of zeros that takes no memory (zero strides):
    what the size-only augmentations and ``check_image_size`` read of an image."""
    return np.broadcast_to(np.zeros((), dtype=np.uint8), (height, width, 3))


def sample_leading_geometry(
    augmentations: list[T.Augmentation], height: int, width: int
) -> tuple[list[T.Transform], int]:
    """Sample the leading size-only augmentations of a list, up to the first resize, on
    placeholders of the image's size at each point: the random state is consumed exactly as when
    augmenting the array.

    Returns:
        the sampled transforms (crops and no-ops, then at most one other, e.g. the resize), and
        how many augmentations they took (the rest are applied to the arrays as usual).
    """
    transforms: list[T.Transform] = []
    for i, aug in enumerate(augmentations):
        if type(aug) not in _SIZE_ONLY_AUGMENTATIONS:
            return transforms, i
        tfm = aug.get_transform(size_placeholder(height, width))
        transforms.append(tfm)
        if isinstance(tfm, T.CropTransform):
            height, width = tfm.h, tfm.w
        elif not isinstance(tfm, T.NoOpTransform):
            return transforms, i + 1
    return transforms, len(augmentations)


def _apply_to_pil(
    image: Image.Image, transforms: list[T.Transform], segmentation: bool
) -> Image.Image | None:
    """``image`` after ``transforms`` (crops, no-ops, resizes; nearest-neighbour resizes for a
    ``segmentation``) as the transforms' ``apply_image`` / ``apply_segmentation`` would give
    it, or None if PIL cannot give the same pixels (another mode or transform)."""
    if image.mode not in (_PIL_LABEL_MODES if segmentation else _PIL_IMAGE_MODES):
        return None
    if not all(
        isinstance(t, (T.CropTransform, T.ResizeTransform, T.NoOpTransform)) for t in transforms
    ):
        return None
    for tfm in transforms:
        if isinstance(tfm, T.CropTransform):
            image = image.crop((tfm.x0, tfm.y0, tfm.x0 + tfm.w, tfm.y0 + tfm.h))
        elif isinstance(tfm, T.ResizeTransform):
            if image.size != (tfm.w, tfm.h):
                raise ValueError(f"ResizeTransform from {tfm.w}x{tfm.h} got a {image.size} image")
            interp = Image.NEAREST if segmentation else tfm.interp
            image = image.resize((tfm.new_w, tfm.new_h), interp)
    return image


def transform_decoded(
    image: Image.Image,
    image_format: str | None,
    transforms: list[T.Transform],
    segmentation: bool = False,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """A decoded image (:func:`decode_image_checked`) as :func:`read_image_checked` converts it,
    after ``transforms`` (from :func:`sample_leading_geometry`): applied to the PIL image where
    that gives the same pixels (no full-size array is made), otherwise to the array.

    Args:
        segmentation: a label map (nearest-neighbour resizes, ``apply_segmentation``).
        prepare: applied to the array before the transforms when they are applied to it (e.g.
            a cast), after them otherwise: it must commute with crops and resizes of 8-bit maps.
    Returns:
        the transformed (h, w, C) or (h, w) array.
    """
    if image_format:
        # converted first, as ``convert_PIL_to_numpy`` does (then a no-op): resampling a palette
        # or CMYK image is not resampling its RGB pixels
        target = "RGB" if image_format in ("BGR", "YUV-BT.601") else image_format
        if image.mode != target:
            image = image.convert(target)
    pil_ok = image_format in (None, "RGB", "BGR", "L")  # "YUV-BT.601" becomes floats
    small = _apply_to_pil(image, transforms, segmentation) if pil_ok else None
    if small is not None:
        array = utils.convert_PIL_to_numpy(small, image_format)
        return prepare(array) if prepare is not None else array
    array = utils.convert_PIL_to_numpy(image, image_format)
    array = prepare(array) if prepare is not None else array
    for tfm in transforms:
        array = tfm.apply_segmentation(array) if segmentation else tfm.apply_image(array)
    return array


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


class AugmentedRead(NamedTuple):
    """The augmented (h, w, C) image and label map (or None), and all the transforms applied."""

    image: np.ndarray
    label: np.ndarray | None
    transforms: T.TransformList


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
        """``augmentations``: applied to the image and its labels; ``image_format``: "BGR" or
        "RGB"; ``is_train``: for the log only."""
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

    def read_augmented(
        self,
        dataset_dict: dict[str, Any],
        label_file: str | None = None,
        label_format: str | None = None,
        label_what: str = "label PNG",
        prepare_label: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> AugmentedRead:
        """Read the record's image (checked against its height/width) and, optionally, a label
        map of the same size, and apply the augmentations to both (the label as ``sem_seg``).

        The size-only augmentations up to the resize are sampled from the image size and applied
        to each file as soon as it is decoded, the image before the label map is read: a large
        input costs one decoded file at a time, not full-size arrays. The pixels and the random
        state are those of augmenting the full-size arrays.

        Args:
            label_file, label_format, label_what: the label map, its format for
                :func:`read_image_checked` and its name in errors.
            prepare_label: applied to the label array (see :func:`transform_decoded`).
        """
        augs = self.augmentations.augs
        decoded = decode_image_checked(dataset_dict["file_name"], self.image_format, "image")
        size = (decoded.height, decoded.width)
        utils.check_image_size(dataset_dict, size_placeholder(*size))
        leading, used = sample_leading_geometry(augs, *size)
        image = transform_decoded(decoded, self.image_format, leading)
        del decoded  # before the label map is decoded
        label = None
        if label_file is not None:
            decoded = decode_image_checked(label_file, label_format, label_what)
            if (decoded.height, decoded.width) != size:
                raise ValueError(
                    f"Size mismatch: {label_file} is {decoded.width}x{decoded.height} but image "
                    f"{dataset_dict.get('file_name')} is {size[1]}x{size[0]} (WxH)"
                )
            label = transform_decoded(decoded, label_format, leading, True, prepare_label)
            del decoded
        aug_input = T.AugInput(image, sem_seg=label)
        rest = T.AugmentationList(augs[used:])(aug_input)
        transforms = T.TransformList(leading + rest.transforms)
        return AugmentedRead(aug_input.image, aug_input.sem_seg, transforms)
