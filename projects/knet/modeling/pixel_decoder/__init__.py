from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .decode_heads import (
    AuxiliaryFCNHead,
    KNetASPPHead,
    KNetFCNHead,
    KNetPSPHead,
    KNetUPerHead,
    PyramidPoolingModule,
    build_auxiliary_head,
    conv_module,
)
from .localization_fpn import KNetLocalizationFPN
from .position_encoding import PositionEmbeddingSine
