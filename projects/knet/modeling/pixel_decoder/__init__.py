from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .decode_heads import KNetASPPHead, KNetFCNHead, KNetPSPHead, KNetUPerHead
from .localization_fpn import KNetLocalizationFPN
from .position_encoding import PositionEmbeddingSine
