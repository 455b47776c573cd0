"""What ``import knet`` changes in Detectron2: three things in ``detectron2.engine.defaults``, all
made here, by :func:`adapt_detectron2_defaults`, and nowhere else.

1. ``DefaultPredictor`` and ``DefaultTrainer`` build their checkpointer from the module-level
   name ``DetectionCheckpointer`` of ``detectron2.engine.defaults`` (looked up at each call, in
   Detectron2 v0.6 and main alike). That name is bound to :class:`KNetCheckpointer`, so
   ``DefaultPredictor(cfg)`` never runs code from a weight file and names bad weights as the
   project's entry points do. The class ``DetectionCheckpointer`` itself, and the name in every
   other module, stay as Detectron2 wrote them.
2. ``DefaultPredictor.__call__`` flips and resizes the (H, W, C) array before the model sees it,
   so a grayscale (H, W) array, a 16-bit, empty or channels-first one would fail inside
   Detectron2 (an ``IndexError``, a PIL or torch error). For a K-Net model the array is checked
   first, with the model's messages (:func:`knet.modeling.meta_arch.base.check_image`), and an
   (H, W, 1) grayscale array is given 3 channels; any other model's predictor runs Detectron2's
   ``__call__`` unchanged. Detectron2 offers no hook before its resize, hence the wrapper.
3. ``DefaultPredictor.metadata`` (Detectron2: the metadata of ``DATASETS.TEST[0]``, empty when it
   is not registered) is, for a K-Net model, :func:`knet.data.kinds.model_metadata`: registered
   metadata as before, else the class names and colours the config of a run carries.
"""

import functools

import numpy as np
from detectron2.engine import DefaultPredictor, defaults

from .checkpoint import KNetCheckpointer
from .data.kinds import model_metadata
from .modeling.meta_arch.base import KNetBase, check_image, pixel_range_top

__all__ = ["adapt_detectron2_defaults"]


def _check_knet_input_first(call):
    """``DefaultPredictor.__call__`` with the input check of a K-Net model before it."""

    @functools.wraps(call)
    def checked_call(predictor: DefaultPredictor, original_image: np.ndarray) -> dict:
        if isinstance(predictor.model, KNetBase):
            top = pixel_range_top(predictor.cfg.MODEL.PIXEL_MEAN)
            check_image(original_image, "image", top=top, channels_last=True)
            if original_image.shape[2] == 1:
                original_image = np.repeat(original_image, 3, axis=2)
        return call(predictor, original_image)

    checked_call.checks_knet_input = True
    return checked_call


def _model_metadata_after(init):
    """``DefaultPredictor.__init__`` with the metadata of a K-Net model set after it."""

    @functools.wraps(init)
    def init_with_metadata(predictor: DefaultPredictor, cfg) -> None:
        init(predictor, cfg)
        if isinstance(predictor.model, KNetBase):
            predictor.metadata = model_metadata(cfg)

    init_with_metadata.sets_knet_metadata = True
    return init_with_metadata


def adapt_detectron2_defaults() -> None:
    """Make the changes of the module docstring (once; a second call changes nothing)."""
    defaults.DetectionCheckpointer = KNetCheckpointer
    if not getattr(DefaultPredictor.__call__, "checks_knet_input", False):
        DefaultPredictor.__call__ = _check_knet_input_first(DefaultPredictor.__call__)
    if not getattr(DefaultPredictor.__init__, "sets_knet_metadata", False):
        DefaultPredictor.__init__ = _model_metadata_after(DefaultPredictor.__init__)
