"""K-Net's outputs drawn with Detectron2's ``Visualizer`` (the demo and the main job), and the
image files that the demo and ``tools/deploy/run_exported.py`` take as ``--input``."""

import glob
import os
from collections.abc import Sequence
from typing import Any

import torch
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import VisImage, Visualizer

from .data.datasets.custom import IMAGE_EXTENSIONS

__all__ = [
    "above_threshold",
    "draw_predictions",
    "draw_tracked_objects",
    "draw_tracked_panoptic",
    "expand_inputs",
]


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Paths, glob patterns and folders (their images, sorted) -> list of image paths."""
    paths: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            names = [n for n in os.listdir(pattern) if n.lower().endswith(IMAGE_EXTENSIONS)]
            found = sorted(os.path.join(pattern, name) for name in names)
        elif glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
        else:
            found = [pattern]
        if not found:
            raise FileNotFoundError(f"--input {pattern!r} matches no image")
        paths.extend(p for p in found if p not in paths)
    return paths


def draw_predictions(visualizer: Visualizer, predictions: dict[str, Any]) -> VisImage | None:
    """Draw one image's outputs (Detectron2's format) on ``visualizer``'s image: the panoptic
    segmentation if present, else the semantic argmax and/or the instances over it; None when
    there is no output to draw."""
    cpu = torch.device("cpu")
    if "panoptic_seg" in predictions:
        panoptic_seg, segments_info = predictions["panoptic_seg"]
        if any("track_id" in s for s in segments_info):
            return draw_tracked_panoptic(visualizer, panoptic_seg.to(cpu), segments_info)
        return visualizer.draw_panoptic_seg(panoptic_seg.to(cpu), segments_info)
    drawing = None
    if "sem_seg" in predictions:
        drawing = visualizer.draw_sem_seg(predictions["sem_seg"].argmax(dim=0).to(cpu))
    if "instances" in predictions:
        drawing = visualizer.draw_instance_predictions(predictions["instances"].to(cpu))
    return drawing


def draw_tracked_panoptic(
    visualizer: Visualizer, panoptic_seg: torch.Tensor, segments_info: list[dict]
) -> VisImage:
    """A video frame's panoptic output: stuff as Detectron2 draws it, each tracked thing segment
    in the colour of its "track_id" (the same in every frame) and labelled "class #id";
    untracked things (id 0) in grey."""
    stuff = [s for s in segments_info if not s["isthing"]]
    visualizer.draw_panoptic_seg(panoptic_seg, stuff)  # things are void to it
    things = [s for s in segments_info if s["isthing"]]
    if not things:
        return visualizer.output
    masks = panoptic_seg[None] == torch.tensor([s["id"] for s in things])[:, None, None]
    classes = [s["category_id"] for s in things]
    return draw_tracked_objects(visualizer, masks, classes, [s.get("track_id", 0) for s in things])


def draw_tracked_objects(
    visualizer: Visualizer, masks: torch.Tensor, classes: Sequence[int], track_ids: Sequence[int]
) -> VisImage:
    """Objects of a video frame, (n, H, W) masks: each in the colour of its track id (the same
    in every frame) and labelled "class #id"; id 0 (untracked) in grey."""
    if not len(classes):
        return visualizer.output
    names = visualizer.metadata.get("thing_classes", None)
    palette = colormap(rgb=True, maximum=1)
    labels, colors = [], []
    for category, track in zip(classes, track_ids):
        name = names[category] if names else str(category)
        labels.append(f"{name} #{track}" if track else name)
        colors.append(palette[track % len(palette)] if track else (0.5, 0.5, 0.5))
    masks = masks.cpu().numpy()
    return visualizer.overlay_instances(masks=masks, labels=labels, assigned_colors=colors)


def above_threshold(predictions: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Detectron2's outputs without the instances and panoptic thing segments scoring below
    ``threshold``: their pixels become void (0) (the merge that made the segments is not redone,
    so the pixels do not go to other segments)."""
    out = dict(predictions)
    if "instances" in out:
        out["instances"] = out["instances"][out["instances"].scores >= threshold]
    if "panoptic_seg" in out:
        ids, segments = out["panoptic_seg"]
        low = [s["id"] for s in segments if s["isthing"] and s["score"] < threshold]
        if low:
            ids = torch.where(torch.isin(ids, torch.tensor(low, dtype=ids.dtype)), 0, ids)
        out["panoptic_seg"] = (ids, [s for s in segments if s["id"] not in low])
    return out
