#!/usr/bin/env python
"""Generate K-Net's synthetic toy video panoptic dataset into ``<root>/knet_toy_video``.

The files follow KITTI-STEP's layout, so the KITTI-STEP loader reads them (the registered
``knet_toy_video_{train,val}`` never generate them; loading them without the files raises an
error naming this command)::

    python tools/make_toy_video_dataset.py                   # $DETECTRON2_DATASETS/knet_toy_video
    python tools/make_toy_video_dataset.py --root /data --num-train 20 --seed 1 --force

Each video is a static background of stuff bands (sky, wall, ground: the image toy set's
textures, ``tools/make_toy_dataset.py``) with 3-5 textured shapes (discs and blocks) that move
along smooth paths and keep their instance id in every frame: two of them cross each other (the
one behind is occluded), one swings out of the view and comes back. Label PNGs hold R = class
id, G * 256 + B = instance id (>= 1), 255 = void (stuff boundaries, visible fragments below 8
px). Class ids interleave things and stuff as KITTI's train ids do (``TOY_VIDEO_CATEGORIES``:
ground 0, disc 1, sky 2, block 3, wall 4), so the loader's things-first order applies.
Generation is seeded (one ``numpy.random.default_rng([seed, split, video])`` per video): the
same seed gives byte-identical files. :func:`render_video` renders one video in memory.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from make_toy_dataset import _paint_thing, _shape_mask, _stuff_layout, _stuff_texture
from PIL import Image
from prepare_samples import prepare_once

from knet.data.datasets.video import (
    TOY_VIDEO_CATEGORIES,
    TOY_VIDEO_FORMAT_VERSION,
    VOID,
    toy_video_dataset_dir,
)

logger = logging.getLogger("knet.make_toy_video_dataset")

TOY_VIDEO_DEFAULTS = {"num_train": 6, "num_val": 2, "num_frames": 8, "seed": 0}
TOY_VIDEO_SIZE = (128, 192)  # (H, W)
_SPLIT_CODE = {"train": 0, "val": 1}
_MIN_VISIBLE_AREA = 8

_IDS = {c["name"]: c["id"] for c in TOY_VIDEO_CATEGORIES}
# the image toy set's stuff category ids (its texture functions) -> toy video class ids
_STUFF_FROM_IMAGE_TOY = {10: _IDS["sky"], 11: _IDS["ground"], 12: _IDS["wall"]}
# toy video thing class id -> the image toy set's shape (category id): circle, rectangle
_IMAGE_TOY_SHAPE = {_IDS["disc"]: 1, _IDS["block"]: 2}
_THING_CLASSES = sorted(_IMAGE_TOY_SHAPE)


def _paths(
    rng: np.random.Generator, n: int, num_frames: int, h: int, w: int
) -> list[dict[str, Any]]:
    """Motion of ``n`` objects: centre (x, y) per frame, radius, class, drawing seed, depth.

    Objects 0 and 1 cross each other horizontally at the same height; object 2 swings out of
    the view (beyond the border by more than its size) and back; the others drift.
    """
    t = np.arange(num_frames, dtype=np.float64)
    span = max(num_frames - 1, 1)
    objects = []
    for k in range(n):
        r = float(rng.uniform(0.09, 0.16) * h)
        if k < 2:  # crossing pair: from opposite sides towards each other, meeting mid-video
            y = rng.uniform(0.45, 0.7) * h + (k - 0.5) * rng.uniform(0, 0.1) * h
            start, end = (0.15 * w, 0.8 * w) if k == 0 else (0.85 * w, 0.2 * w)
            xs = start + (end - start) * t / span
            ys = y + 3.0 * np.sin(t * 0.7 + rng.uniform(0, 6.3))
        elif k == 2:  # leaves through the left or right border and re-enters
            side = 1 if rng.random() < 0.5 else -1
            out = w / 2 + 2.5 * r  # fully outside at the peak
            xs = w / 2 + side * out * np.sin(np.pi * t / span)
            ys = rng.uniform(0.3, 0.6) * h + 4.0 * np.cos(t * 0.5)
        else:  # slow drift with a wobble
            x0, y0 = rng.uniform(0.2, 0.8) * w, rng.uniform(0.3, 0.8) * h
            vx, vy = rng.uniform(-4, 4), rng.uniform(-1.5, 1.5)
            phase = rng.uniform(0, 6.3)
            xs = x0 + vx * t + 3.0 * np.sin(0.8 * t + phase)
            ys = y0 + vy * t + 2.0 * np.cos(0.6 * t + phase)
        cls = _THING_CLASSES[int(rng.integers(len(_THING_CLASSES)))]
        draw_seed = int(rng.integers(2**31))
        objects.append({"class": cls, "xs": xs, "ys": ys, "r": r, "draw_seed": draw_seed})
    order = rng.permutation(n)  # painting order: later ones occlude earlier ones
    return [objects[i] for i in order]


def render_video(
    seed: int | Sequence[int],
    num_frames: int = TOY_VIDEO_DEFAULTS["num_frames"],
    size: tuple[int, int] = TOY_VIDEO_SIZE,
) -> tuple[list[np.ndarray], list[np.ndarray], list[list[dict[str, int]]]]:
    """Render one toy video in memory, seeded by ``numpy.random.default_rng(seed)``.

    Returns:
        images: (H, W, 3) uint8 RGB per frame; labels: (H, W, 3) uint8 KITTI-STEP encoded per
        frame (R class, G * 256 + B instance); objects: per frame, one dict per object whose
        shape overlaps the frame: ``class``, ``instance``, ``area`` (pixels of its whole shape
        in the frame), ``visible`` (labelled pixels), ``occluded`` (pixels covered by objects in
        front of it).
    """
    rng = np.random.default_rng(seed)
    h, w = size
    image_classes, band, void = _stuff_layout(rng, h, w)
    background = np.empty((h, w, 3), np.float32)
    stuff = np.full((h, w), VOID, np.int64)
    for k, cat_id in enumerate(image_classes):
        region = band == k
        rows = np.flatnonzero(region.any(axis=1))
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        np.copyto(
            background[y0:y1],
            _stuff_texture(cat_id, rng, y0, y1, h, w),
            where=region[y0:y1, :, None],
        )
        stuff[region & ~void] = _STUFF_FROM_IMAGE_TOY[cat_id]
    objects = _paths(rng, int(rng.integers(3, 6)), num_frames, h, w)
    counters: dict[int, int] = {}
    for obj in objects:  # instance ids per class, 1, 2, ..., fixed for the whole video
        counters[obj["class"]] = counters.get(obj["class"], 0) + 1
        obj["instance"] = counters[obj["class"]]

    images, labels, infos = [], [], []
    for f in range(num_frames):
        img = background.copy()
        owner = np.full((h, w), -1, np.int64)  # index of the object painted last at each pixel
        masks = []
        for i, obj in enumerate(objects):
            # the same drawing seed in every frame: the same shape, colour and orientation
            shape_rng = np.random.default_rng(obj["draw_seed"])
            look = _IMAGE_TOY_SHAPE[obj["class"]]
            mask = _shape_mask(look, shape_rng, h, w, obj["xs"][f], obj["ys"][f], obj["r"])
            _paint_thing(img, mask, look, shape_rng)
            owner[mask] = i
            masks.append(mask)
        img += rng.standard_normal((h, w, 1), dtype=np.float32) * 2.0
        images.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))

        cls = stuff.copy()
        inst = np.zeros((h, w), np.int64)
        frame_info = []
        for i, (obj, mask) in enumerate(zip(objects, masks)):
            visible = owner == i
            area = int(visible.sum())
            if area < _MIN_VISIBLE_AREA:
                cls[visible] = VOID  # a sliver: void, as the image toy set does
            else:
                cls[visible], inst[visible] = obj["class"], obj["instance"]
            if mask.any():
                frame_info.append(
                    {
                        "class": obj["class"],
                        "instance": obj["instance"],
                        "area": int(mask.sum()),
                        "visible": area if area >= _MIN_VISIBLE_AREA else 0,
                        "occluded": int((mask & (owner > i)).sum()),
                    }
                )
        label = np.stack([cls, inst // 256, inst % 256], axis=-1).astype(np.uint8)
        labels.append(label)
        infos.append(frame_info)
    return images, labels, infos


def _write_split(out_dir: str, split: str, first_video: int, num_videos: int, **kw: int) -> None:
    folder = os.path.join(out_dir, "video_sequence", split)
    os.makedirs(folder, exist_ok=True)
    for v in range(num_videos):
        seq = first_video + v
        images, labels, _ = render_video([kw["seed"], _SPLIT_CODE[split], v], kw["num_frames"])
        for f, (image, label) in enumerate(zip(images, labels)):
            stem = os.path.join(folder, f"{seq:06d}_{f:06d}")
            # compress_level=1: several times faster to write; the files stay small
            Image.fromarray(image).save(stem + "_leftImg8bit.png", compress_level=1)
            Image.fromarray(label).save(stem + "_panoptic.png", compress_level=1)


def generate_toy_video_dataset(
    root: str | None = None,
    num_train: int = TOY_VIDEO_DEFAULTS["num_train"],
    num_val: int = TOY_VIDEO_DEFAULTS["num_val"],
    num_frames: int = TOY_VIDEO_DEFAULTS["num_frames"],
    seed: int = TOY_VIDEO_DEFAULTS["seed"],
    force: bool = False,
) -> str:
    """Generate the toy video dataset into ``<root>/knet_toy_video`` (root:
    ``$DETECTRON2_DATASETS``) and return that folder; a complete copy with the same parameters
    is kept unless ``force``. Train videos are sequences 0..num_train-1, val videos follow."""
    out_dir = toy_video_dataset_dir(root)
    params = {"version": TOY_VIDEO_FORMAT_VERSION, "seed": int(seed)}
    params.update(num_train=int(num_train), num_val=int(num_val), num_frames=int(num_frames))

    def write(tmp_dir: str) -> None:
        kw = {"seed": int(seed), "num_frames": int(num_frames)}
        _write_split(tmp_dir, "train", 0, int(num_train), **kw)
        _write_split(tmp_dir, "val", int(num_train), int(num_val), **kw)
        logger.info("Generated the toy video dataset (%s) in %s", params, out_dir)

    return prepare_once(out_dir, params, write, force)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)"
    )
    parser.add_argument("--num-train", type=int, default=TOY_VIDEO_DEFAULTS["num_train"])
    parser.add_argument("--num-val", type=int, default=TOY_VIDEO_DEFAULTS["num_val"])
    parser.add_argument("--num-frames", type=int, default=TOY_VIDEO_DEFAULTS["num_frames"])
    parser.add_argument("--seed", type=int, default=TOY_VIDEO_DEFAULTS["seed"])
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    out = generate_toy_video_dataset(**vars(args))
    print(f"Toy video dataset ready in {out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
