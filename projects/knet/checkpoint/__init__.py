"""Weight conversion: released K-Net checkpoints (MMDetection, MMSeg) and ImageNet backbones."""

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

__all__ = [
    "MODEL_ZOO",
    "PRETRAINED_BACKBONES",
    "CheckpointInfo",
    "CheckpointKeyError",
    "ModelZooEntry",
    "StateDictDiff",
    "UnsupportedCheckpointError",
    "check_coco_class_names",
    "convert_official_knet_state_dict",
    "convert_pretrained_backbone",
    "describe_backbone",
    "describe_official_knet_state_dict",
    "find_model_zoo_entry",
    "load_checkpoint_file",
    "model_state_shapes",
    "save_detectron2_checkpoint",
    "unwrap_state_dict",
]
