"""Offline weight conversion: released K-Net checkpoints (MMDetection, MMSeg) and ImageNet
backbones into this project's parameter names.

Imported by the converters in ``tools/`` and by tests, not by ``import knet``: loading weights at
run time is :mod:`knet.checkpoint`, and the table of released files is
:mod:`knet.checkpoint.model_zoo`.
"""

from .official import (
    CheckpointInfo,
    UnsupportedCheckpointError,
    check_coco_class_names,
    convert_official_knet_state_dict,
    convert_pretrained_backbone,
    describe_backbone,
    describe_official_knet_state_dict,
    load_checkpoint_file,
    model_state_shapes,
    save_detectron2_checkpoint,
    unwrap_state_dict,
)
from .rules import CheckpointKeyError
