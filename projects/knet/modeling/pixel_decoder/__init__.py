from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .localization_fpn import KNetLocalizationFPN
from .position_encoding import PositionEmbeddingSine
