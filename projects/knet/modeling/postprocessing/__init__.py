"""Inference outputs of K-Net: panoptic, instance and semantic results at the output size, from
the last stage's class and mask logits."""

from .post_processor import (
    KNetPostProcessor,
    MaskStatistics,
    OutputGeometry,
    detectron2_outputs,
    full_mask_statistics,
    kernel_scores_and_labels,
    mask_statistics,
    masks_to_boxes,
    panoptic_segments,
    resize_to_output,
    segments_info_from_table,
    select_instances,
    semantic_probabilities,
    semantic_scores,
)
