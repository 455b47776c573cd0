"""``KNetPredictor``: Detectron2's ``DefaultPredictor`` that checks its input first."""

from __future__ import annotations

import numpy as np
from detectron2.engine import DefaultPredictor

from ..modeling.meta_arch.base import check_image, pixel_range_top


class KNetPredictor(DefaultPredictor):
    """``DefaultPredictor`` (same constructor, same call) whose input is checked before
    Detectron2's resize touches it.

    ``DefaultPredictor`` flips and resizes the (H, W, C) array before the model sees it, so a
    grayscale (H, W) array, a 16-bit, empty or channels-first one fails there with an
    ``IndexError``, a PIL or torch error; here every bad input gets the model's ``ValueError``
    naming what was received (:func:`knet.modeling.meta_arch.base.check_image`), and an
    (H, W, 1) grayscale array is given 3 channels.
    """

    def __call__(self, original_image: np.ndarray) -> dict:
        top = pixel_range_top(self.cfg.MODEL.PIXEL_MEAN)
        check_image(original_image, "image", top=top, channels_last=True)
        if original_image.shape[2] == 1:
            original_image = np.repeat(original_image, 3, axis=2)
        return super().__call__(original_image)
