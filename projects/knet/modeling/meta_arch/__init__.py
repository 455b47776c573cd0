from .knet import KNet
