"""Weight conversion: released K-Net checkpoints (MMDetection, MMSeg) and ImageNet backbones."""

from .checkpointer import CheckpointMismatchError, KNetCheckpointer, install_safe_loading
from .model_zoo import MODEL_ZOO, PRETRAINED_BACKBONES, ModelZooEntry, find_model_zoo_entry
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
from .rules import CheckpointKeyError, StateDictDiff
from .safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_weights_file

__all__ = [
    "MODEL_ZOO",
    "PRETRAINED_BACKBONES",
    "CheckpointInfo",
    "CheckpointKeyError",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "KNetCheckpointer",
    "ModelZooEntry",
    "StateDictDiff",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "check_coco_class_names",
    "convert_official_knet_state_dict",
    "convert_pretrained_backbone",
    "describe_backbone",
    "describe_official_knet_state_dict",
    "find_model_zoo_entry",
    "install_safe_loading",
    "load_checkpoint_file",
    "load_weights_file",
    "model_state_shapes",
    "save_detectron2_checkpoint",
    "unwrap_state_dict",
]
