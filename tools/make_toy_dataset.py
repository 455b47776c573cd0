#!/usr/bin/env python
"""Generate K-Net's synthetic toy panoptic dataset into ``<root>/knet_toy``.

The registered ``knet_toy_*`` datasets never generate it (loading them without it raises an
error naming this command); run this once, or to regenerate it with another size or seed
(``tools/run_demo.py`` runs it for the toy tasks)::

    python tools/make_toy_dataset.py                       # $DETECTRON2_DATASETS/knet_toy
    python tools/make_toy_dataset.py --root /data --num-train 1000 --seed 1 --force

Scenes and files: datasets/README.md, "The built-in toy dataset". Stuff boundaries (2 px) and
segments whose visible area is below 16 px are void; images are JPEG (quality 95). Generation is
seeded (one ``numpy.random.default_rng([seed, split, index])`` per image), so the same seed gives
byte-identical files. :func:`render_scene` renders one scene in memory, at any size (the training
batch of ``tools/benchmark.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from panoptic_conversion import semantic_from_panoptic, thing_annotations_from_panoptic
from PIL import Image
from prepare_samples import lock, prepare_once

from knet.data.datasets.panoptic import contiguous_id_map
from knet.data.datasets.toy import (
    TOY_CATEGORIES,
    TOY_FORMAT_VERSION,
    TOY_THING_CATEGORIES,
    read_toy_marker,
    toy_dataset_dir,
)

# a "knet" logger: the demo's log (Detectron2's setup_logger(name="knet")) shows its messages
logger = logging.getLogger("knet.make_toy_dataset")

TOY_DEFAULT_NUM_IMAGES = {"train": 300, "val": 50}
TOY_DEFAULT_SEED = 0

_SPLIT_CODE = {"train": 0, "val": 1}
_IMAGE_ID_OFFSET = {"train": 0, "val": 1_000_000}
_MIN_SIZE, _MAX_SIZE = 256, 384
_MIN_VISIBLE_AREA = 16

# Appearance in the images (RGB): base colour and texture kind per thing category.
_THING_LOOK = {
    1: ((205, 45, 45), "noise"),
    2: ((235, 200, 45), "stripes"),
    3: ((160, 60, 205), "noise"),
    5: ((45, 215, 215), "stripes"),
}
_SKY, _GRASS, _WALL = 10, 11, 12
_THING_IDS = [c["id"] for c in TOY_THING_CATEGORIES]


def _stuff_texture(
    cat_id: int, rng: np.random.Generator, y0: int, y1: int, h: int, w: int
) -> np.ndarray:
    """(y1 - y0, W, 3) float32 texture of one stuff class for rows y0..y1-1 of an HxW frame."""
    h_full, h = h, y1 - y0
    if cat_id == _SKY:
        top = np.array([95, 150, 225], np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
        bottom = np.array([185, 215, 245], np.float32) + rng.uniform(-8, 8, 3).astype(np.float32)
        t = (np.arange(y0, y1, dtype=np.float32) / (h_full - 1))[:, None, None]
        return np.broadcast_to((1 - t) * top + t * bottom, (h, w, 3))
    if cat_id == _GRASS:
        noise = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 1.2)
        base = np.array([60, 140, 45], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
        return base + noise[..., None] * np.array([25, 70, 20], np.float32)
    # wall: bricks of random height, shifted by half a brick every other row
    bh = int(rng.integers(10, 17))
    bw = int(round(bh * rng.uniform(2.0, 2.6)))
    ys = np.arange(y0, y1, dtype=np.int32)[:, None]
    row = ys // bh
    xo = np.arange(w, dtype=np.int32)[None, :] + (row % 2) * (bw // 2)
    col = xo // bw
    jitter = rng.normal(0, 10, (h_full // bh + 1, (w + bw) // bw + 1)).astype(np.float32)
    brick = np.array([150, 75, 55], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
    img = brick + jitter[row, col][..., None]
    mortar = (ys % bh < 2) | (xo % bw < 2)
    img[mortar] = np.array([172, 172, 166], np.float32)
    return img


def _stuff_layout(rng: np.random.Generator, h: int, w: int):
    """Horizontal stuff bands with wavy boundaries: (band classes top to bottom, (H, W) band
    index, (H, W) bool void boundary)."""
    if rng.random() < 0.5:
        classes = [_SKY, _WALL, _GRASS]
    else:
        classes = [[_SKY, _GRASS], [_SKY, _WALL], [_WALL, _GRASS]][int(rng.integers(3))]
    n = len(classes)
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    band = np.zeros((h, w), np.int64)
    void = np.zeros((h, w), bool)
    for k in range(1, n):
        base = h * (k / n + rng.uniform(-0.08, 0.08))
        boundary = (
            base
            + rng.uniform(3, 0.06 * h)
            * np.sin(2 * np.pi * xs / (rng.uniform(0.4, 1.2) * w) + rng.uniform(0, 6.3))
            + rng.uniform(1, 4) * np.sin(2 * np.pi * xs / rng.uniform(15, 40) + rng.uniform(0, 6.3))
        )
        band += ys >= boundary
        void |= np.abs(ys - boundary) < 1.0
    return classes, band, void


def _shape_mask(
    cat_id: int, rng: np.random.Generator, h: int, w: int, cx: float, cy: float, r: float
) -> np.ndarray:
    """(H, W) bool mask of one filled shape of the given thing category."""
    canvas = np.zeros((h, w), np.uint8)
    angle = rng.uniform(0, 2 * np.pi)
    if cat_id == 1:  # circle
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), max(int(round(r)), 1), 1, -1)
        return canvas.astype(bool)
    if cat_id == 2:  # rotated rectangle
        aspect = rng.uniform(0.6, 1.6)
        box = ((cx, cy), (2 * r * aspect, 2 * r / aspect), np.degrees(angle))
        pts = cv2.boxPoints(box)
    elif cat_id == 3:  # triangle
        a = angle + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        pts = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    else:  # five-pointed star
        a = angle + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], 1)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    return canvas.astype(bool)


def _paint_thing(img: np.ndarray, mask: np.ndarray, cat_id: int, rng: np.random.Generator) -> None:
    """Paint ``mask`` of ``img`` (in place) with the class colour family plus light texture."""
    base_color, texture = _THING_LOOK[cat_id]
    ys, xs = np.nonzero(mask)
    color = np.array(base_color, np.float32) + rng.uniform(-18, 18, 3)
    if texture == "noise":
        tex = rng.standard_normal((len(ys), 1), dtype=np.float32) * 7.0
    else:
        theta, period = rng.uniform(0, np.pi), rng.uniform(5, 9)
        proj = xs * np.cos(theta) + ys * np.sin(theta)
        tex = 10 * np.sign(np.sin(2 * np.pi * proj / period))[:, None]
    img[ys, xs] = color + tex.astype(np.float32)


def render_scene(
    seed: int | Sequence[int], size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Render one toy scene in memory, seeded by ``numpy.random.default_rng(seed)``.

    Args:
        seed: the generator's seed (the dataset uses ``[seed, split, index]``).
        size: (H, W); None draws it from the seed (256..384 per side, as in the dataset).
    Returns:
        image (H, W, 3) uint8 RGB, panoptic ids (H, W) int32 (0 = void), and segments_info with
        dataset ``category_id``, ``id`` (= category_id * 1000 + k), ``iscrowd``, ``area``,
        ``bbox`` [x, y, w, h].
    """
    rng = np.random.default_rng(seed)
    if size is None:
        h, w = (int(v) for v in rng.integers(_MIN_SIZE, _MAX_SIZE + 1, size=2))
    else:
        h, w = size
    # label: index into seg_ids (0 = void); painting a segment overwrites what it occludes
    label = np.zeros((h, w), np.int16)
    seg_ids, crowd = [0], [False]
    counters: dict[int, int] = {}

    def new_segment(cat_id: int, iscrowd: bool) -> int:
        counters[cat_id] = counters.get(cat_id, 0) + 1
        seg_ids.append(cat_id * 1000 + counters[cat_id])
        crowd.append(iscrowd)
        return len(seg_ids) - 1

    classes, band, void = _stuff_layout(rng, h, w)
    img = np.empty((h, w, 3), np.float32)
    for k, cat_id in enumerate(classes):
        region = band == k
        rows = np.flatnonzero(region.any(axis=1))
        y0, y1 = int(rows[0]), int(rows[-1]) + 1  # textures are only computed where needed
        tex = _stuff_texture(cat_id, rng, y0, y1, h, w)
        np.copyto(img[y0:y1], tex, where=region[y0:y1, :, None])
        label[region & ~void] = new_segment(cat_id, False)

    # Crowd: a cluster of tiny shapes of one class, annotated as a single iscrowd=1 segment.
    if rng.random() < 0.1:
        cat_id = _THING_IDS[int(rng.integers(len(_THING_IDS)))]
        ccx, ccy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        union = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(8, 21))):
            cx, cy = ccx + rng.normal(0, 14), ccy + rng.normal(0, 14)
            m = _shape_mask(cat_id, rng, h, w, cx, cy, rng.uniform(2, 4))
            _paint_thing(img, m, cat_id, rng)
            union |= m
        label[union] = new_segment(cat_id, True)

    # Things: later shapes occlude earlier ones; the visible part is the segment.
    cat_id = None
    max_r = 0.3 * min(h, w)
    for _ in range(int(rng.integers(1, 7))):
        if cat_id is None or rng.random() >= 0.35:  # else: one more instance of the same class
            cat_id = _THING_IDS[int(rng.integers(len(_THING_IDS)))]
        size_kind = rng.random()
        if size_kind < 0.15:
            r = rng.uniform(3.5, 5.0)  # tiny, ~8 px across
        elif size_kind < 0.3:
            r = rng.uniform(0.3, 0.42) * min(h, w)  # large, up to ~40% of the image
        else:
            r = float(np.exp(rng.uniform(np.log(6.0), np.log(max_r))))
        # large shapes stay mostly inside; the others may cross the border
        spread = 0.25 if 0.15 <= size_kind < 0.3 else -0.05
        cx, cy = rng.uniform(spread, 1 - spread) * w, rng.uniform(spread, 1 - spread) * h
        m = _shape_mask(cat_id, rng, h, w, cx, cy, r)
        if not m.any():
            continue
        _paint_thing(img, m, cat_id, rng)
        label[m] = new_segment(cat_id, False)

    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 2.0
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    areas = np.bincount(label.ravel(), minlength=len(seg_ids))
    keep = areas >= _MIN_VISIBLE_AREA  # smaller visible parts become void
    keep[0] = False
    lut = np.where(keep, np.asarray(seg_ids, np.int32), 0).astype(np.int32)
    pan = lut[label]
    segments = []
    for k in np.flatnonzero(keep).tolist():
        mask = label == k
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x0, y0 = int(cols[0]), int(rows[0])
        bbox = [x0, y0, int(cols[-1]) - x0 + 1, int(rows[-1]) - y0 + 1]
        segment = {"id": seg_ids[k], "category_id": seg_ids[k] // 1000, "iscrowd": int(crowd[k])}
        segments.append({**segment, "area": int(areas[k]), "bbox": bbox})
    return image, pan, segments


def _write_split(out_dir: str, split: str, num_images: int, seed: int) -> None:
    from panopticapi.utils import id2rgb

    img_dir = os.path.join(out_dir, split)
    pan_dir = os.path.join(out_dir, f"panoptic_{split}")
    sem_dir = os.path.join(out_dir, f"semantic_{split}")
    for d in (img_dir, pan_dir, sem_dir):
        os.makedirs(d, exist_ok=True)
    id_map = contiguous_id_map(TOY_CATEGORIES)
    images, pan_anns, inst_anns = [], [], []
    for i in range(num_images):
        image, pan, segments = render_scene([seed, _SPLIT_CODE[split], i])
        image_id = _IMAGE_ID_OFFSET[split] + i + 1
        stem = f"{image_id:012d}"
        Image.fromarray(image).save(os.path.join(img_dir, stem + ".jpg"), quality=95)
        # compress_level=1: several times faster to write, the label PNGs stay small anyway
        Image.fromarray(id2rgb(pan)).save(os.path.join(pan_dir, stem + ".png"), compress_level=1)
        sem = semantic_from_panoptic(pan, segments, id_map)
        Image.fromarray(sem).save(os.path.join(sem_dir, stem + ".png"), compress_level=1)
        h, w = pan.shape
        images.append({"id": image_id, "file_name": stem + ".jpg", "height": h, "width": w})
        pan_anns.append(
            {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments}
        )
        inst_anns += thing_annotations_from_panoptic(
            pan, segments, image_id, _THING_IDS, len(inst_anns) + 1
        )
    info = {"description": "K-Net synthetic toy dataset", "version": str(TOY_FORMAT_VERSION)}
    common = {"info": info, "licenses": [], "images": images}
    with open(os.path.join(out_dir, f"panoptic_{split}.json"), "w") as f:
        json.dump({**common, "annotations": pan_anns, "categories": TOY_CATEGORIES}, f)
    with open(os.path.join(out_dir, f"instances_{split}.json"), "w") as f:
        json.dump({**common, "annotations": inst_anns, "categories": TOY_THING_CATEGORIES}, f)


def generate_toy_dataset(
    root: str | None = None,
    num_train: int = TOY_DEFAULT_NUM_IMAGES["train"],
    num_val: int = TOY_DEFAULT_NUM_IMAGES["val"],
    seed: int = TOY_DEFAULT_SEED,
    force: bool = False,
) -> str:
    """Generate the toy dataset into ``<root>/knet_toy`` (root: ``$DETECTRON2_DATASETS``) and
    return that folder; a complete copy with the same parameters is kept unless ``force``.
    Written by :func:`prepare_samples.prepare_once`: concurrent callers never see a partial one."""
    out_dir = toy_dataset_dir(root)
    params = {"version": TOY_FORMAT_VERSION, "seed": int(seed)}
    params.update(num_train=int(num_train), num_val=int(num_val))

    def write(tmp_dir: str) -> None:
        for split, n in (("train", num_train), ("val", num_val)):
            _write_split(tmp_dir, split, int(n), int(seed))
        logger.info("Generated the toy dataset (%s) in %s", params, out_dir)

    return prepare_once(out_dir, params, write, force)


def _is_current(out_dir: str) -> bool:
    return (read_toy_marker(out_dir) or {}).get("version") == TOY_FORMAT_VERSION


def ensure_toy_dataset(root: str | None = None) -> str:
    """Return ``<root>/knet_toy``, generating it with the default parameters unless a complete
    copy of the current format (any size or seed) is there; for the commands that create data
    (``tools/run_demo.py``, the tests' fixture), never for registration or loading."""
    out_dir = toy_dataset_dir(root)
    if _is_current(out_dir):
        return out_dir
    with lock(out_dir):
        if _is_current(out_dir):  # another process may have generated it meanwhile
            return out_dir
        logger.info("Toy dataset not found in %s; generating it (takes a few seconds).", out_dir)
    return generate_toy_dataset(root)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)"
    )
    parser.add_argument("--num-train", type=int, default=TOY_DEFAULT_NUM_IMAGES["train"])
    parser.add_argument("--num-val", type=int, default=TOY_DEFAULT_NUM_IMAGES["val"])
    parser.add_argument("--seed", type=int, default=TOY_DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    out = generate_toy_dataset(**vars(args))  # root None: $DETECTRON2_DATASETS
    print(f"Toy dataset ready in {out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
