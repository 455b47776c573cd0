"""Inference outputs of K-Net: panoptic, instance and semantic results at the output size, from
the last stage's class and mask logits."""

from .base import MaskStatistics, OutputGeometry, resize_to_output
from .post_processor import (
    KNetPostProcessor,
    detectron2_outputs,
    kernel_scores_and_labels,
    masks_to_boxes,
    panoptic_segments,
    segments_info_from_table,
    select_instances,
    semantic_probabilities,
    semantic_scores,
)
from .statistics import full_mask_statistics, mask_statistics, tiled_mask_statistics
