"""K-Net's outputs drawn with Detectron2's ``Visualizer`` (the demo and the main job)."""

from typing import Any

import torch
from detectron2.utils.visualizer import VisImage, Visualizer

__all__ = ["draw_predictions"]


def draw_predictions(visualizer: Visualizer, predictions: dict[str, Any]) -> VisImage | None:
    """Draw one image's outputs (Detectron2's format) on ``visualizer``'s image: the panoptic
    segmentation if present, else the semantic argmax and/or the instances over it; None when
    there is no output to draw."""
    cpu = torch.device("cpu")
    if "panoptic_seg" in predictions:
        panoptic_seg, segments_info = predictions["panoptic_seg"]
        return visualizer.draw_panoptic_seg(panoptic_seg.to(cpu), segments_info)
    drawing = None
    if "sem_seg" in predictions:
        drawing = visualizer.draw_sem_seg(predictions["sem_seg"].argmax(dim=0).to(cpu))
    if "instances" in predictions:
        drawing = visualizer.draw_instance_predictions(predictions["instances"].to(cpu))
    return drawing
