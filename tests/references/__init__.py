"""Independent re-implementations of the official computations, for the tests.

Each module restates, in plain PyTorch and without importing ``mmcv`` / ``mmdet`` / ``mmseg``
or the project's code, what an official implementation computes or writes: ``mmcv`` (ConvModule,
DCNv1), ``resnet`` (MMDetection / MMSegmentation / Detectron2 ResNet parts), ``swin``
(Microsoft's and MMDetection's Swin Transformer), ``mmseg`` (decode heads), ``knet_heads``
(K-Net's kernel heads, localization FPN and positional encoding) and ``layouts`` (synthetic
state dicts in the layouts of the released checkpoints). The tests compare the project's
modules against them.
"""
