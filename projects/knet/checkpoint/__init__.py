"""Weight conversion: official K-Net (MMDetection) checkpoints and torchvision ResNets."""

from .official import (
    CheckpointKeyError,
    OfficialKNetInfo,
    StateDictDiff,
    UnsupportedCheckpointError,
    check_coco_class_names,
    compare_state_dicts,
    convert_official_knet_state_dict,
    convert_torchvision_resnet_state_dict,
    describe_official_knet_state_dict,
    load_checkpoint_file,
    save_detectron2_checkpoint,
)

__all__ = [
    "CheckpointKeyError",
    "OfficialKNetInfo",
    "StateDictDiff",
    "UnsupportedCheckpointError",
    "check_coco_class_names",
    "compare_state_dicts",
    "convert_official_knet_state_dict",
    "convert_torchvision_resnet_state_dict",
    "describe_official_knet_state_dict",
    "load_checkpoint_file",
    "save_detectron2_checkpoint",
]
