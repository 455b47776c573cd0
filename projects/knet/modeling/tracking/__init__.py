"""Online tracking of Video K-Net's thing segments across the frames of a video."""

from .quasi_dense import (
    EMPTY_MASK_BOX,
    SUPPRESSED,
    UNASSIGNED,
    QuasiDenseTracker,
    masks_to_tracker_boxes,
    track_panoptic_segments,
    tracker_box_iou,
)
