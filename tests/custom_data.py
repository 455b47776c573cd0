"""Tiny datasets written by the tests in the three formats users bring: COCO instances json, COCO
panoptic (json + RGB PNGs) and a semantic folder (images, label PNGs, a class list).

Images are 64x80 (HxW): a sky band over a grass band, with one or two filled rectangles (things)
per image. Category ids are neither contiguous nor sorted things first, as in exported data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 64, 80
SKY, GRASS = (90, 150, 230), (60, 170, 60)
THINGS = {"cat": (220, 40, 40), "dog": (240, 220, 30)}
# exported order: a stuff class first, thing ids not starting at 1
PANOPTIC_CATEGORIES = [
    {"id": 10, "name": "sky", "isthing": 0},
    {"id": 3, "name": "cat", "isthing": 1},
    {"id": 7, "name": "dog", "isthing": 1},
    {"id": 20, "name": "grass", "isthing": 0},
]
INSTANCE_CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
SEMANTIC_CLASSES = ["_background_", "sky", "grass", "cat"]  # label values 0..3


def _boxes(index: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(class, (x0, y0, x1, y1)) of the things of image ``index`` (exclusive corners)."""
    rng = np.random.default_rng(index)
    boxes = []
    for k, name in enumerate(("cat", "dog")[: 1 + index % 2]):
        w, h = int(rng.integers(14, 26)), int(rng.integers(12, 22))
        x0 = int(rng.integers(2, WIDTH // 2 - w // 2)) + k * (WIDTH // 2)
        y0 = int(rng.integers(HEIGHT // 4, HEIGHT - h - 2))
        boxes.append((name, (x0, y0, min(x0 + w, WIDTH - 1), y0 + h)))
    return boxes


def _image(index: int) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    img = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    img[: HEIGHT // 2] = SKY
    img[HEIGHT // 2 :] = GRASS
    noise = np.random.default_rng(100 + index).integers(-12, 12, img.shape)
    boxes = _boxes(index)
    for name, (x0, y0, x1, y1) in boxes:
        img[y0:y1, x0:x1] = THINGS[name]
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8), boxes


def _write_images(folder: Path, indices: list[int], ext: str = "jpg") -> dict[int, list]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in indices:
        img, boxes = _image(i)
        Image.fromarray(img).save(folder / f"img_{i:03d}.{ext}", quality=95)
        out[i] = boxes
    return out


def make_coco_instances(
    root: Path, split: str, indices: list[int], background: bool = False
) -> tuple[str, str]:
    """COCO instances json (polygons) + image folder; returns (json, image_root).

    ``background`` adds a ``_background_`` category with id 0 and no annotation, as labelme's
    labelme2coco exports it.
    """
    image_dir = root / "images"
    boxes = _write_images(image_dir, indices)
    cats = ([{"id": 0, "name": "_background_"}] if background else []) + INSTANCE_CATEGORIES
    ids = {c["name"]: c["id"] for c in cats}
    images, annotations = [], []
    for i in indices:
        images.append(
            {"id": i + 1, "file_name": f"img_{i:03d}.jpg", "height": HEIGHT, "width": WIDTH}
        )
        for name, (x0, y0, x1, y1) in boxes[i]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": ids[name],
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    path = root / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return str(path), str(image_dir)


def _id2rgb(ids: np.ndarray) -> np.ndarray:
    rgb = np.zeros(ids.shape + (3,), np.uint8)
    for c in range(3):
        rgb[..., c] = (ids >> (8 * c)) & 255
    return rgb


def make_coco_panoptic(root: Path, split: str, indices: list[int]) -> tuple[str, str, str]:
    """COCO panoptic json + RGB PNGs + images; returns (json, png_dir, image_root)."""
    image_dir, png_dir = root / "images", root / f"panoptic_{split}"
    boxes = _write_images(image_dir, indices)
    png_dir.mkdir(parents=True, exist_ok=True)
    ids = {c["name"]: c["id"] for c in PANOPTIC_CATEGORIES}
    images, annotations = [], []
    for i in indices:
        seg = np.zeros((HEIGHT, WIDTH), np.int64)
        seg[: HEIGHT // 2], seg[HEIGHT // 2 :] = 1, 2
        segments = [("sky", 1), ("grass", 2)]
        for k, (name, (x0, y0, x1, y1)) in enumerate(boxes[i]):
            seg[y0:y1, x0:x1] = 3 + k
            segments.append((name, 3 + k))
        seg[:, :2] = 0  # a void strip
        infos = []
        for name, sid in segments:
            ys, xs = np.nonzero(seg == sid)
            if not len(ys):
                continue
            infos.append(
                {
                    "id": sid,
                    "category_id": ids[name],
                    "iscrowd": 0,
                    "area": int(len(ys)),
                    "bbox": [
                        int(xs.min()),
                        int(ys.min()),
                        int(np.ptp(xs) + 1),
                        int(np.ptp(ys) + 1),
                    ],
                }
            )
        Image.fromarray(_id2rgb(seg)).save(png_dir / f"img_{i:03d}.png")
        images.append(
            {"id": i + 1, "file_name": f"img_{i:03d}.jpg", "height": HEIGHT, "width": WIDTH}
        )
        annotations.append(
            {"image_id": i + 1, "file_name": f"img_{i:03d}.png", "segments_info": infos}
        )
    path = root / f"panoptic_{split}.json"
    data = {"images": images, "annotations": annotations, "categories": PANOPTIC_CATEGORIES}
    path.write_text(json.dumps(data))
    return str(path), str(png_dir), str(image_dir)


def make_sem_seg(root: Path, split: str, indices: list[int]) -> tuple[str, str, str]:
    """Images (png) + single-channel label PNGs + labelme-style labels.txt; returns (image_dir,
    label_dir, classes_file). Label values: 0 background strip, 1 sky, 2 grass, 3 cat, 255 void."""
    image_dir, label_dir = root / split / "images", root / split / "labels"
    boxes = _write_images(image_dir, indices, ext="png")
    label_dir.mkdir(parents=True, exist_ok=True)
    for i in indices:
        label = np.full((HEIGHT, WIDTH), 2, np.uint8)
        label[: HEIGHT // 2] = 1
        for name, (x0, y0, x1, y1) in boxes[i]:
            label[y0:y1, x0:x1] = 3 if name == "cat" else 255
        label[:, -3:] = 0
        Image.fromarray(label).save(label_dir / f"img_{i:03d}.png")
    classes = root / "labels.txt"
    classes.write_text("__ignore__\n" + "\n".join(SEMANTIC_CLASSES) + "\n")
    return str(image_dir), str(label_dir), str(classes)
