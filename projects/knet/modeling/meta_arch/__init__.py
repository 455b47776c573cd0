from .base import KNetBase
from .knet import KNet
from .semantic_knet import SemanticKNet
from .video_knet import VideoKNet
