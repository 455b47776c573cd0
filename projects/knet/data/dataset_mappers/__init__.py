"""K-Net dataset mappers: one training mapper per dataset kind and the inference mapper
(:mod:`.mappers`; video pairs: :mod:`.video`), and their checked, resizing reads
(:mod:`.common`)."""

from .common import build_augmentations, read_image_checked
from .mappers import (
    KNetInstanceDatasetMapper,
    KNetPanopticDatasetMapper,
    KNetSemanticDatasetMapper,
    KNetTestDatasetMapper,
)
from .video import KNetVideoPanopticDatasetMapper, build_video_augmentations
