"""K-Net's datasets: the built-in ones (registered on import, :mod:`.builtin`), your own from
files (:mod:`.custom`), the panoptic loader they share (:mod:`.panoptic`) and the video
datasets (:mod:`.video`)."""

from . import builtin
from .custom import DATASET_FORMATS, register_custom_dataset
from .panoptic import get_panoptic_metadata, load_panoptic_json_with_sem_seg
from .toy import (
    TOY_CATEGORIES,
    TOY_COMMAND,
    TOY_NUM_CLASSES,
    TOY_NUM_THING_CLASSES,
    get_datasets_root,
    require_toy_dataset,
    toy_dataset_dir,
)
from .video import (
    KITTI_STEP_CATEGORIES,
    TOY_VIDEO_CATEGORIES,
    TOY_VIDEO_COMMAND,
    VIPSEG_CATEGORIES,
    YTVIS_2019_CLASSES,
    pair_with_references,
    read_panoptic_frame,
    register_video_dataset,
    require_toy_video_dataset,
    toy_video_dataset_dir,
)
