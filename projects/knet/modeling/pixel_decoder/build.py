from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

PIXEL_DECODER_REGISTRY = Registry("KNET_PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders of K-Net: turn backbone features into the feature maps the kernels act on.
Selected by ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` and built as ``cls(cfg, input_shape)``.
"""


def build_pixel_decoder(cfg, input_shape: dict[str, ShapeSpec]) -> nn.Module:
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    return PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
