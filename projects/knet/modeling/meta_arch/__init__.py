from .base import KNetBase
from .knet import KNet
from .semantic_knet import SemanticKNet
from .video_knet import VideoKNet
from .video_knet_clip import VideoKNetClip
