from .base import KNetBase
from .knet import KNet
from .semantic_knet import SemanticKNet
